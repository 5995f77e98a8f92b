"""The physical floor: pgbench's TPS on the same Postgres, in a throwaway database.

`pgbench -N` runs the simple-update script without its branch and teller updates: a
few statements and one commit per transaction, the cost a design that commits once
per file would pay per file.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from typing import Any, Final

import anyio

from bench.errors import BenchError
from bench.report import note
from bench.scratch import Server, scratch

SECONDS: Final = 15
CLIENTS: Final = 4
THREADS: Final = 2
SCALE: Final = 10
_TPS: Final = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.MULTILINE)
_LATENCY: Final = re.compile(r"^latency average = ([\d.]+) ms", re.MULTILINE)
_DONE: Final = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class BaselineOptions:
    seconds: int = SECONDS
    clients: int = CLIENTS
    threads: int = THREADS
    scale: int = SCALE


def pgbench() -> str:
    found = shutil.which("pgbench")
    if found is None:
        raise BenchError(
            "pgbench not found: install it with `apt-get install -y postgresql-contrib`"
        )
    return found


async def run(server: Server, options: BaselineOptions) -> dict[str, Any]:
    async with scratch(server, "bench_pgbench") as place:
        note(f"pgbench -i -s {options.scale}")
        await _pgbench("-i", "-q", "-s", str(options.scale), place.database_url)
        note(f"pgbench -N -c {options.clients} -j {options.threads} -T {options.seconds}")
        out = await _pgbench(
            "-N", "-c", str(options.clients), "-j", str(options.threads),
            "-T", str(options.seconds), place.database_url,
        )  # fmt: skip
    return {"benchmark": "baseline", **parse(out), **_described(options)}


async def _pgbench(*args: str) -> str:
    done = await anyio.run_process([pgbench(), *args], check=False)
    if done.returncode != 0:
        raise BenchError(f"pgbench {args[0]} failed: {done.stderr.decode()[-2000:]}")
    return done.stdout.decode()


def parse(out: str) -> dict[str, float]:
    """TPS, mean latency and transaction count from pgbench's report."""
    tps, latency, done = _TPS.search(out), _LATENCY.search(out), _DONE.search(out)
    if tps is None or latency is None or done is None:
        raise BenchError(f"cannot read pgbench's report:\n{out[-2000:]}")
    return {
        "pgbench_tps": float(tps.group(1)),
        "latency_ms_avg": float(latency.group(1)),
        "transactions": int(done.group(1)),
    }


def _described(options: BaselineOptions) -> dict[str, Any]:
    return {
        "command": f"pgbench -N -c {options.clients} -j {options.threads} -T {options.seconds}",
        "clients": options.clients,
        "threads": options.threads,
        "seconds": options.seconds,
        "scale": options.scale,
    }
