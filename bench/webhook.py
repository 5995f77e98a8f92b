"""`webhook`: throughput with one webhook subscribed vs none, alternately, in one run.

Both sides run the same batches x files of no-op work; the webhook side subscribes a
local receiver (its own process, answering 200 at once) and also reports the delivery latency,
finalization -> 2xx recorded. On a shared machine the load drifts, so the sides
alternate (the order flips every round) and medians and spreads are reported. The
`drop` compares the medians of the two sides; `drop_paired` is the median of each
round's own ratio, which a host whose speed drifts from round to round moves less.

With `floor`, a third side runs no webhook either, while `bench.poster` posts one event
of the same size to the same receiver per finalization: the POST and the receiver's
work alone, without anything the service writes or keeps for a delivery. Its drop
(`floor_drop`, `floor_drop_paired`) is what any design that posts each event to a
receiver on this host costs before it records anything.
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
FLOOR: Final = "posts"  # the third side of `floor`
MAX_DROP: Final = 0.05  # issue 12: at most 5 % fewer files/s with one webhook
MAX_P99_MS: Final = 100.0


@dataclass(frozen=True, slots=True)
class WebhookOptions:
    batches: int
    files: int
    rounds: int = 3
    timeout_s: float = 600.0
    log_dir: Path = Path(".")
    floor: bool = False

    @property
    def sides(self) -> tuple[str, ...]:
        return (*SIDES, FLOOR) if self.floor else SIDES


def order(index: int, sides: tuple[str, ...] = SIDES) -> tuple[str, ...]:
    """The sides rotated by one every round: with two, the order flips every round."""
    turn = index % len(sides)
    return sides[turn:] + sides[:turn]


async def run(server: Server, options: WebhookOptions) -> dict[str, Any]:
    with receiving() as receiver:
        rounds = []
        for index in range(options.rounds):
            figures: dict[str, dict[str, Any]] = {}
            sides = order(index, options.sides)
            for side in sides:
                note(f"round {index + 1}/{options.rounds}: {side}")
                result = await throughput.run(server, _options(options, index, side, receiver))
                figures[side] = summary(result)
                note(f"{side}: {figures[side]['files_per_s']} files/s")
            rounds.append({"round": index + 1, "order": list(sides), **figures})
        duplicates = sum(n - 1 for n in receiver.acknowledged.values() if n > 1)
    return figures_of(options, rounds, duplicates)


def _options(
    options: WebhookOptions, index: int, side: str, receiver: Receiver
) -> throughput.ThroughputOptions:
    log_dir = options.log_dir / f"round-{index + 1}-{side}"
    log_dir.mkdir(parents=True, exist_ok=True)
    return throughput.ThroughputOptions(
        batches=options.batches, files=options.files, handler="noop",
        timeout_s=options.timeout_s, log_dir=log_dir,
        receiver=receiver if side == "webhook" else None,
        poster=receiver if side == FLOOR else None,
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


def _drops(base: list[float], other: list[float]) -> tuple[float, float]:
    """1 - the ratio of the medians, and 1 - the median of each round's own ratio."""
    median = statistics.median(base)
    drop = 1.0 - statistics.median(other) / median if median else 0.0
    # Each round's sides ran seconds apart: their ratio cancels the host's drift between
    # rounds, which the ratio of the medians does not.
    paired = [o / b for b, o in zip(base, other, strict=True) if b]
    return drop, (1.0 - statistics.median(paired) if paired else 0.0)


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
    sides = options.sides
    rates = {side: [float(r[side]["files_per_s"] or 0.0) for r in rounds] for side in sides}
    p99s = [float(r["webhook"]["delivery_latency_ms"]["p99"]) for r in rounds]
    p50s = [float(r["webhook"]["delivery_latency_ms"]["p50"]) for r in rounds]
    drop, drop_paired = _drops(rates["none"], rates["webhook"])
    ok = all(r[side]["ok"] for r in rounds for side in sides) and duplicates == 0
    floor = {}
    if options.floor:
        floor_drop, floor_paired = _drops(rates["none"], rates[FLOOR])
        floor = {"floor_drop": round(floor_drop, 4), "floor_drop_paired": round(floor_paired, 4)}
    return {
        "benchmark": "webhook",
        "batches": options.batches,
        "files": options.batches * options.files,
        "rounds": rounds,
        "files_per_s": {side: _spread(rates[side]) for side in sides},
        "drop": round(drop, 4),
        "drop_paired": round(drop_paired, 4),
        **floor,
        "delivery_latency_ms": {"p50": _spread(p50s), "p99": _spread(p99s)},
        "checks": {
            "ok": ok,
            "duplicate_acknowledgements": duplicates,
            "drop_within_5_percent": drop <= MAX_DROP,
            "p99_within_100_ms": max(p99s) <= MAX_P99_MS,
        },
    }
