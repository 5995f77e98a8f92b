"""The service's one exception hierarchy.

Ports translate driver exceptions into these, so actors and HTTP answers never see
asyncpg or redis types. Retryable errors restart an actor; terminal ones do not.
"""

from __future__ import annotations


class ReconcilerError(Exception):
    """Base of every error the service raises on purpose."""


class RetryableError(ReconcilerError):
    """A dependency blinked (lost connection, timeout, deadlock): try again later."""


class TerminalError(ReconcilerError):
    """Retrying will not help: bad input, unknown names, broken invariants."""


class ConfigError(TerminalError):
    """A setting is missing or malformed; the message names the variable."""


class MalformedJob(TerminalError):
    """A stream entry that cannot be turned into a job; the message is the reason."""


class BatchNotFound(TerminalError):
    """No batch with this id."""


class BatchConflict(TerminalError):
    """A batch id was resubmitted with different files."""


class HandlerNotFound(ConfigError):
    """RECONCILER_HANDLER does not name an importable callable."""


class InvalidBatch(TerminalError):
    """A submission that breaks a rule (duplicate file ids, empty ids, ...)."""


class UsageError(ReconcilerError):
    """A command-line argument that cannot work (exit code 2)."""


class WaitTimeout(ReconcilerError):
    """A batch did not finalize within the time the caller was willing to wait."""


class InvalidData(TerminalError):
    """Postgres refused a value (too long, malformed, violates a constraint)."""


class SubmitFailed(ReconcilerError):
    """A submission failed part-way; the message names the batch id to retry with."""


class InvalidWebhook(TerminalError):
    """A webhook subscription that cannot be made: bad URL, host not allowed, bad secret."""


class WebhookNotFound(TerminalError):
    """No webhook subscription with this id."""


class ActionRefused(TerminalError):
    """An operator action the batch's state does not allow (already finalized, nothing
    failed, not finalized yet); the message says which."""


class MisconfiguredDependency(RetryableError):
    """Postgres or Redis refuses us for a reason a person must fix (a wrong password, TLS
    against a plain port). Still retried, since the fix may land on the server's side;
    `cause` names it ("authentication", "tls") and the message says what to check."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause
