"""Helpers for the HTTP tests: a running service with a client on its real port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from reconciler.app import Ports, Role, Service
from reconciler.batches import FileSpec
from reconciler.config import Settings
from tests.helpers import running

CLIENT_TIMEOUT_S = 10.0
Scraped = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True)
class Served:
    service: Service
    http: httpx.AsyncClient


@asynccontextmanager
async def serving(settings: Settings, ports: Ports, role: Role = Role.ALL) -> AsyncIterator[Served]:
    """The service running in this process, and a client talking HTTP to its port."""
    async with running(settings, ports, role) as service:
        assert service.api is not None and service.api.port is not None
        base_url = f"http://127.0.0.1:{service.api.port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_S) as http:
            yield Served(service, http)


def body(specs: Sequence[FileSpec], **fields: Any) -> dict[str, Any]:
    """A POST /api/batches body for these files."""
    files = [{"file_id": s.file_id, "uri": s.uri, "payload": s.payload} for s in specs]
    return {"files": files, **fields}


def assert_error(response: httpx.Response, status: int) -> Any:
    """Checks an error answer's status and JSON shape; returns its detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    found = response.json()
    assert set(found) == {"error", "detail"}, found
    assert isinstance(found["error"], str) and found["error"]
    assert "Traceback" not in response.text
    return found["detail"]


def samples(text: str) -> Scraped:
    """Every sample of a /metrics page by (name, sorted labels)."""
    found: Scraped = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def scrape(http: httpx.AsyncClient) -> Scraped:
    response = await http.get("/metrics")
    assert response.status_code == 200
    return samples(response.text)


def value(scraped: Scraped, name: str, **labels: str) -> float:
    """One sample's value, 0 when absent."""
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)
