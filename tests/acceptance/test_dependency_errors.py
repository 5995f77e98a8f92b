"""Misconfigured Redis URLs end in messages a person can act on, from real processes."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
import redis as sync_redis

from reconciler.app import Ports
from tests.acceptance.processes import run_cli, service_process, with_env
from tests.helpers import wait_for

# Well under the drain timeout (25 s): a consumer that never started has nothing to drain.
STOP_WITHIN_S = 10.0


async def test_rediss_against_a_plain_port_names_tls(service_env: dict[str, str]) -> None:
    """A rediss:// URL at a plain Redis port fails with a line naming TLS as the cause."""
    plain = urlsplit(service_env["RECONCILER_REDIS_URL"])
    tls_url = plain._replace(scheme="rediss").geturl()
    env = with_env(service_env, RECONCILER_REDIS_URL=tls_url)
    done = await anyio.to_thread.run_sync(lambda: run_cli(env, "dead-letters"))
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "Timeout connecting to server over TLS" in line
    assert "does not speak TLS" in line and "redis://" in line


@pytest.fixture
def redis_user(service_env: dict[str, str]) -> Iterator[str]:
    """A Redis ACL user of this test alone, whose password is `right-password`."""
    name = f"ops-{uuid.uuid4().hex[:12]}"
    client = sync_redis.Redis.from_url(service_env["RECONCILER_REDIS_URL"])
    client.acl_setuser(
        name,
        enabled=True,
        passwords=["+right-password"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    try:
        yield name
    finally:
        client.acl_deluser(name)
        client.close()


def _with_password(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}").geturl()


async def test_wrong_redis_password_logs_the_cause_at_each_backoff_step(
    service_env: dict[str, str], ports: Ports, redis_user: str, tmp_path: Path
) -> None:
    """`run` with a wrong password logs authentication per retry, not crashes; /readyz 503."""
    url = _with_password(service_env["RECONCILER_REDIS_URL"], redis_user, "wrong-password")
    env = with_env(service_env, RECONCILER_REDIS_URL=url)
    with service_process(env, tmp_path / "service.log") as proc:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proc.port}") as http:
            await wait_for(lambda: _waits(proc.events()), what="two backoff steps logged")
            ready = await http.get("/readyz")
        proc.signal(signal.SIGTERM)
        started = time.monotonic()
        assert await anyio.to_thread.run_sync(lambda: proc.wait(STOP_WITHIN_S)) == 0
    assert time.monotonic() - started < STOP_WITHIN_S  # no drain to wait for
    assert ready.status_code == 503
    assert "authentication failed" in json.dumps(ready.json())
    events = proc.events()
    steps = [e for e in events if e.get("event") == "actor_waiting_for_dependency"]
    assert {(e["actor"], e["cause"]) for e in steps} == {("consumer", "authentication")}
    assert "check the user name and password" in steps[0]["error"]
    assert not [e for e in events if e.get("event") == "actor_crashed"]
    assert "wrong-password" not in (tmp_path / "service.log").read_text()


async def _waits(events: list[dict[str, object]]) -> bool:
    return sum(e.get("event") == "actor_waiting_for_dependency" for e in events) >= 2
