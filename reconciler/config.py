"""The service's settings: one typed, frozen object built once at start.

Only the CLI reads the environment (`Settings.from_env`); everything else takes a
`Settings`. A bad value fails with a ConfigError naming the variable.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, get_args
from urllib.parse import urlsplit, urlunsplit

from reconciler.errors import ConfigError

ENV_PREFIX: Final = "RECONCILER_"
NAMESPACE: Final = "reconciler"
HTTP_HOST: Final = "0.0.0.0"
HTTP_PORT: Final = 8080
HANDLER: Final = "reconciler.handlers:inspect_file"
CONCURRENCY: Final = 16
SWEEP_INTERVAL_S: Final = 30.0
STUCK_GRACE_S: Final = 10.0
VISIBILITY_TIMEOUT_S: Final = 60.0
MAX_ATTEMPTS: Final = 3
FILE_TIMEOUT_S: Final = 300.0
DRAIN_TIMEOUT_S: Final = 25.0
LOG_FORMAT: Final = "json"
API_TOKEN_NAME: Final = "api"  # who the audit says acted through the token
FLUSH_INTERVAL_S: Final = 0.005
# Outcomes per record_outcomes statement: 512 halved nothing in CPU per file and cost
# finalize latency (the batch's last outcome waits for the whole group's statement):
# event p99 63 -> 34 ms at 192, bench throughput --batches 400 --files 50.
FLUSH_MAX_FILES: Final = 192
STATS_INTERVAL_S: Final = 5.0
DELIVERY_BACKOFF_S: Final = 5.0
DELIVERY_MAX_AGE_S: Final = 259_200.0  # 3 days, as Stripe and Standard Webhooks
DELIVERY_TIMEOUT_S: Final = 10.0
DELIVERY_POLL_INTERVAL_S: Final = 1.0
Pooler = Literal["none", "session", "transaction"]
DATABASE_POOLER: Final[Pooler] = "none"
DATABASE_POOLERS: Final[tuple[Pooler, ...]] = get_args(Pooler)
EVENTS_PING_INTERVAL_S: Final = 15.0
RETENTION_DAYS: Final = 30
MAX_RETENTION_DAYS: Final = 36_500  # a century: anything longer is "keep everything" (0)

_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_HOST_RE: Final = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_-]{1,63})*$")
T = TypeVar("T")


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """Every knob of the service, with the contract's defaults."""

    database_url: str | None = None
    # What sits between the service and Postgres: `transaction` (PgBouncer's transaction
    # pooling) turns off the statement cache and every piece of session state.
    database_pooler: Pooler = DATABASE_POOLER
    redis_url: str | None = None
    namespace: str = NAMESPACE
    http_host: str = HTTP_HOST
    http_port: int = HTTP_PORT
    handler: str = HANDLER
    concurrency: int = CONCURRENCY
    sweep_interval_s: float = SWEEP_INTERVAL_S
    stuck_grace_s: float = STUCK_GRACE_S
    visibility_timeout_s: float = VISIBILITY_TIMEOUT_S
    max_attempts: int = MAX_ATTEMPTS
    file_timeout_s: float = FILE_TIMEOUT_S
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    api_token: str | None = None
    api_token_name: str = API_TOKEN_NAME
    log_format: str = LOG_FORMAT
    flush_interval_s: float = FLUSH_INTERVAL_S
    flush_max_files: int = FLUSH_MAX_FILES
    stats_interval_s: float = STATS_INTERVAL_S
    on_finalized: str | None = None
    webhook_allowed_hosts: tuple[str, ...] | None = None
    delivery_backoff_s: float = DELIVERY_BACKOFF_S
    delivery_max_age_s: float = DELIVERY_MAX_AGE_S
    delivery_timeout_s: float = DELIVERY_TIMEOUT_S
    delivery_poll_interval_s: float = DELIVERY_POLL_INTERVAL_S
    events_ping_interval_s: float = EVENTS_PING_INTERVAL_S
    # Finalized batches older than this many days are deleted by the sweeper; 0 keeps all.
    retention_days: int = RETENTION_DAYS

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Builds settings from RECONCILER_* variables; `overrides` win (CLI flags)."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is not None and raw != "":
                values[field.name] = _PARSERS[field.name](ENV_PREFIX + field.name.upper(), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validated()

    def validated(self) -> Settings:
        """Checks cross-field rules; returns self so it chains."""
        if self.database_url is not None:
            _check_url("RECONCILER_DATABASE_URL", self.database_url, ("postgresql", "postgres"))
        if self.database_pooler not in DATABASE_POOLERS:
            raise ConfigError(
                f"RECONCILER_DATABASE_POOLER: expected {' or '.join(DATABASE_POOLERS)},"
                f" got {self.database_pooler!r}"
            )
        if self.redis_url is not None:
            _check_url("RECONCILER_REDIS_URL", self.redis_url, ("redis", "rediss", "unix"))
        if not _NAMESPACE_RE.match(self.namespace):
            raise ConfigError(
                f"RECONCILER_NAMESPACE: {self.namespace!r} is not 1-64 of [A-Za-z0-9_.:-]"
            )
        if self.api_token and self.api_token in self.api_token_name:
            raise ConfigError("RECONCILER_API_TOKEN_NAME: must not contain the token itself")
        return self

    def __repr__(self) -> str:
        # Settings end up in tracebacks and debug output: never show a secret.
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["database_url"] = redact_url(self.database_url)
        shown["redis_url"] = redact_url(self.redis_url)
        shown["api_token"] = None if self.api_token is None else "***"
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @property
    def lease_renew_interval_s(self) -> float:
        """A live worker renews its leases every third of the visibility timeout."""
        return self.visibility_timeout_s / 3


def redact_url(url: str | None) -> str | None:
    """The URL with its password replaced, safe for logs and error bodies."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<malformed URL>"
    if password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _check_url(name: str, url: str, schemes: tuple[str, ...]) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        # The parser's message may quote the password: say only what to check.
        raise ConfigError(f"{name}: malformed URL (check the host, port and escaping)") from None
    if parts.scheme not in schemes:
        raise ConfigError(
            f"{name}: scheme must be one of {', '.join(schemes)}, got {parts.scheme!r}"
        )


def _parse_with(
    kind: str, convert: Callable[[str], T], ok: Callable[[T], bool]
) -> Callable[[str, str], T]:
    def parse(name: str, raw: str) -> T:
        try:
            value = convert(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected {kind}, got {raw!r}") from None
        if not ok(value):
            raise ConfigError(f"{name}: expected {kind}, got {raw!r}")
        return value

    return parse


def _host_list(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated host names or CIDRs; each checked now so a typo fails at start."""
    hosts = tuple(part.strip().lower() for part in raw.split(",") if part.strip())
    bad = [h for h in hosts if not _is_host_or_network(h)]
    if not hosts or bad:
        raise ConfigError(f"{name}: expected host names or CIDRs separated by commas, got {raw!r}")
    return hosts


def _is_host_or_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return _HOST_RE.match(text) is not None
    return True


def _choice(*allowed: str) -> Callable[[str, str], str]:
    return _parse_with(" or ".join(allowed), str, lambda v: v in allowed)


_text = _parse_with("a non-empty string", str.strip, bool)
_positive_int = _parse_with("a positive integer", int, lambda v: v > 0)
_port = _parse_with("a port number 0-65535", int, lambda v: 0 <= v <= 65535)
_positive_float = _parse_with("a positive number of seconds", float, lambda v: v > 0)
_non_negative_float = _parse_with("a number of seconds >= 0", float, lambda v: v >= 0)
_days = _parse_with(
    f"a whole number of days 0-{MAX_RETENTION_DAYS} (0 keeps everything)",
    int,
    lambda v: 0 <= v <= MAX_RETENTION_DAYS,
)

_PARSERS: Final[dict[str, Callable[[str, str], Any]]] = {
    "database_url": _text,
    "database_pooler": _choice(*DATABASE_POOLERS),
    "redis_url": _text,
    "namespace": _text,
    "http_host": _text,
    "http_port": _port,
    "handler": _text,
    "concurrency": _positive_int,
    "sweep_interval_s": _positive_float,
    "stuck_grace_s": _non_negative_float,
    "visibility_timeout_s": _positive_float,
    "max_attempts": _positive_int,
    "file_timeout_s": _positive_float,
    "drain_timeout_s": _non_negative_float,
    "api_token": _text,
    "api_token_name": _text,
    "log_format": _choice("json", "console"),
    "flush_interval_s": _non_negative_float,
    "flush_max_files": _positive_int,
    "stats_interval_s": _positive_float,
    "on_finalized": _text,
    "webhook_allowed_hosts": _host_list,
    "delivery_backoff_s": _positive_float,
    "delivery_max_age_s": _positive_float,
    "delivery_timeout_s": _positive_float,
    "delivery_poll_interval_s": _positive_float,
    "events_ping_interval_s": _positive_float,
    "retention_days": _days,
}
