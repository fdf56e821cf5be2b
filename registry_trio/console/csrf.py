"""The token every console form carries, so that only the console's own pages can post one.

Why a token: a browser that holds an administrator's Basic login sends it with every request
to this origin, a form that another site posts included. The token is what such a page
cannot have:

- a random nonce in a cookie (``HttpOnly``, ``SameSite=Strict``, the console's path only):
  another site can neither read it nor have it sent along with its post;
- the form's token, an HMAC of the request's login (its ``Authorization`` header, and the
  identity it proved) under that nonce: good only for the login the page was rendered for,
  so a cookie planted by a sibling site on the same host (cookie tossing) is of no use
  without the credentials.

Nothing is kept on the server: any worker process checks a token that any other issued.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["COOKIE", "FIELD", "form_token", "is_valid", "new_nonce", "nonce_of"]

COOKIE = "registry_console_csrf"
FIELD = "csrf"
# A nonce this process issues is 43 characters; anything much longer is not one of ours.
_NONCE_MAX = 64


def new_nonce() -> str:
    return secrets.token_urlsafe(32)


def nonce_of(cookie: str | None) -> str | None:
    """The cookie's value if it can be a nonce we issued (None: issue one)."""
    return cookie if cookie and len(cookie) <= _NONCE_MAX else None


def form_token(nonce: str, login: str) -> str:
    mac = hmac.new(nonce.encode(), b"registry-trio console form\n", hashlib.sha256)
    mac.update(login.encode())
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def is_valid(nonce: str | None, login: str, token: str | None) -> bool:
    """Whether a posted ``token`` was issued with the cookie's ``nonce`` to this login."""
    nonce = nonce_of(nonce)
    if nonce is None or not token:
        return False
    return hmac.compare_digest(form_token(nonce, login).encode(), token.encode())
