"""Pure rules of delivery: the retry schedule, answers, Retry-After, signatures, URLs."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from standardwebhooks.webhooks import Webhook

from reconciler import webhooks
from reconciler.config import Settings
from reconciler.delivery import Attempt, Claimed, Event, Schedule, Sink
from reconciler.errors import ConfigError, InvalidWebhook
from reconciler.sinks import judge, load_hook, parse_retry_after, signed_headers


def test_first_retry_waits_the_backoff_and_later_ones_double_with_jitter() -> None:
    """Delay n is backoff * 2^(n-1), up to half again for jitter, capped at an hour."""
    low, high = Schedule(5.0, 60.0, rng=lambda: 0.0), Schedule(5.0, 60.0, rng=lambda: 1.0)
    assert [low.delay_s(n) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert [high.delay_s(n) for n in (1, 2)] == [7.5, 15.0]
    assert low.delay_s(40) == 3600.0


def test_retry_after_is_honoured_and_429_slows_down() -> None:
    """A Retry-After longer than the schedule wins; a 429 without one waits twice as long."""
    schedule = Schedule(5.0, 60.0, rng=lambda: 0.0)
    assert schedule.after(Attempt(False, 0.1, 503, retry_after_s=120.0), 1) == 120.0
    assert schedule.after(Attempt(False, 0.1, 503, retry_after_s=1.0), 1) == 5.0
    assert schedule.after(Attempt(False, 0.1, 429, throttled=True), 2) == 20.0


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """Retry-After is delta-seconds or an HTTP date; anything else is ignored."""
    now = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 01 Jan 2025 12:01:30 GMT", now) == 90.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


JUDGED = [
    (200, True, False, False),
    (204, True, False, False),
    (410, False, True, False),
    (429, False, False, True),
    (302, False, False, False),
    (500, False, False, False),
]


@pytest.mark.parametrize(("status", "delivered", "gone", "throttled"), JUDGED)
def test_answers_are_judged_by_status(
    status: int, delivered: bool, gone: bool, throttled: bool
) -> None:
    """2xx is delivered, 410 is gone, 429 throttles, everything else is a failure."""
    attempt = judge(status, None, b"busy\x00", 0.01)
    assert (attempt.delivered, attempt.gone, attempt.throttled) == (delivered, gone, throttled)
    assert attempt.error is None if delivered else "\x00" not in (attempt.error or "")


def test_signature_verifies_with_the_standard_webhooks_library() -> None:
    """The headers a delivery sends verify with the reference Standard Webhooks code."""
    secret = webhooks.new_secret()
    event = Event("evt_1", "batch.finalized", "b1", "2025-01-01T00:00:00+00:00", {"n": 1.5})
    claimed = Claimed(1, Sink.WEBHOOK, 1, event, "r", "wh_1", "http://x", secret)
    now = int(dt.datetime.now(dt.UTC).timestamp())
    headers = signed_headers(claimed, event.body(), now)
    assert headers["webhook-id"] == "evt_1" and headers["webhook-signature"].startswith("v1,")
    payload = Webhook(secret).verify(event.body(), headers)
    assert payload == {"type": "batch.finalized", "timestamp": event.timestamp, "data": {"n": 1.5}}
    assert secret not in repr(claimed)


BODY_DATA = [
    {"b": [1, 2.5, None], "a": {"z": True, "y": "d\u00e9j\u00e0 \u2713"}},
    {"total": 2**64 + 1, "é": -(2**63)},  # past 64 bits: orjson refuses, json writes it
]


@pytest.mark.parametrize("data", BODY_DATA)
def test_the_body_is_compact_json_with_sorted_keys_that_reads_back_as_sent(
    data: dict[str, object],
) -> None:
    body = Event("evt_1", "batch.finalized", "b1", "2025-01-01T00:00:00+00:00", data).body()
    payload = {"type": "batch.finalized", "timestamp": "2025-01-01T00:00:00+00:00", "data": data}
    assert json.loads(body) == payload
    assert (
        body
        == json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    )


@pytest.mark.parametrize("secret", ["whsec_short", "nope_" + "A" * 32, "whsec_***"])
def test_malformed_secrets_are_refused(secret: str) -> None:
    """A secret is whsec_ and base64 of 24 to 64 bytes."""
    with pytest.raises(InvalidWebhook):
        webhooks.secret_key(secret)


def test_hosts_are_allowed_by_name_or_cidr() -> None:
    """Names match exactly; IP addresses match a listed CIDR or address."""
    allowed = ("hooks.example.com", "10.1.0.0/16", "::1")
    assert webhooks.host_allowed("HOOKS.example.com", allowed)
    assert webhooks.host_allowed("10.1.2.3", allowed) and webhooks.host_allowed("::1", allowed)
    assert not webhooks.host_allowed("evil.hooks.example.com", allowed)
    assert not webhooks.host_allowed("10.2.0.1", allowed)


def test_delivery_settings_parse_and_name_the_variable() -> None:
    """The delivery variables are read from the environment; bad values name themselves."""
    env = {
        "RECONCILER_WEBHOOK_ALLOWED_HOSTS": "hooks.example.com, 10.0.0.0/8",
        "RECONCILER_DELIVERY_BACKOFF_S": "0.5",
        "RECONCILER_ON_FINALIZED": "tests.delivery_hooks:record",
    }
    found = Settings.from_env(env)
    assert found.webhook_allowed_hosts == ("hooks.example.com", "10.0.0.0/8")
    assert (found.delivery_backoff_s, found.delivery_max_age_s) == (0.5, 259200.0)
    with pytest.raises(ConfigError, match="RECONCILER_WEBHOOK_ALLOWED_HOSTS"):
        Settings.from_env({"RECONCILER_WEBHOOK_ALLOWED_HOSTS": "http://x/"})
    with pytest.raises(ConfigError, match="RECONCILER_DELIVERY_MAX_AGE_S"):
        Settings.from_env({"RECONCILER_DELIVERY_MAX_AGE_S": "0"})
    with pytest.raises(ConfigError, match="RECONCILER_ON_FINALIZED"):
        load_hook("tests.delivery_hooks:missing")
