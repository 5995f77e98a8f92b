"""The console's session cookie and its CSRF tokens, both without server-side state.

A session is a random nonce and its HMAC under a key derived from the API token, so
any replica checks it, and changing the token ends every session. The CSRF token of a
form is another HMAC of the same nonce: a page from another site cannot read it, and
the server recomputes it for every POST. Without a token the console is open, as the
API is, but its forms are still tied to the browser's cookie the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Final

COOKIE: Final = "reconciler_console"
COOKIE_PATH: Final = "/ui"
NONCE_BYTES: Final = 18
SESSION_MAX_AGE_S: Final = 12 * 3600  # then the console asks for the token again
OPEN_KEY: Final = b"reconciler-console-open"  # no secret: the nonce alone is unguessable


@dataclass(frozen=True, slots=True)
class Keys:
    """What signs sessions and forms; `token` is None when the console is open."""

    token: str | None

    @property
    def guarded(self) -> bool:
        return self.token is not None

    def _key(self) -> bytes:
        if self.token is None:
            return OPEN_KEY
        return hashlib.sha256(b"reconciler-console:" + self.token.encode()).digest()

    def _mac(self, purpose: str, nonce: str) -> str:
        message = f"{purpose}:{nonce}".encode()
        return hmac.new(self._key(), message, hashlib.sha256).hexdigest()

    def right_token(self, given: str) -> bool:
        """The login form's token, compared in constant time."""
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def new_session(self, now: float | None = None) -> str:
        """A cookie value: a fresh nonce, when it was issued, and their HMAC."""
        signed = f"{secrets.token_urlsafe(NONCE_BYTES)}.{int(now or time.time())}"
        return f"{signed}.{self._mac('session', signed)}"

    def session_nonce(self, cookie: str | None, now: float | None = None) -> str | None:
        """The nonce of a cookie this key signed and not too long ago, else None."""
        signed, _, mac = (cookie or "").rpartition(".")
        nonce, _, issued = signed.partition(".")
        if not nonce or not issued.isdigit():
            return None
        if not hmac.compare_digest(mac.encode(), self._mac("session", signed).encode()):
            return None
        if (now or time.time()) - int(issued) > SESSION_MAX_AGE_S:
            return None
        return nonce

    def csrf_token(self, nonce: str) -> str:
        return self._mac("csrf", nonce)

    def csrf_ok(self, nonce: str | None, given: str) -> bool:
        if nonce is None:
            return False
        return hmac.compare_digest(given.encode(), self.csrf_token(nonce).encode())
