"""The harness's readers of pgbench, wrk and py-spy output, on recorded samples."""

from __future__ import annotations

from pathlib import Path

from bench import baseline, profiling, summary_http

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
