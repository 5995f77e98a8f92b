"""The harness's readers of pgbench, wrk and py-spy output, on recorded samples."""

from __future__ import annotations

from pathlib import Path

from bench import baseline, cli, profiling, report, summary_http, webhook
from bench import wait as wait_latency

PGBENCH_OUT = """\
transaction type: <builtin: simple update>
number of transactions actually processed: 24954
latency average = 2.404 ms
initial connection time = 7.215 ms
tps = 1663.785120 (without initial connection time)
"""

WRK_OUT = """\
Running 15s test @ http://127.0.0.1:8080/api/batches/b/summary
  2 threads and 32 connections
  Latency Distribution
     50%  812.00us
     75%    3.49ms
     90%    5.74ms
     99%    1.02s
  29192 requests in 15.01s, 19.77MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   1944.85
"""


def test_pgbench_report_gives_tps_latency_and_count() -> None:
    """baseline.parse reads TPS without connection time, mean latency, transactions."""
    assert baseline.parse(PGBENCH_OUT) == {
        "pgbench_tps": 1663.78512,
        "latency_ms_avg": 2.404,
        "transactions": 24954,
    }


def test_wrk_report_gives_rate_percentiles_in_ms_and_errors() -> None:
    """summary_http.parse converts us and s to ms and counts both kinds of error."""
    parsed = summary_http.parse(WRK_OUT)
    assert parsed["requests_per_s"] == 1944.85
    assert parsed["requests"] == 29192
    assert parsed["latency_ms"] == {"p50": 0.812, "p75": 3.49, "p90": 5.74, "p99": 1020.0}
    assert (parsed["non_2xx"], parsed["socket_errors"]) == (4, 3)


def test_profile_summary_ranks_own_and_inclusive_time(tmp_path: Path) -> None:
    """profiling.summarize: own time to the leaf, inclusive to each frame once, idle apart."""
    stacks = tmp_path / "stacks.txt"
    stacks.write_text(
        "main (app.py:1);flush (db.py:10);send (net.py:5) 3\n"
        "main (app.py:1);flush (db.py:12) 1\n"
        "main (app.py:1);read (q.py:7);read (q.py:9) 4\n"
        "main (app.py:1);poll (loop.c:3);epoll_pwait (libc.so.6) 2\n"
        "main (app.py:1);Runner.run (asyncio/runners.py:118) 1\n"
    )
    summary = profiling.summarize(stacks, top=3)
    assert (summary["samples"], summary["idle_samples"], summary["busy_samples"]) == (11, 3, 8)
    assert summary["own"][0] == {"function": "read (q.py)", "pct": 50.0, "samples": 4}
    assert summary["inclusive"][0] == {"function": "main (app.py)", "pct": 100.0, "samples": 8}
    assert summary["own_by_package"][0] == {"function": "q", "pct": 50.0, "samples": 4}
    focused = profiling.summarize(stacks, top=5, focus="db.py")
    assert focused["inclusive"] == [{"function": "flush (db.py)", "pct": 50.0, "samples": 4}]


def test_webhook_and_wait_options_parse_and_the_sides_alternate() -> None:
    """`throughput --webhook`, `webhook --rounds` and `wait --no-listen` parse; the
    webhook A/B flips its order every round.
    """
    parser = cli.build_parser()
    assert parser.parse_args(["throughput", "--webhook"]).webhook is True
    assert parser.parse_args(["throughput"]).webhook is False
    ab = parser.parse_args(["webhook", "--rounds", "4", "--batches", "20"])
    assert (ab.rounds, ab.batches, ab.files) == (4, 20, 50)
    waited = parser.parse_args(["wait", "--no-listen", "--rounds", "5", "--webhook"])
    assert (waited.no_listen, waited.rounds, waited.webhook) == (True, 5, True)
    assert [webhook.order(i) for i in range(3)] == [
        ("none", "webhook"), ("webhook", "none"), ("none", "webhook"),
    ]  # fmt: skip
    floor = parser.parse_args(["webhook", "--floor"])
    assert floor.floor is True and parser.parse_args(["webhook"]).floor is False
    three = webhook.WebhookOptions(batches=1, files=1, floor=True).sides
    assert [webhook.order(i, three)[0] for i in range(4)] == ["none", "webhook", "posts", "none"]


