"""Which events a sink receives: decided once, at enqueue, from the sink's ``filter``.

An event a sink does not want gets no delivery row for that sink, which is the same as
"done" for it: it is never pending, never retried, never counted as lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..config import SinkConfig
from .formats import carries
from .model import Action, Event

__all__ = ["SinkFilter"]

DEFAULT_ACTIONS = frozenset(a for a in Action if not a.is_pull)


@dataclass(frozen=True)
class SinkFilter:
    sink: str
    format: str
    actions: frozenset[Action]
    repositories: tuple[str, ...] | None
    ignore_media_types: frozenset[str]

    @classmethod
    def for_sink(cls, config: SinkConfig) -> SinkFilter:
        f = config.filter
        actions = frozenset(Action(a) for a in f.actions) if f.actions else DEFAULT_ACTIONS
        return cls(
            sink=config.name,
            format=config.format,
            # Pull events are opt-in: a sink gets them only by listing them.
            actions=actions,
            repositories=tuple(f.repositories) if f.repositories else None,
            ignore_media_types=frozenset(f.ignore_media_types),
        )

    def wants(self, action: Action) -> bool:
        return action in self.actions and carries(self.format, action)

    def matches(self, event: Event) -> bool:
        target = event.target
        if not self.wants(event.action):
            return False
        if self.repositories is not None and not any(
            fnmatchcase(target.repository, pattern) for pattern in self.repositories
        ):
            return False
        return target.media_type not in self.ignore_media_types
