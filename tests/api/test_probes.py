"""/healthz, /readyz and /openapi.json, including a Postgres outage through a TCP proxy."""

from __future__ import annotations

import time
from dataclasses import replace

import httpx

from reconciler.app import Ports, Role, open_ports
from reconciler.config import Settings
from tests.api.served import assert_error, body, serving
from tests.helpers import files, wait_for
from tests.tcp_proxy import tcp_proxy

OBSERVE_S = 1.0


async def _status(http: httpx.AsyncClient, path: str, wanted: int) -> httpx.Response | None:
    response = await http.get(path)
    return response if response.status_code == wanted else None


async def test_probes_are_200_when_everything_answers(settings: Settings, ports: Ports) -> None:
    """/healthz lists the running actors; /readyz is 200 with Postgres, Redis and schema."""
    async with serving(settings, ports, Role.ALL) as api:
        health = await api.http.get("/healthz")
        ready = await api.http.get("/readyz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert {"consumer", "finalizer", "sweeper", "monitor", "api"} <= set(health.json()["actors"])
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


async def test_readyz_is_503_while_draining_and_healthz_stays_200(
    settings: Settings, ports: Ports
) -> None:
    """After the stop signal, /readyz answers 503 during the drain while /healthz stays 200."""
    async with serving(settings, ports, Role.ALL) as api:
        await api.http.post("/api/batches", json=body(files(1, {"sleep_s": 1.5})))
        await wait_for(lambda: _in_flight(api.http), what="a file in flight")
        api.service.stop.set()
        draining = await api.http.get("/readyz")
        alive = await api.http.get("/healthz")
    assert assert_error(draining, 503) is None
    assert draining.json()["error"] == "shutting down"
    assert alive.status_code == 200


async def _in_flight(http: httpx.AsyncClient) -> bool:
    page = (await http.get("/api/batches")).json()
    return any(item["files_processing"] for item in page["items"])


async def test_readyz_follows_postgres_while_healthz_stays_200(
    settings: Settings,
) -> None:
    """Without Postgres /readyz is 503 (and 200 once it is back) while /healthz stays 200."""
    async with tcp_proxy(settings.database_url or "") as proxy:
        through = replace(settings, database_url=proxy.url)
        async with (
            open_ports(through, listen=True) as ports,
            serving(through, ports, Role.ALL) as api,
        ):
            await api.http.post("/api/batches", json=body(files(1), batch_id="kept"))
            await wait_for(lambda: _status(api.http, "/api/batches/kept/summary", 200))
            assert (await api.http.get("/readyz")).status_code == 200
            await proxy.stop()
            down = await wait_for(lambda: _status(api.http, "/readyz", 503), what="readyz 503")
            health_down = await _every_probe(api.http, "/healthz")
            cached = await api.http.get("/api/batches/kept/summary")
            uncached = await api.http.get("/api/batches/kept")
            await proxy.start()
            await wait_for(lambda: _status(api.http, "/readyz", 200), what="readyz 200 again")
            health_up = await api.http.get("/healthz")
    assert assert_error(down, 503) == {"postgres": "unreachable"}
    assert health_down == {200}
    assert cached.status_code == 200 and cached.json()["batch_id"] == "kept"
    assert_error(uncached, 503)
    assert "retry-after" in uncached.headers
    assert health_up.status_code == 200


async def _every_probe(http: httpx.AsyncClient, path: str) -> set[int]:
    """The status codes `path` answers while probed for OBSERVE_S seconds."""
    seen: set[int] = set()
    deadline = time.monotonic() + OBSERVE_S
    while time.monotonic() < deadline:
        seen.add((await http.get(path)).status_code)
    return seen


async def test_healthz_stays_200_while_sweeps_fail_during_an_outage(
    settings: Settings,
) -> None:
    """A sweeper failing on an unreachable Postgres must not turn /healthz to 503."""
    async with tcp_proxy(settings.database_url or "") as proxy:
        through = replace(settings, database_url=proxy.url, sweep_interval_s=0.05)
        async with (
            open_ports(through, listen=True) as ports,
            serving(through, ports, Role.SWEEPER) as api,
        ):
            await proxy.stop()
            await wait_for(lambda: _status(api.http, "/readyz", 503), what="readyz 503")
            seen = await _every_probe(api.http, "/healthz")
            await proxy.start()
    assert seen == {200}


async def test_openapi_documents_every_endpoint_and_status(
    settings: Settings, ports: Ports
) -> None:
    """/openapi.json documents every endpoint and status; the 401 only with a token set."""
    async with serving(replace(settings, api_token="t"), ports, Role.API) as api:
        spec = (await api.http.get("/openapi.json")).json()
    async with serving(settings, ports, Role.API) as api:
        open_spec = (await api.http.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    answers = {
        (path, method): set(operation["responses"])
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    }
    assert answers[("/api/batches", "post")] >= {"200", "201", "401", "409", "413", "422"}
    assert answers[("/api/batches/{batch_id}", "get")] >= {"200", "404", "422"}
    assert answers[("/api/batches/{batch_id}/summary", "get")] >= {"200", "202", "404", "422"}
    assert answers[("/api/batches/{batch_id}/explain", "get")] >= {"200", "404", "422"}
    assert answers[("/api/batches", "get")] >= {"200", "422"}
    assert answers[("/readyz", "get")] >= {"200", "503"}
    assert {("/healthz", "get"), ("/metrics", "get")} <= set(answers)
    summary_202 = spec["paths"]["/api/batches/{batch_id}/summary"]["get"]["responses"]["202"]
    assert "Retry-After" in summary_202["headers"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    error_schema = spec["components"]["schemas"]["ErrorBody"]
    assert set(error_schema["properties"]) == {"error", "detail"}
    assert "401" not in open_spec["paths"]["/api/batches"]["post"]["responses"]
    assert "securitySchemes" not in open_spec["components"]