def test_webhook_figures_give_medians_spread_and_the_drop() -> None:
    """figures_of: the drop compares medians; a p99 over 100 ms fails that check."""

    def side(rate: float, p99: float | None = None) -> dict[str, object]:
        latency = None if p99 is None else {"p50": p99 / 2, "p99": p99, "max": p99, "n": 1}
        return {"files_per_s": rate, "delivery_latency_ms": latency, "ok": True}

    rounds = [
        {"none": side(100.0), "webhook": side(97.0, 40.0)},
        {"none": side(90.0), "webhook": side(99.0, 150.0)},
        {"none": side(110.0), "webhook": side(95.0, 60.0)},
    ]
    result = webhook.figures_of(webhook.WebhookOptions(batches=2, files=3), rounds)
    assert result["files_per_s"]["none"] == {"median": 100.0, "min": 90.0, "max": 110.0}
    assert result["files_per_s"]["webhook"]["median"] == 97.0
    assert result["drop"] == 0.03
    assert result["delivery_latency_ms"]["p99"] == {"median": 60.0, "min": 40.0, "max": 150.0}
    assert result["checks"]["drop_within_5_percent"] is True
    assert result["checks"]["p99_within_100_ms"] is False


def test_the_paired_drop_is_the_median_of_each_rounds_ratio() -> None:
    """A round on a host twice as fast moves the medians' drop, not the paired one."""

    def side(rate: float) -> dict[str, object]:
        latency = {"p50": 1.0, "p99": 2.0, "max": 2.0, "n": 1}
        return {"files_per_s": rate, "delivery_latency_ms": latency, "ok": True}

    rates = [(100.0, 99.0), (300.0, 240.0), (120.0, 119.0)]
    rounds = [{"none": side(n), "webhook": side(w)} for n, w in rates]
    result = webhook.figures_of(webhook.WebhookOptions(batches=2, files=3), rounds)
    assert result["drop"] == round(1 - 119.0 / 120.0, 4)
    assert result["drop_paired"] == 0.01


def test_the_floor_side_has_drops_of_its_own() -> None:
    """With `floor`, the posts side's drops against none come beside the webhook's."""

    def side(rate: float) -> dict[str, object]:
        latency = {"p50": 1.0, "p99": 2.0, "max": 2.0, "n": 1}
        return {"files_per_s": rate, "delivery_latency_ms": latency, "ok": True}

    rates = [(100.0, 90.0, 95.0), (200.0, 170.0, 196.0), (110.0, 99.0, 100.0)]
    rounds = [{"none": side(n), "webhook": side(w), "posts": side(p)} for n, w, p in rates]
    options = webhook.WebhookOptions(batches=2, files=3, floor=True)
    result = webhook.figures_of(options, rounds)
    assert result["files_per_s"]["posts"]["median"] == 100.0
    assert result["floor_drop"] == round(1 - 100.0 / 110.0, 4)
    assert result["floor_drop_paired"] == 0.05  # the median of 0.95, 0.98 and 0.909
    assert result["drop_paired"] == 0.1  # 0.9, 0.85, 0.9
    assert "floor_drop" not in webhook.figures_of(webhook.WebhookOptions(2, 3), rounds)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 201)]
    assert report.percentiles(values) == {"p50": 100.0, "p99": 198.0, "max": 200.0, "n": 200}
    assert report.percentiles([])["n"] == 0


def test_wait_figures_take_percentiles_of_the_rounds() -> None:
    figures = wait_latency.figures_of(wait_latency.WaitOptions(rounds=4), [5.0, 1.0, 3.0, 200.0])
    assert figures["latency_ms"] == {"p50": 4.0, "p99": 200.0, "min": 1.0, "max": 200.0}
    assert figures["checks"] == {"ok": True, "p99_within_100_ms": False}
