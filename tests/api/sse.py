"""A small server-sent events reader over an httpx stream, for the stream tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from tests.helpers import DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Message:
    """One SSE message, or a comment (`event` is None, `comment` holds its text)."""

    event: str | None = None
    id: str | None = None
    data: Any = None
    comment: str | None = None


@dataclass
class Stream:
    response: httpx.Response
    _lines: AsyncIterator[str] = field(init=False)

    def __post_init__(self) -> None:
        self._lines = self.response.aiter_lines()

    async def next(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> Message | None:
        """The next message or comment; None when the server ended the stream."""
        with anyio.fail_after(timeout_s):
            return await self._read()

    async def next_event(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> Message | None:
        """The next message that is not a comment (pings are skipped)."""
        with anyio.fail_after(timeout_s):
            while (found := await self._read()) is not None and found.event is None:
                pass
            return found

    async def _read(self) -> Message | None:
        fields: dict[str, str] = {}
        async for line in self._lines:
            if line.startswith(":"):
                return Message(comment=line[1:].strip())
            if not line:
                if fields:
                    return _message(fields)
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        return None


def _message(fields: dict[str, str]) -> Message:
    data = json.loads(fields["data"]) if "data" in fields else None
    return Message(fields.get("event"), fields.get("id"), data)


@asynccontextmanager
async def streaming(
    http: httpx.AsyncClient, path: str, last_event_id: str | None = None
) -> AsyncIterator[Stream]:
    """GET `path` as an event stream (200 expected), optionally resuming."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with http.stream("GET", path, headers=headers, timeout=None) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)
