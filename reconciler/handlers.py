"""Built-in file handlers and the loader for `RECONCILER_HANDLER`.

A handler takes a FileJob and returns a JSON object (numeric fields are summed into
the run summary) or None; raising marks the attempt failed with the message.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import mimetypes
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import anyio

from reconciler.errors import HandlerNotFound
from reconciler.jobs import FileJob

Handler = Callable[[FileJob], Any | Awaitable[Any]]
READ_CHUNK_BYTES: Final = 1024 * 1024
_SNIFF_BYTES: Final = 8192


def inspect_file(job: FileJob) -> dict[str, Any]:
    """Size, sha256, line count and a guessed media type of a local file."""
    path = local_path(job.uri)
    digest = hashlib.sha256()
    size = lines = 0
    head = b""
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(READ_CHUNK_BYTES):
                head = head or chunk[:_SNIFF_BYTES]
                digest.update(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n")
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"not a file: {path}") from None
    except PermissionError:
        raise PermissionError(f"permission denied: {path}") from None
    return {
        "size_bytes": size,
        "sha256": digest.hexdigest(),
        "lines": lines,
        "media_type": guess_media_type(path, head),
    }


async def noop(job: FileJob) -> None:
    """Returns at once, on the event loop: measures the service, not the handler."""


async def simulate(job: FileJob) -> dict[str, Any]:
    """Pretends to work as the payload says, for demos, tests and chaos runs.

    Payload keys, all optional: `sleep_s` (seconds of work), `fail_attempts` (the first
    N attempts fail), `fail_rate` (chance in [0, 1] that an attempt fails), `error`
    (the failure message), `hang` (never returns; the per-file timeout ends it).
    """
    spec = job.payload if isinstance(job.payload, dict) else {}
    if spec.get("hang"):
        await anyio.sleep_forever()
    await anyio.sleep(float(spec.get("sleep_s", 0)))
    failing = job.attempt <= int(spec.get("fail_attempts", 0))
    if failing or random.random() < float(spec.get("fail_rate", 0)):
        raise RuntimeError(str(spec.get("error", "simulated failure")))
    return {"simulated_s": float(spec.get("sleep_s", 0)), "attempt": job.attempt}


def local_path(uri: str) -> Path:
    """A `file://` URI or a plain path as a Path."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:
        raise ValueError(f"unsupported URI scheme {parts.scheme!r}: only local files")
    return Path(uri)


def guess_media_type(path: Path, head: bytes) -> str:
    """By extension first, then by whether the first bytes decode as text."""
    guessed, _ = mimetypes.guess_type(path.name)
    if guessed:
        return guessed
    if b"\x00" in head:
        return "application/octet-stream"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return "text/plain"


def load_handler(spec: str, variable: str = "RECONCILER_HANDLER") -> Handler:
    """Imports `module:function`; fails with a message naming the variable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise HandlerNotFound(f"{variable}: expected 'module:function', got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise HandlerNotFound(f"{variable}: cannot load {spec!r}: {exc}") from None
    if not callable(target):
        raise HandlerNotFound(f"{variable}: {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def is_async(handler: Callable[..., Any]) -> bool:
    """Coroutine functions run on the loop; everything else in a worker thread."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )
