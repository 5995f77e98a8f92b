"""Scenario 7: with RECONCILER_API_TOKEN set no mutating call passes without it; and the
Postgres password, the Redis password and the token never show in logs, CLI output,
/metrics or error bodies, even while things fail. Both servers are private ones that
really demand their passwords."""

from __future__ import annotations

import secrets
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from reconciler.embedded import EmbeddedServer
from tests.acceptance.processes import run_cli, with_env
from tests.chaos.harness import (
    SIZE,
    Fleet,
    PrivatePostgres,
    PrivateRedis,
    private_redis,
    started,
)
from tests.helpers import sql, wait_for

pytestmark = pytest.mark.timeout(SIZE.test_timeout_s)
APP_ROLE: Final = "chaos_app"
MUTATING: Final = {"post", "put", "patch", "delete"}
HBA: Final = """\
local all all trust
host all reconciler 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


@dataclass
class Secrets:
    postgres: str = field(default_factory=lambda: "pgpw-" + secrets.token_hex(8))
    redis: str = field(default_factory=lambda: "rdpw-" + secrets.token_hex(8))
    token: str = field(default_factory=lambda: "tok-" + secrets.token_hex(12))

    def all(self) -> dict[str, str]:
        return {"postgres": self.postgres, "redis": self.redis, "token": self.token}


@dataclass
class Locked:
    """The service's environment against password-protected servers, and what it said."""

    env: dict[str, str]
    secrets: Secrets
    redis: PrivateRedis
    said: list[str] = field(default_factory=list)


async def _lock_down(server: EmbeddedServer, password: str) -> str:
    """A role that must give its password, its own database; returns the service's URL."""
    conn = await asyncpg.connect(server.url)
    try:
        await conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{password}'")
        await conn.execute(f"CREATE DATABASE {APP_ROLE} OWNER {APP_ROLE}")
        hba_file = await conn.fetchval("SHOW hba_file")
        _server_path(hba_file, server.pid).write_text(HBA)
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    port = server.url.rsplit(":", 1)[1].split("/")[0]
    url = f"postgresql://{APP_ROLE}:{password}@127.0.0.1:{port}/{APP_ROLE}"
    await wait_for(lambda: _refused(url.replace(f":{password}@", ":wrong@")), what="reload")
    return url


def _server_path(path: str, pid: int) -> Path:
    """A path as the server sees it: its own /proc/self is not ours."""
    if not path.startswith("/proc/self/"):
        return Path(path)
    return Path(f"/proc/{pid}/") / path.removeprefix("/proc/self/")


async def _refused(url: str) -> bool:
    """Whether Postgres turns this URL away (the reload of pg_hba.conf is asynchronous)."""
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidPasswordError:
        return True
    await conn.close()
    return False


@pytest.fixture
async def locked(
    chaos_env: dict[str, str], tmp_path: Path, namespace: str
) -> AsyncIterator[Locked]:
    keys = Secrets()
    server = PrivatePostgres(tmp_path / "pg")
    embedded = await anyio.to_thread.run_sync(server.start)
    try:
        database_url = await _lock_down(embedded, keys.postgres)
        with private_redis(tmp_path, keys.redis) as redis_server:
            env = with_env(
                chaos_env, RECONCILER_DATABASE_URL=database_url,
                RECONCILER_REDIS_URL=redis_server.url, RECONCILER_API_TOKEN=keys.token,
            )  # fmt: skip
            yield Locked(env, keys, redis_server)
    finally:
        await anyio.to_thread.run_sync(server.stop)


async def _cli(locked: Locked, *args: str, **extra: str) -> int:
    env = with_env(locked.env, **extra)
    done = await anyio.to_thread.run_sync(lambda: run_cli(env, *args))
    locked.said += [done.stdout, done.stderr]
    return done.returncode


def _mutating_operations(openapi: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (method, path)
        for path, item in openapi["paths"].items()
        for method in item
        if method in MUTATING
    ]


def _bad_credentials(token: str) -> list[dict[str, str]]:
    return [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": token},
        {"X-Api-Token": token},
        {"Cookie": f"token={token}"},
    ]


async def _written(url: str) -> tuple[int, int]:
    rows = await sql(
        url, "SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM batch_files)"
    )
    return int(rows[0][0]), int(rows[0][1])


async def test_passwords_are_really_required(locked: Locked) -> None:
    """The private servers refuse the service's role and Redis without their passwords."""
    url = locked.env["RECONCILER_DATABASE_URL"]
    assert await _refused(url.replace(f":{locked.secrets.postgres}@", ":wrong@"))
    assert await _refused(url.replace(f":{locked.secrets.postgres}@", "@"))
    assert not await _refused(url)
    client = aioredis.Redis(port=locked.redis.port)
    try:
        with pytest.raises(Exception, match=r"(?i)auth"):
            await client.xlen("anything")
    finally:
        await client.aclose()


async def test_no_mutating_call_passes_without_the_token(locked: Locked, fleet: Fleet) -> None:
    """Every POST/PUT/PATCH/DELETE of the OpenAPI document: 401 without the right bearer
    token, however it is mangled, and nothing written; with it, 201."""
    assert await _cli(locked, "migrate") == 0
    port = await started(fleet.start(0, locked.env))
    url = locked.env["RECONCILER_DATABASE_URL"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        operations = _mutating_operations((await http.get("/openapi.json")).json())
        assert ("post", "/api/batches") in operations
        body = {"batch_id": "guarded", "files": [{"file_id": "f", "uri": "u"}]}
        for method, path in operations:
            for headers in _bad_credentials(locked.secrets.token):
                answer = await http.request(method, path, json=body, headers=headers)
                assert answer.status_code == 401, (method, path, headers, answer.text)
            query = await http.request(method, f"{path}?token={locked.secrets.token}", json=body)
            assert query.status_code == 401
        assert await _written(url) == (0, 0)
        good = {"Authorization": f"bearer {locked.secrets.token}"}  # the scheme is case-blind
        assert (await http.post("/api/batches", json=body, headers=good)).status_code == 201


async def _provoke(locked: Locked, http: httpx.AsyncClient) -> list[str]:
    """Errors of every kind the service reports; returns every HTTP body it answered."""
    auth = {"Authorization": f"Bearer {locked.secrets.token}"}
    bodies: list[str] = []
    ok = {"batch_id": "ok", "files": [{"file_id": "f", "uri": "u"}]}
    bodies.append((await http.post("/api/batches", json=ok, headers=auth)).text)
    wide = "".join(chr(0x1F600 + i % 64) + chr(0x1F900 + i % 200) for i in range(512))
    bad = {"files": [{"file_id": wide, "uri": "u"}]}
    bodies.append((await http.post("/api/batches", json=bad, headers=auth)).text)
    bodies.append(await _with_redis_full(locked, http, auth))
    locked.redis.kill()
    bodies += [(await http.get(p)).text for p in ("/readyz", "/api/batches/ok", "/metrics")]
    bodies.append((await http.post("/api/batches", json=ok | {"batch_id": "x"}, headers=auth)).text)
    await anyio.to_thread.run_sync(locked.redis.start)
    await wait_for(lambda: _ready(http), what="ready again")
    bodies += [(await http.get(p)).text for p in ("/metrics", "/api/batches/ok/summary")]
    return bodies


async def _with_redis_full(locked: Locked, http: httpx.AsyncClient, auth: dict[str, str]) -> str:
    """Redis refuses writes (maxmemory reached): a submission fails inside a route."""
    client = aioredis.Redis.from_url(locked.redis.url)
    try:
        await client.config_set("maxmemory", "1")
        answer = await http.post("/api/batches", json={"files": [{"file_id": "g", "uri": "u"}]},
                                 headers=auth)  # fmt: skip
        await client.config_set("maxmemory", "0")
    finally:
        await client.aclose()
    return answer.text


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


async def test_no_secret_shows_in_logs_output_metrics_or_error_bodies(
    locked: Locked, fleet: Fleet
) -> None:
    """Passwords and token configured, then failures provoked (a 500, Redis full, Redis
    gone, bad CLI input): no secret appears in anything the service printed or answered."""
    assert await _cli(locked, "migrate") == 0
    process = fleet.start(0, locked.env)
    port = await started(process)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        bodies = await _provoke(locked, http)
    for args in (("status", "ok"), ("explain", "ok"), ("stuck",), ("status", "missing")):
        await _cli(locked, *args)
    pg_url = locked.env["RECONCILER_DATABASE_URL"]
    await _cli(locked, "status", "ok", RECONCILER_DATABASE_URL=pg_url.replace(
        f":{locked.secrets.postgres}@", f":{locked.secrets.postgres}#x@"))  # fmt: skip
    process.signal(signal.SIGTERM)  # everything it had to say is written once it exits
    await anyio.to_thread.run_sync(process.wait, 30.0)
    said = "\n".join([fleet.output(), *locked.said, *bodies])
    leaks = {name: said.count(value) for name, value in locked.secrets.all().items()}
    assert leaks == {"postgres": 0, "redis": 0, "token": 0}
