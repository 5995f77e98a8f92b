"""Watches a replica's /healthz and /readyz all through a fault, for a timeline to check."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

import anyio
import httpx

PROBE_EVERY_S: Final = 0.1
CLIENT_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True)
class Answer:
    at: float
    path: str
    status: int  # 0 when the request itself failed
    took_s: float
    body: str


@dataclass
class ProbeLog:
    """Every probe answer, in order."""

    answers: list[Answer] = field(default_factory=list)

    def of(self, path: str, since: float = 0.0, until: float = float("inf")) -> list[Answer]:
        return [a for a in self.answers if a.path == path and since <= a.at <= until]

    def first(self, path: str, status: int, since: float) -> Answer | None:
        return next((a for a in self.of(path, since) if a.status == status), None)


async def watch(base_url: str, log: ProbeLog, stop: anyio.Event) -> None:
    """Polls both probes until `stop` is set."""
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_S) as http:
        while not stop.is_set():
            for path in ("/healthz", "/readyz"):
                log.answers.append(await _ask(http, path))
            await anyio.sleep(PROBE_EVERY_S)


async def _ask(http: httpx.AsyncClient, path: str) -> Answer:
    began = time.time()
    try:
        response = await http.get(path)
    except httpx.HTTPError as exc:
        return Answer(began, path, 0, time.time() - began, repr(exc))
    return Answer(began, path, response.status_code, time.time() - began, response.text)
