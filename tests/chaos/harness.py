"""What the chaos scenarios share: run sizes, private servers, replica fleets, the audit.

The audit counts from Postgres and Redis afterwards: batches finalized, summary rows,
files counted in summaries against the rows, jobs left in the consumer group. Each
scenario appends one JSON line to $RECONCILER_CHAOS_REPORT when it is set, which is
where the table in docs/RELIABILITY.md comes from.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import redis.asyncio as aioredis
import redis.exceptions

from reconciler.embedded import EmbeddedServer, embedded_postgres
from tests.acceptance.processes import ServiceProcess
from tests.helpers import sql

LONG: Final = os.environ.get("RECONCILER_CHAOS_LONG") == "1"
REPORT_ENV: Final = "RECONCILER_CHAOS_REPORT"
POLL_S: Final = 0.05
REDIS_START_TIMEOUT_S: Final = 15.0


@dataclass(frozen=True)
class Size:
    """How big a run is: the short form in CI, the long form by RECONCILER_CHAOS_LONG=1."""

    form: str
    replicas: int
    batches: int
    files: int
    fault_every_s: float
    fault_window_s: float
    settle_timeout_s: float
    test_timeout_s: float


SHORT_SIZE: Final = Size("short", 3, 40, 10, 1.0, 8.0, 30.0, 110.0)
LONG_SIZE: Final = Size("long", 3, 500, 20, 2.0, 90.0, 300.0, 900.0)
SIZE: Final = LONG_SIZE if LONG else SHORT_SIZE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- private servers -----------------------------------------------------------------


class PrivateRedis:
    """A redis-server of our own on a fixed port, keeping nothing on disk."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        log = (self.directory / f"redis-{self.starts}.log").open("wb")
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.directory)]
        argv += ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _wait_until(self._answers, REDIS_START_TIMEOUT_S, "private redis to answer")

    def kill(self) -> None:
        """SIGKILL: whatever it held is gone, as on a cache node that lost power."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.5) as sock:
                hello = f"AUTH {self.password}\r\nPING\r\n" if self.password else "PING\r\n"
                sock.sendall(hello.encode())
                return b"PONG" in _read_some(sock)
        except OSError:
            return False


def _read_some(sock: socket.socket) -> bytes:
    sock.settimeout(0.5)
    data = b""
    deadline = time.monotonic() + 1.0
    while b"PONG" not in data and b"ERR" not in data and time.monotonic() < deadline:
        chunk = sock.recv(256)
        if not chunk:
            break
        data += chunk
    return data


def _wait_until(ready: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_S)


@contextmanager
def private_redis(directory: Path, password: str | None = None) -> Iterator[PrivateRedis]:
    server = PrivateRedis(directory, password)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class PrivatePostgres:
    """An embedded Postgres of our own that can be stopped and started again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stack: ExitStack | None = None
        self.server: EmbeddedServer | None = None

    def start(self) -> EmbeddedServer:
        self._stack = ExitStack()
        self.server = self._stack.enter_context(embedded_postgres(self.directory))
        return self.server

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self.server = None, None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url


# -- replicas ------------------------------------------------------------------------


@dataclass
class Fleet:
    """Numbered `reconciler run` replicas; each (re)start writes its own log file."""

    env: dict[str, str]
    log_dir: Path
    processes: dict[int, ServiceProcess] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)
    starts: int = 0

    def start(self, index: int, env: dict[str, str] | None = None) -> ServiceProcess:
        self.starts += 1
        log = self.log_dir / f"replica-{index}-{self.starts}.log"
        self.logs.append(log)
        process = ServiceProcess(env or self.env, log)
        self.processes[index] = process
        return process

    def kill(self, index: int) -> None:
        process = self.processes.pop(index)
        process.signal(signal.SIGKILL)
        process.wait(10)
        process.close()

    def close(self) -> None:
        for process in self.processes.values():
            process.close()
        self.processes.clear()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for log in self.logs:
            found += [e for e in read_events(log) if name is None or e.get("event") == name]
        return found

    def output(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs if log.exists())


