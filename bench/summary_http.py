"""Load on GET /api/batches/{id}/summary of a finalized batch, with wrk.

wrk comes from Debian (`apt-get install -y wrk`); it shares the machine's cores with
the service, Postgres and Redis, which the figures include.
"""

from __future__ import annotations

import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio

from bench.errors import BenchError
from bench.report import note
from bench.scratch import Scratch, Server, migrate, scratch
from bench.service import SWEEP_INTERVAL_S, ServiceProcess, running, service_env
from reconciler.client import Client, FileSpec
from reconciler.config import Settings

SECONDS: Final = 15
CONNECTIONS: Final = 32
THREADS: Final = 2
FILES: Final = 10
BATCH_ID: Final = "bench-summary"
_UNITS_MS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_PERCENTILE: Final = re.compile(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_RATE: Final = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL: Final = re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m)", re.MULTILINE)
_NON_2XX: Final = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET: Final = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True, slots=True)
class HttpOptions:
    seconds: int = SECONDS
    connections: int = CONNECTIONS
    threads: int = THREADS
    files: int = FILES
    log_dir: Path = Path(".")


def wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise BenchError("wrk not found: install it with `apt-get install -y wrk`")
    return found


async def run(server: Server, options: HttpOptions) -> dict[str, Any]:
    async with scratch(server) as place:
        migrate(place)
        env = service_env(place, "noop", None, SWEEP_INTERVAL_S)
        with running(env, options.log_dir) as services:
            url = await _finalized_batch_url(place, services[0], options.files)
            out = await _load(url, options)
            rss = round(services[0].peak_rss_mb(), 1)
    return {"benchmark": "summary-http", **parse(out), "peak_rss_mb": rss, **_described(options)}


async def _finalized_batch_url(place: Scratch, service: ServiceProcess, files: int) -> str:
    settings = Settings(
        database_url=place.database_url, redis_url=place.redis_url, namespace=place.namespace
    )
    specs = [FileSpec(f"file-{i:04d}", f"bench://summary/{i}") for i in range(files)]
    async with Client.open(settings) as client:
        await client.submit(specs, batch_id=BATCH_ID)
        await client.wait(BATCH_ID, timeout_s=60.0)
    url = f"http://127.0.0.1:{service.wait_ready()}/api/batches/{BATCH_ID}/summary"
    status = await anyio.to_thread.run_sync(_status_of, url)
    if status != 200:
        raise BenchError(f"GET {url} answered {status}, not 200")
    return url


def _status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def _load(url: str, options: HttpOptions) -> str:
    command = [wrk(), f"-t{options.threads}", f"-c{options.connections}",
               f"-d{options.seconds}s", "--latency", url]  # fmt: skip
    note(" ".join(command))
    done = await anyio.run_process(command, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed: {done.stderr.decode()[-2000:]}")
    note(done.stdout.decode())
    return done.stdout.decode()


def parse(out: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms) and errors from wrk's --latency report."""
    rate, total = _RATE.search(out), _TOTAL.search(out)
    if rate is None or total is None:
        raise BenchError(f"cannot read wrk's report:\n{out[-2000:]}")
    latency = {f"p{p}": round(float(v) * _UNITS_MS[u], 3) for p, v, u in _PERCENTILE.findall(out)}
    non_2xx = _NON_2XX.search(out)
    sockets = _SOCKET.search(out)
    return {
        "requests_per_s": float(rate.group(1)),
        "requests": int(total.group(1)),
        "latency_ms": latency,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(int(n) for n in sockets.groups()) if sockets else 0,
    }


def _described(options: HttpOptions) -> dict[str, Any]:
    return {
        "command": (
            f"wrk -t{options.threads} -c{options.connections} -d{options.seconds}s --latency"
        ),
        "connections": options.connections,
        "threads": options.threads,
        "seconds": options.seconds,
    }
