"""`versus-bullmq`: our service and the BullMQ flows peer, alternately, in one run.

Both sides get the same batches x files of no-op work. On a shared machine the load
drifts, so the sides alternate (the order flips every round) and medians are reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench import peer, throughput
from bench.report import note, ratio
from bench.scratch import Server

SIDES: Final = ("ours", "bullmq")


@dataclass(frozen=True, slots=True)
class VersusOptions:
    batches: int
    files: int
    rounds: int = 2
    child_concurrency: int = peer.CHILD_CONCURRENCY
    parent_concurrency: int = peer.PARENT_CONCURRENCY
    timeout_s: float = 600.0
    log_dir: Path = Path(".")


async def run(server: Server, options: VersusOptions) -> dict[str, Any]:
    """Installs the peer if needed, runs the rounds, returns the JSON figures."""
    peer.ensure_installed()
    rounds = [await _round(server, options, index) for index in range(options.rounds)]
    return _figures(options, rounds)


def order(index: int) -> tuple[str, str]:
    """ours first in even rounds, BullMQ first in odd ones: neither always goes first."""
    return SIDES if index % 2 == 0 else (SIDES[1], SIDES[0])


async def _round(server: Server, options: VersusOptions, index: int) -> dict[str, Any]:
    figures: dict[str, dict[str, Any]] = {}
    for side in order(index):
        note(f"round {index + 1}/{options.rounds}: {side}, {options.batches} x {options.files}")
        if side == "ours":
            figures[side] = ours_summary(await throughput.run(server, _ours(options, index)))
        else:
            figures[side] = peer_summary(await peer.run(_peer(options), server.redis_url))
        note(f"{side}: {figures[side]['files_per_s']} files/s")
    return {"round": index + 1, "order": list(order(index)), **figures}


def _ours(options: VersusOptions, index: int) -> throughput.ThroughputOptions:
    log_dir = options.log_dir / f"round-{index + 1}"
    log_dir.mkdir(parents=True, exist_ok=True)
    return throughput.ThroughputOptions(
        batches=options.batches, files=options.files, handler="noop",
        timeout_s=options.timeout_s, log_dir=log_dir,
    )  # fmt: skip


def _peer(options: VersusOptions) -> peer.PeerOptions:
    return peer.PeerOptions(
        batches=options.batches, files=options.files,
        child_concurrency=options.child_concurrency,
        parent_concurrency=options.parent_concurrency, timeout_s=options.timeout_s,
    )  # fmt: skip


def ours_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one `throughput` run that have a counterpart on the peer's side."""
    return {
        **_shared(result, result["cpu"]["host_busy_pct"], result["cpu"]["others_s"]),
        "host_steal_s": result["cpu"].get("host_steal_s"),
        "ok": bool(result["checks"]["ok"]),
        "checks": result["checks"],
        "logs": result["logs"],
    }


def peer_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The peer's JSON line, with a CPU total per file that matches ours."""
    cpu = result["cpu_s"]
    return {
        **_shared(result, cpu["host_busy_pct"], _others_s(cpu)),
        "host_steal_s": cpu.get("host_steal_s"),
        "ok": bool(result["checks"]["ok"]) and result["exit_code"] == 0,
        "checks": result["checks"],
        "bullmq": result["bullmq"],
        "node": result["node"],
        "command": result["command"],
    }


def _shared(result: dict[str, Any], host_busy_pct: float, others_s: float | None) -> dict[str, Any]:
    """The figures both sides report under the same names."""
    per_file = result["cpu_us_per_file"]
    return {
        "files_per_s": result["files_per_s"],
        "wall_s": result["wall_s"],
        "submit_s": result["submit_s"],
        "finalize_latency_ms": result["finalize_latency_ms"],
        "cpu_us_per_file": {**per_file, "total": _total(per_file.values())},
        "host_busy_pct": host_busy_pct,
        "others_s": others_s,
        "peak_rss_mb": result["peak_rss_mb"],
    }


def _others_s(spent: dict[str, float | None]) -> float | None:
    """Busy core-seconds of the host not spent by Node or Redis: the other tenants."""
    parts = [spent["host_busy_s"], spent["node"], spent["redis"]]
    if any(part is None for part in parts):
        return None
    busy, node, redis = (part or 0.0 for part in parts)
    return round(busy - node - redis, 3)


def _total(parts: Any) -> float | None:
    """CPU of every program on that side; None when one of them could not be read."""
    values = list(parts)
    return None if any(v is None for v in values) else round(sum(values), 1)


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _medians(rounds: list[dict[str, Any]], side: str) -> dict[str, Any]:
    figures = [r[side] for r in rounds]
    cpu_parts = figures[0]["cpu_us_per_file"].keys()
    return {
        "files_per_s": _median([f["files_per_s"] for f in figures]),
        "finalize_latency_ms": {
            "p50": _median([_latency(f)["p50"] for f in figures]),
            "p99": _median([_latency(f)["p99"] for f in figures]),
        },
        "cpu_us_per_file": {
            part: _median([f["cpu_us_per_file"][part] for f in figures]) for part in cpu_parts
        },
    }


def _latency(figures: dict[str, Any]) -> dict[str, float | None]:
    """Ours reports latency per finalization trigger; under load all come by event."""
    latency = figures["finalize_latency_ms"]
    found = latency.get("event", latency)
    return {"p50": found.get("p50"), "p99": found.get("p99")}


def _figures(options: VersusOptions, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    medians = {side: _medians(rounds, side) for side in SIDES}
    ours, theirs = medians["ours"], medians["bullmq"]
    return {
        "benchmark": "versus-bullmq",
        "batches": options.batches,
        "files": options.batches * options.files,
        "rounds": options.rounds,
        "ratio": ratio(ours["files_per_s"] or 0.0, theirs["files_per_s"] or 0.0),
        "cpu_per_file_ratio": ratio(
            ours["cpu_us_per_file"]["total"] or 0.0, theirs["cpu_us_per_file"]["total"] or 0.0
        ),
        "medians": medians,
        "peer": {
            "child_concurrency": options.child_concurrency,
            "parent_concurrency": options.parent_concurrency,
            "submitters": peer.SUBMITTERS,
        },
        "per_round": rounds,
        "checks": _checks(rounds),
    }


def _checks(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """ok when both sides finished every batch, exactly once, in every round."""
    per_round = [{side: r[side]["ok"] for side in SIDES} for r in rounds]
    return {"ok": all(all(r.values()) for r in per_round), "per_round": per_round}
