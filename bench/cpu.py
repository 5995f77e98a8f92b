"""CPU time from /proc: the host, this run's Postgres backends, Redis, the harness, and
the benchmark's other processes when it has them (the webhook receiver, the poster).

On a small shared machine the service, Postgres and Redis compete for the same cores
with whatever else runs there; these figures say who used them during a run. Postgres
time counts only the backends connected to the run's own database (found by their
process title, sampled while they live), so other databases on the server do not
count; Redis is one process shared by every namespace, so its figure includes others.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from urllib.parse import urlsplit

import redis.asyncio as aioredis


class CpuMeter:
    """Started before a run, polled during it, read at its end."""

    def __init__(
        self, database: str, redis_pid: int | None, others: dict[str, int] | None = None
    ) -> None:
        self._title = f" {database} ".encode()
        self._seen: dict[int, bool] = {}  # pid -> whether it is one of our backends
        self._redis_pid = redis_pid
        self._others = dict(others or {})  # name -> pid: the receiver, the poster
        self._start = _host(), _harness_s(), _optional_s(redis_pid)
        self._others_start = {name: _optional_s(pid) for name, pid in self._others.items()}
        self._backends_start = self._backends()
        self._backends_last = dict(self._backends_start)

    @classmethod
    async def start(
        cls, database_url: str, redis_url: str, others: dict[str, int] | None = None
    ) -> CpuMeter:
        database = urlsplit(database_url).path.lstrip("/")
        return cls(database, await _redis_pid(redis_url), others)

    @property
    def backend_pids(self) -> frozenset[int]:
        """The backends of the database seen so far."""
        return frozenset(self._backends_last)

    def poll(self) -> None:
        """Records the CPU time of this database's backends, before any of them exits."""
        self._backends_last.update(self._backends())

    def usage(self) -> dict[str, float | None]:
        """CPU seconds of each program since the start; host busy seconds and share."""
        self.poll()
        (busy0, steal0, total0), harness0, redis0 = self._start
        busy, steal, total = _host()
        redis = _optional_s(self._redis_pid)
        start = self._backends_start
        postgres = sum(
            v[0] - start.get(pid, (0.0, 0.0))[0] for pid, v in self._backends_last.items()
        )
        postgres_sys = sum(
            v[1] - start.get(pid, (0.0, 0.0))[1] for pid, v in self._backends_last.items()
        )
        return {
            "postgres_s": round(postgres, 3),
            "postgres_sys_s": round(postgres_sys, 3),
            "redis_s": None if redis is None or redis0 is None else round(redis - redis0, 3),
            "harness_s": round(_harness_s() - harness0, 3),
            **{f"{name}_s": self._other_s(name) for name in self._others},
            "host_busy_s": round(busy - busy0, 3),
            "host_steal_s": round(steal - steal0, 3),
            "host_busy_pct": round(100 * (busy - busy0) / (total - total0), 1)
            if total > total0
            else 0.0,
        }

    def _other_s(self, name: str) -> float | None:
        now, start = _optional_s(self._others[name]), self._others_start[name]
        return None if now is None or start is None else round(now - start, 3)

    def _backends(self) -> dict[int, tuple[float, float]]:
        """CPU seconds (all, and of them in the kernel) of each live backend of the
        database. A process's title is read until it says what the process is, then
        remembered: a backend serves one database for life, and the polls run every
        0.1 s while the run uses the host (reading every title on each poll cost 2.4 ms)."""
        found: dict[int, tuple[float, float]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            backend = self._seen.get(pid)
            if backend is None:
                backend = self._is_backend(pid)
                if backend is not None:
                    self._seen[pid] = backend
            stat = _stat(pid) if backend else None
            if stat is not None:
                user, kernel = int(stat[11]) / _ticks(), int(stat[12]) / _ticks()
                found[pid] = (user + kernel, kernel)
        return found

    def _is_backend(self, pid: int) -> bool | None:
        """None while it cannot tell: a backend just forked still has the server's
        command line until it has set its title."""
        try:
            title = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            return None
        if title.startswith(b"postgres: "):
            return self._title in title
        return None if b"postgres" in title else False


async def _redis_pid(url: str) -> int | None:
    client = aioredis.Redis.from_url(url)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    pid = int(info.get("process_id", 0))
    return pid if pid and _stat(pid) is not None else None


def process_s(pid: int) -> tuple[float, float]:
    """User and system CPU time of a live process, all its threads, in seconds."""
    stat = _stat(pid)
    if stat is None:
        raise ProcessLookupError(pid)
    return int(stat[11]) / _ticks(), int(stat[12]) / _ticks()


def _optional_s(pid: int | None) -> float | None:
    stat = _stat(pid) if pid else None
    return None if stat is None else (int(stat[11]) + int(stat[12])) / _ticks()


def _host() -> tuple[float, float, float]:
    return host_times(Path("/proc/stat").read_text(), _ticks())


def host_times(stat: str, ticks: int) -> tuple[float, float, float]:
    """Busy, stolen and total CPU seconds of the host from /proc/stat's first line.
    Steal (the eighth field) is time the hypervisor gave to something else: a virtual
    CPU waiting for its host is neither busy here nor idle. Guest time is already
    counted in user."""
    fields = [int(v) for v in stat.split("\n", 1)[0].split()[1:9]]
    total = sum(fields)
    idle, steal = fields[3] + fields[4], fields[7]
    return (total - idle - steal) / ticks, steal / ticks, total / ticks


def _harness_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the name (state first), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _ticks() -> int:
    return os.sysconf("SC_CLK_TCK")
