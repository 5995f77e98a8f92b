"""The built-in handlers and the handler loader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from reconciler.errors import HandlerNotFound
from reconciler.handlers import inspect_file, load_handler, local_path
from reconciler.jobs import FileJob


def test_inspect_file_reports_size_hash_lines_and_type(tmp_path: Path) -> None:
    """A text file gets its size, sha256, line count and media type."""
    path = tmp_path / "notes.csv"
    path.write_bytes(b"a,b\n1,2\n")
    result = inspect_file(FileJob("b", "f", str(path)))
    assert result == {
        "size_bytes": 8,
        "sha256": hashlib.sha256(b"a,b\n1,2\n").hexdigest(),
        "lines": 2,
        "media_type": "text/csv",
    }


def test_inspect_file_sniffs_binary_without_extension(tmp_path: Path) -> None:
    """Without an extension, NUL bytes mean binary and UTF-8 means text."""
    (tmp_path / "blob").write_bytes(b"\x00\x01")
    (tmp_path / "text").write_bytes("héllo".encode())
    assert inspect_file(FileJob("b", "1", str(tmp_path / "blob")))["media_type"] == (
        "application/octet-stream"
    )
    assert inspect_file(FileJob("b", "2", f"file://{tmp_path}/text"))["media_type"] == "text/plain"


def test_missing_file_fails_with_clear_message(tmp_path: Path) -> None:
    """A missing file raises with its path in the message."""
    with pytest.raises(FileNotFoundError, match=r"file not found: .*gone\.txt"):
        inspect_file(FileJob("b", "f", str(tmp_path / "gone.txt")))


def test_remote_uri_is_refused() -> None:
    """Only local files are read."""
    with pytest.raises(ValueError, match="unsupported URI scheme 'https'"):
        local_path("https://example.invalid/x")


@pytest.mark.parametrize("spec", ["nocolon", "no.such.module:f", "reconciler.handlers:missing"])
def test_bad_handler_spec_names_the_variable(spec: str) -> None:
    """A handler that cannot be loaded is a configuration error naming RECONCILER_HANDLER."""
    with pytest.raises(HandlerNotFound, match=r"^RECONCILER_HANDLER: "):
        load_handler(spec)
