"""`webhook`: throughput with one webhook subscribed vs none, alternately, in one run.

Both sides run the same batches x files of no-op work; the webhook side subscribes a
local receiver (its own process, answering 200 at once) and also reports the delivery latency,
finalization -> 2xx recorded. On a shared machine the load drifts, so the sides
alternate (the order flips every round) and medians and spreads are reported. The
`drop` compares the medians of the two sides; `drop_paired` is the median of each
round's own ratio, which a host whose speed drifts from round to round moves less.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench import throughput
from bench.receiver import Receiver, receiving
from bench.report import note
from bench.scratch import Server

SIDES: Final = ("none", "webhook")
MAX_DROP: Final = 0.05  # issue 12: at most 5 % fewer files/s with one webhook
MAX_P99_MS: Final = 100.0


@dataclass(frozen=True, slots=True)
class WebhookOptions:
    batches: int
    files: int
    rounds: int = 3
    timeout_s: float = 600.0
    log_dir: Path = Path(".")


def order(index: int) -> tuple[str, str]:
    """Without first in even rounds, with first in odd ones."""
    return SIDES if index % 2 == 0 else (SIDES[1], SIDES[0])


async def run(server: Server, options: WebhookOptions) -> dict[str, Any]:
    with receiving() as receiver:
        rounds = []
        for index in range(options.rounds):
            figures: dict[str, dict[str, Any]] = {}
            for side in order(index):
                note(f"round {index + 1}/{options.rounds}: {side}")
                sink = receiver if side == "webhook" else None
                result = await throughput.run(server, _options(options, index, side, sink))
                figures[side] = summary(result)
                note(f"{side}: {figures[side]['files_per_s']} files/s")
            rounds.append({"round": index + 1, "order": list(order(index)), **figures})
        duplicates = sum(n - 1 for n in receiver.acknowledged.values() if n > 1)
    return figures_of(options, rounds, duplicates)


def _options(
    options: WebhookOptions, index: int, side: str, receiver: Receiver | None
) -> throughput.ThroughputOptions:
    log_dir = options.log_dir / f"round-{index + 1}-{side}"
    log_dir.mkdir(parents=True, exist_ok=True)
    return throughput.ThroughputOptions(
        batches=options.batches, files=options.files, handler="noop",
        timeout_s=options.timeout_s, log_dir=log_dir, receiver=receiver,
    )  # fmt: skip


def summary(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "files_per_s": result["files_per_s"],
        "wall_s": result["wall_s"],
        "service_cpu_us_per_file": result["cpu_us_per_file"]["service"],
        "cpu_us_per_file": result["cpu_us_per_file"],
        "delivery_latency_ms": result["delivery_latency_ms"],
        "delivery_recorded_ms": result["delivery_recorded_ms"],
        "ok": result["checks"]["ok"],
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


def figures_of(
    options: WebhookOptions, rounds: list[dict[str, Any]], duplicates: int = 0
) -> dict[str, Any]:
    """Medians and spreads per side, the drop, and the delivery latency percentiles."""
    rates = {side: [float(r[side]["files_per_s"] or 0.0) for r in rounds] for side in SIDES}
    p99s = [float(r["webhook"]["delivery_latency_ms"]["p99"]) for r in rounds]
    p50s = [float(r["webhook"]["delivery_latency_ms"]["p50"]) for r in rounds]
    base = statistics.median(rates["none"])
    drop = 1.0 - statistics.median(rates["webhook"]) / base if base else 0.0
    # Each round's two sides ran seconds apart: their ratio cancels the host's drift
    # between rounds, which the ratio of the medians does not.
    paired = [w / n for n, w in zip(rates["none"], rates["webhook"], strict=True) if n]
    drop_paired = 1.0 - statistics.median(paired) if paired else 0.0
    ok = all(r[side]["ok"] for r in rounds for side in SIDES) and duplicates == 0
    return {
        "benchmark": "webhook",
        "batches": options.batches,
        "files": options.batches * options.files,
        "rounds": rounds,
        "files_per_s": {side: _spread(rates[side]) for side in SIDES},
        "drop": round(drop, 4),
        "drop_paired": round(drop_paired, 4),
        "delivery_latency_ms": {"p50": _spread(p50s), "p99": _spread(p99s)},
        "checks": {
            "ok": ok,
            "duplicate_acknowledgements": duplicates,
            "drop_within_5_percent": drop <= MAX_DROP,
            "p99_within_100_ms": max(p99s) <= MAX_P99_MS,
        },
    }
