"""Webhook subscriptions: who gets told a batch is finalized, and how it is signed.

URLs are checked when a subscription is created (http or https, and a host the
operator allows); secrets follow the Standard Webhooks scheme (`whsec_` and base64),
are generated when none is given, and are shown once, by `create`, never again.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import secrets
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from reconciler.database import Database
from reconciler.errors import InvalidWebhook, WebhookNotFound

EVENT_TYPES: Final = ("batch.finalized",)
SECRET_PREFIX: Final = "whsec_"
SECRET_BYTES: Final = 32
SECRET_MIN_BYTES: Final = 24  # the Standard Webhooks range
SECRET_MAX_BYTES: Final = 64
URL_MAX_CHARS: Final = 2048


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key a `whsec_...` secret stands for; InvalidWebhook if it is malformed."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidWebhook(f"a secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidWebhook("a secret is whsec_ followed by base64") from None
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise InvalidWebhook(
            f"a secret's key is {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes, not {len(key)}"
        )
    return key


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: `v1,` and the base64 HMAC-SHA256 of id.ts.body."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.digest(secret_key(secret), signed, "sha256")
    return "v1," + base64.b64encode(digest).decode()


def check_url(url: str, allowed_hosts: Sequence[str] | None) -> str:
    """The URL if a subscription may point at it; InvalidWebhook saying why not."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise InvalidWebhook("the URL is malformed") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidWebhook("the URL needs the scheme http or https and a host")
    if parts.username or parts.password:
        raise InvalidWebhook("the URL must not carry credentials; use the signing secret")
    if allowed_hosts is not None and not host_allowed(parts.hostname, allowed_hosts):
        raise InvalidWebhook(f"host {parts.hostname!r} is not in RECONCILER_WEBHOOK_ALLOWED_HOSTS")
    return url


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """A host name listed as such, or an IP address inside a listed CIDR (or equal to one)."""
    host = host.lower().rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host in allowed
    return any(address in network for network in _networks(allowed))


def _networks(allowed: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    found = []
    for entry in allowed:
        try:
            found.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue  # a host name
    return found


def check_events(events: Sequence[str] | None) -> list[str]:
    chosen = list(dict.fromkeys(events or EVENT_TYPES))
    unknown = [e for e in chosen if e not in EVENT_TYPES]
    if unknown:
        raise InvalidWebhook(f"unknown event types {unknown}; known: {list(EVENT_TYPES)}")
    return chosen


async def create(
    db: Database,
    url: str,
    *,
    events: Sequence[str] | None = None,
    secret: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Subscribes `url`; the answer is the only place the secret is ever shown."""
    if len(url) > URL_MAX_CHARS:
        raise InvalidWebhook(f"the URL is longer than {URL_MAX_CHARS} characters")
    check_url(url, allowed_hosts)
    chosen = check_events(events)
    secret = secret if secret is not None else new_secret()
    secret_key(secret)
    webhook_id = "wh_" + secrets.token_hex(12)
    row = await db.fetchrow("insert_webhook", webhook_id, url, chosen, secret)
    assert row is not None
    return {**_plain(row), "secret": secret}


async def listed(db: Database) -> list[dict[str, Any]]:
    """Every subscription, never with its secret."""
    return [_plain(row) for row in await db.fetch("list_webhooks")]


async def remove(db: Database, webhook_id: str) -> None:
    """Deletes the subscription and cancels what it had not received yet."""
    if not await db.fetchval("delete_webhook", webhook_id):
        raise WebhookNotFound(f"no webhook {webhook_id!r}")


def _plain(row: Any) -> dict[str, Any]:
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in dict(row).items()}
