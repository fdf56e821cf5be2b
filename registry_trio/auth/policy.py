"""zot-style access control: which actions an identity may take on a repository.

Rules, as zot documents them:

- No ``accessControl`` at all: with authentication configured, any authenticated user may do
  everything and anonymous requests nothing; without authentication, everything is open.
- Otherwise the most specific repository pattern that matches decides (the longest pattern;
  ``**`` matches across ``/``, ``*`` within one component). Authenticated users get the
  actions of every policy naming them or one of their groups, plus ``defaultPolicy``;
  anonymous requests get ``anonymousPolicy``. ``adminPolicy`` applies on every repository.
- A bearer token carries its own grants (its ``access`` claim) and is judged by those alone.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ..config import ACCESS_ACTIONS, AccessControlConfig, PolicyConfig
from .identity import Identity

__all__ = ["AccessPolicy"]

ALL_ACTIONS = frozenset(ACCESS_ACTIONS)


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


class AccessPolicy:
    def __init__(self, config: AccessControlConfig | None, authentication: bool) -> None:
        self._config = config
        self._authentication = authentication
        self._groups: dict[str, set[str]] = {}
        if config is not None:
            for group, members in config.groups.items():
                for user in members.users:
                    self._groups.setdefault(user, set()).add(group)
        # Longest first: the first match is the most specific.
        self._patterns = sorted(config.repositories, key=lambda p: (-len(p), p)) if config else []

    def _applies(self, policy: PolicyConfig, user: str) -> bool:
        return user in policy.users or bool(self._groups.get(user, set()) & set(policy.groups))

    def is_admin(self, identity: Identity) -> bool:
        """Whether ``identity`` may use the admin API (``/_registry/``)."""
        user = identity.name
        if user is None or identity.token_access is not None:  # anonymous, or a token's grants
            return False
        if self._config is None:
            return self._authentication
        admin = self._config.admin_policy
        return admin is not None and self._applies(admin, user)

    def allowed(self, identity: Identity, repository: str) -> frozenset[str]:
        if identity.token_access is not None:
            return identity.token_access.get(repository, frozenset())
        if self._config is None:
            if not self._authentication or not identity.anonymous:
                return ALL_ACTIONS
            return frozenset()
        actions: set[str] = set()
        user = identity.name
        admin = self._config.admin_policy
        if user is not None and admin is not None and self._applies(admin, user):
            actions.update(admin.actions)
        for pattern in self._patterns:
            if _glob(pattern).fullmatch(repository):
                rule = self._config.repositories[pattern]
                if user is None:
                    actions.update(rule.anonymous_policy)
                else:
                    actions.update(rule.default_policy)
                    for policy in rule.policies:
                        if self._applies(policy, user):
                            actions.update(policy.actions)
                break
        return frozenset(actions)
