"""How one delivery attempt is made: a signed webhook POST, or a call of the Python hook.

Whatever happens (an answer, a timeout, a refused connection, a redirect, a raising
hook) ends as an `Attempt` with a readable reason; nothing escapes. A webhook attempt
has one deadline for the whole exchange, follows no redirect and reads at most a few
kilobytes of the answer.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import time
from collections.abc import Callable
from typing import Any, Final, cast

import anyio
import anyio.to_thread

from reconciler import http1, webhooks
from reconciler.delivery import Attempt, Claimed, Event
from reconciler.execution import describe
from reconciler.handlers import is_async, load_handler

Hook = Callable[[Event], Any]
RESPONSE_CAP_BYTES: Final = 4096
ERROR_EXCERPT_CHARS: Final = 200
USER_AGENT: Final = "batch-reconciler"


def http_client() -> http1.Client:
    """The client every webhook attempt goes through: no proxy, no cookies, bodies as
    sent (never decompressed), no redirect followed. Each attempt's one deadline is
    `WebhookSender`'s."""
    return http1.Client(user_agent=USER_AGENT)


class WebhookSender:
    """Posts an event to its webhook, signed by the Standard Webhooks scheme."""

    def __init__(self, http: http1.Client, timeout_s: float) -> None:
        self._http = http
        self._timeout_s = timeout_s

    async def send(self, claimed: Claimed) -> Attempt:
        started = time.perf_counter()
        body = claimed.event.body()
        headers = signed_headers(claimed, body, int(time.time()))
        try:
            answer = await self._http.post(
                claimed.url or "",
                body,
                headers,
                timeout_s=self._timeout_s,
                cap=RESPONSE_CAP_BYTES,
            )
        except TimeoutError:
            return Attempt(False, _since(started), error=f"timed out after {self._timeout_s:g} s")
        except http1.HttpError as exc:  # its message never quotes the URL
            return Attempt(False, _since(started), error=str(exc)[:ERROR_EXCERPT_CHARS])
        return judge(answer.status, answer.headers.get("retry-after"), answer.body, _since(started))


def signed_headers(claimed: Claimed, body: bytes, timestamp: int) -> dict[str, str]:
    """`webhook-id` is the event's (stable across retries); the timestamp is this attempt's."""
    event_id = claimed.event.event_id
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": webhooks.sign(claimed.secret or "", event_id, timestamp, body),
    }


def judge(status: int, retry_after: str | None, excerpt: bytes, latency_s: float) -> Attempt:
    """2xx delivered; 410 disables the subscription; anything else is retried."""
    if 200 <= status < 300:
        return Attempt(True, latency_s, status)
    if status == 410:
        return Attempt(False, latency_s, status, "410 Gone: subscription disabled", gone=True)
    if 300 <= status < 400:
        return Attempt(False, latency_s, status, f"HTTP {status}: redirects are not followed")
    text = excerpt.decode("utf-8", "replace").replace("\x00", "\\0").strip()
    text = text[:ERROR_EXCERPT_CHARS]
    error = f"HTTP {status}: {text}" if text else f"HTTP {status}"
    wait_s = parse_retry_after(retry_after)
    return Attempt(False, latency_s, status, error, wait_s, throttled=status == 429)


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return max(0.0, (moment - (now or dt.datetime.now(dt.UTC))).total_seconds())


def load_hook(spec: str) -> Hook:
    """Imports RECONCILER_ON_FINALIZED; a ConfigError naming it when that fails."""
    return cast(Hook, load_handler(spec, "RECONCILER_ON_FINALIZED"))


class HookCaller:
    """Calls RECONCILER_ON_FINALIZED with the event: async on the loop, sync in a thread."""

    def __init__(self, hook: Hook, timeout_s: float) -> None:
        self._hook = hook
        self._async = is_async(hook)
        self._timeout_s = timeout_s

    async def call(self, claimed: Claimed) -> Attempt:
        started = time.perf_counter()
        try:
            with anyio.fail_after(self._timeout_s):
                await self._run(claimed)
        except Exception as exc:
            return Attempt(False, _since(started), error=describe(exc))
        return Attempt(True, _since(started))

    async def _run(self, claimed: Claimed) -> None:
        if self._async:
            await self._hook(claimed.event)
        else:
            # A sync hook past its timeout cannot be stopped: leave its thread behind.
            await anyio.to_thread.run_sync(self._hook, claimed.event, abandon_on_cancel=True)


def _since(started: float) -> float:
    return time.perf_counter() - started