def read_events(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            found.append(event)
    return found


async def wait_for_event(
    process: ServiceProcess, name: str, timeout_s: float = 30.0
) -> dict[str, Any]:
    """Waits, without blocking the loop, for the process to log `name`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in read_events(process.log_path):
            if event.get("event") == name:
                return event
        if process.proc.poll() is not None:
            break
        await anyio.sleep(POLL_S)
    tail = process.log_path.read_text(errors="replace")[-3000:]
    raise AssertionError(f"no {name!r} event within {timeout_s} s; log tail:\n{tail}")


async def started(process: ServiceProcess) -> int:
    """Waits until the replica serves HTTP and its consumer reads; returns the port."""
    event = await wait_for_event(process, "api_listening")
    await wait_for_event(process, "consumer_started")
    return int(event["port"])


def finalized_twice(events: list[dict[str, Any]]) -> list[str]:
    """Batches that more than one `batch_finalized` event claims."""
    seen = Counter(e["batch_id"] for e in events if e.get("event") == "batch_finalized")
    return sorted(batch for batch, n in seen.items() if n > 1)


# -- the audit -----------------------------------------------------------------------

_MISMATCHES: Final = """
SELECT b.batch_id FROM batches b
LEFT JOIN run_summaries s USING (batch_id)
LEFT JOIN (
    SELECT batch_id, count(*) AS n,
           count(*) FILTER (WHERE status = 'succeeded') AS ok,
           count(*) FILTER (WHERE status = 'failed') AS bad
    FROM batch_files GROUP BY batch_id
) f USING (batch_id)
WHERE b.status <> 'processing' AND (
      s.batch_id IS NULL OR s.status <> b.status
   OR b.files_succeeded <> coalesce(f.ok, 0) OR b.files_failed <> coalesce(f.bad, 0)
   OR coalesce(f.n, 0) <> b.total_files OR s.total_files <> b.total_files
   OR s.files_succeeded <> b.files_succeeded OR s.files_failed <> b.files_failed)
ORDER BY 1
"""

_TOTALS: Final = """
SELECT (SELECT count(*) FROM batches) AS batches,
       (SELECT count(*) FROM batches WHERE status <> 'processing') AS finalized,
       (SELECT count(*) FROM run_summaries) AS summaries,
       (SELECT count(*) FROM batch_files) AS files,
       (SELECT count(*) FROM batch_files WHERE status IN ('succeeded', 'failed')) AS terminal,
       (SELECT count(*) FROM batch_files WHERE status = 'failed') AS failed,
       (SELECT coalesce(sum(files_succeeded + files_failed), 0) FROM run_summaries)
           AS summarized,
       (SELECT max(completed_at) FROM batches) AS last_completed_at
"""


_STRAGGLERS: Final = """
SELECT batch_id, file_id, status, attempts, worker,
       round(extract(epoch FROM lease_expires_at - now())::numeric, 1) AS lease_left_s
FROM batch_files WHERE status IN ('pending', 'processing')
ORDER BY batch_id, file_id LIMIT 10
"""


@dataclass(frozen=True)
class Audit:
    batches: int
    finalized: int
    summaries: int
    files: int
    terminal: int
    failed: int
    summarized: int
    last_completed_at: dt.datetime | None
    mismatches: list[str]
    pending_in_group: int
    stream_length: int
    stragglers: list[str]

    @property
    def lost(self) -> int:
        """Files never counted: not terminal, or terminal but missing from a summary."""
        return self.files - min(self.terminal, self.summarized)

    @property
    def duplicated(self) -> int:
        """Files counted more than once, summaries beyond one per batch, bad counters."""
        extra_counts = max(0, self.summarized - self.terminal)
        return extra_counts + max(0, self.summaries - self.batches) + len(self.mismatches)

    def settled(self) -> bool:
        return self.finalized == self.batches and self.summaries == self.batches


async def audit(database_url: str, redis_url: str, namespace: str) -> Audit:
    row = (await sql(database_url, _TOTALS))[0]
    mismatches = [r[0] for r in await sql(database_url, _MISMATCHES)]
    stragglers = [" ".join(map(str, r)) for r in await sql(database_url, _STRAGGLERS)]
    pending, length = await queue_counts(redis_url, namespace)
    return Audit(
        batches=row["batches"], finalized=row["finalized"], summaries=row["summaries"],
        files=row["files"], terminal=row["terminal"], failed=row["failed"],
        summarized=int(row["summarized"]), last_completed_at=row["last_completed_at"],
        mismatches=mismatches, pending_in_group=pending, stream_length=length,
        stragglers=stragglers,
    )  # fmt: skip


async def queue_counts(redis_url: str, namespace: str) -> tuple[int, int]:
    """Jobs pending in the consumer group, and entries left on the job stream."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        length = int(await client.xlen(f"{namespace}:jobs"))
        try:
            info = await client.xpending(f"{namespace}:jobs", f"{namespace}:workers")
        except redis.exceptions.ResponseError:
            return 0, length  # no group: nothing can be pending in it
        return int(info["pending"]), length
    finally:
        await client.aclose()


async def settled_audit(
    database_url: str, redis_url: str, namespace: str, timeout_s: float
) -> Audit:
    """Waits until every batch is finalized and the group is drained; returns the audit."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await audit(database_url, redis_url, namespace)
        drained = found.pending_in_group == 0 and found.stream_length == 0
        if (found.settled() and drained) or time.monotonic() > deadline:
            return found
        await anyio.sleep(0.2)


def assert_nothing_lost_or_duplicated(found: Audit) -> None:
    assert found.finalized == found.batches, f"unfinalized batches: {found}"
    assert found.summaries == found.batches, f"one run_summaries row per batch: {found}"
    assert found.terminal == found.files, f"every file terminal: {found}"
    assert found.summarized == found.files, f"every file counted once in a summary: {found}"
    assert found.mismatches == [], f"counters disagree with the rows: {found.mismatches[:10]}"
    assert (found.pending_in_group, found.stream_length) == (0, 0), f"jobs left: {found}"


async def first_finished_after(database_url: str, moment: float) -> float | None:
    """Seconds from `moment` (epoch) to the first file finished after it: work resumed."""
    rows = await sql(
        database_url,
        "SELECT extract(epoch FROM min(finished_at)) FROM batch_files"
        " WHERE finished_at > to_timestamp($1)",
        moment,
    )
    first = rows[0][0]
    return None if first is None else round(float(first) - moment, 2)


def seconds_since(moment: float, later: dt.datetime | None) -> float | None:
    return None if later is None else round(later.timestamp() - moment, 2)


def journal_counts(journal: Path) -> Counter[tuple[str, str]]:
    """How many times the handler ran for each (batch, file)."""
    if not journal.exists():
        return Counter()
    lines = journal.read_text().splitlines()
    return Counter((line.split("\t")[0], line.split("\t")[1]) for line in lines if line)


def report(scenario: str, **fields: Any) -> None:
    """Appends this run's numbers to $RECONCILER_CHAOS_REPORT, when set."""
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    line = {"scenario": scenario, "form": SIZE.form, "at": utc_now().isoformat(), **fields}
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line, default=str) + "\n")


def audit_fields(found: Audit) -> dict[str, Any]:
    kept = asdict(found)
    kept.pop("mismatches")
    kept.pop("stragglers")
    return {**kept, "lost": found.lost, "duplicated": found.duplicated}
