"""Settings: defaults from the contract, and bad values named by their variable."""

from __future__ import annotations

import pytest

from reconciler.config import Settings, redact_url
from reconciler.errors import ConfigError


def test_defaults_match_the_contract() -> None:
    """With nothing set, every default is the contract's."""
    s = Settings.from_env({})
    assert (s.namespace, s.http_host, s.http_port) == ("reconciler", "0.0.0.0", 8080)
    assert (s.concurrency, s.sweep_interval_s, s.stuck_grace_s) == (16, 30.0, 10.0)
    assert (s.visibility_timeout_s, s.max_attempts, s.log_format) == (60.0, 3, "json")
    assert s.handler == "reconciler.handlers:inspect_file"
    assert s.api_token is None and s.database_url is None
    assert s.database_pooler == "none"
    assert s.retention_days == 30


def test_environment_values_are_parsed() -> None:
    """RECONCILER_* variables set the typed fields."""
    s = Settings.from_env({"RECONCILER_CONCURRENCY": "4", "RECONCILER_SWEEP_INTERVAL_S": "2.5"})
    assert (s.concurrency, s.sweep_interval_s) == (4, 2.5)
    for pooler in ("none", "session", "transaction"):
        assert Settings.from_env({"RECONCILER_DATABASE_POOLER": pooler}).database_pooler == pooler


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RECONCILER_CONCURRENCY", "many"),
        ("RECONCILER_CONCURRENCY", "0"),
        ("RECONCILER_HTTP_PORT", "70000"),
        ("RECONCILER_LOG_FORMAT", "xml"),
        ("RECONCILER_VISIBILITY_TIMEOUT_S", "-1"),
        ("RECONCILER_DATABASE_URL", "mysql://x@y/z"),
        ("RECONCILER_REDIS_URL", "redis://host:notaport/0"),
        ("RECONCILER_NAMESPACE", "has space"),
        ("RECONCILER_DATABASE_POOLER", "statement"),
        ("RECONCILER_DATABASE_POOLER", "Transaction"),
        ("RECONCILER_RETENTION_DAYS", "-1"),
        ("RECONCILER_RETENTION_DAYS", "1.5"),
        ("RECONCILER_RETENTION_DAYS", "36501"),
    ],
)
def test_bad_value_names_its_variable(variable: str, value: str) -> None:
    """A malformed setting fails with a message that starts with the variable's name."""
    with pytest.raises(ConfigError, match=f"^{variable}: "):
        Settings.from_env({variable: value})


def test_retention_days_zero_keeps_everything() -> None:
    """RECONCILER_RETENTION_DAYS=0 is valid: retention is off."""
    assert Settings.from_env({"RECONCILER_RETENTION_DAYS": "0"}).retention_days == 0
    assert Settings.from_env({"RECONCILER_RETENTION_DAYS": "7"}).retention_days == 7


def test_settings_are_frozen() -> None:
    """Nothing can change the settings after start."""
    s = Settings()
    with pytest.raises(AttributeError):
        s.concurrency = 3  # type: ignore[misc]


def test_redact_url_hides_only_the_password() -> None:
    """Passwords never reach logs: the URL keeps user, host and path."""
    assert redact_url("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_api_token_name_never_holds_the_token() -> None:
    """The audit actor comes from RECONCILER_API_TOKEN_NAME; a name holding the token fails."""
    named = Settings.from_env({"RECONCILER_API_TOKEN": "t0ken", "RECONCILER_API_TOKEN_NAME": "ops"})
    assert named.api_token_name == "ops"
    assert Settings.from_env({}).api_token_name == "api"
    with pytest.raises(ConfigError, match="RECONCILER_API_TOKEN_NAME"):
        Settings.from_env({"RECONCILER_API_TOKEN": "t0ken", "RECONCILER_API_TOKEN_NAME": "x-t0ken"})
