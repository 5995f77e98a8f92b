"""`python -m bench COMMAND`: parses options, runs one benchmark, prints its JSON line.

Exit codes: 0 the run finished and its checks hold, 1 it failed or a check did not
hold (the JSON still says which), 2 a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import anyio

from bench import (
    baseline,
    peer,
    post,
    profiling,
    submission,
    summary_http,
    sweep,
    throughput,
    versus,
    webhook,
)
from bench import wait as wait_latency
from bench.errors import BenchError
from bench.receiver import receiving
from bench.report import emit, note, ratio
from bench.scratch import Server, pg_setting
from reconciler import logs

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1

Command = Callable[[argparse.Namespace, Server], Awaitable[dict[str, Any]]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--pg-setting", type=pg_setting, action="append", default=[], metavar="NAME=VALUE",
        help="a Postgres setting for the throwaway databases (ALTER DATABASE ... SET)",
    )  # fmt: skip
    _throughput_args(
        sub.add_parser("throughput", parents=[common], help="end-to-end files/s and latency")
    )
    _baseline_args(
        sub.add_parser("baseline", parents=[common], help="pgbench -N TPS of the same Postgres")
    )
    compare = sub.add_parser(
        "compare", parents=[common], help="baseline, then throughput, and their ratio"
    )
    _throughput_args(compare)
    _baseline_args(compare)
    _sweep_args(
        sub.add_parser("sweep", parents=[common], help="one sweep pass: big history vs empty")
    )
    _submit_args(sub.add_parser("submit", parents=[common], help="time submitting one large batch"))
    _http_args(
        sub.add_parser("summary-http", parents=[common], help="wrk load on the summary endpoint")
    )
    _versus_args(
        sub.add_parser(
            "versus-bullmq", parents=[common], help="ours and the BullMQ flows peer, alternately"
        )
    )
    _webhook_args(
        sub.add_parser(
            "webhook", parents=[common], help="throughput with one webhook vs none, alternately"
        )
    )
    _wait_args(
        sub.add_parser("wait", parents=[common], help="Client.wait return after finalization")
    )
    posting = sub.add_parser("post", help="CPU per webhook POST to the local receiver")
    posting.add_argument("--posts", type=int, default=post.POSTS, help="per round")
    posting.add_argument("--concurrency", type=int, default=post.CONCURRENCY)
    posting.add_argument("--rounds", type=int, default=post.ROUNDS)
    flame = sub.add_parser("flame", help="top functions of a py-spy raw profile")
    flame.add_argument("stacks", type=Path)
    flame.add_argument("--top", type=int, default=25)
    flame.add_argument("--focus", default="", help="only functions whose name contains this")
    return parser


def _throughput_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--files", type=int, default=50, help="files per batch")
    parser.add_argument(
        "--handler", default="noop", help="name in reconciler.handlers, or module:function"
    )
    parser.add_argument("--concurrency", type=int, help="RECONCILER_CONCURRENCY of the service")
    parser.add_argument("--replicas", type=int, default=1, help="service processes")
    parser.add_argument("--submitters", type=int, default=throughput.SUBMITTERS)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--log-dir", type=Path, help="service logs (default: a new temp dir)")
    parser.add_argument("--profile", type=Path, help="record the service with py-spy here")
    parser.add_argument(
        "--profile-native", action="store_true", help="include C/Cython frames (pauses)"
    )
    parser.add_argument("--profile-rate", type=int, default=profiling.SAMPLE_RATE_HZ)
    parser.add_argument(
        "--profile-format", default="raw", choices=["raw", "flamegraph", "speedscope"]
    )
    parser.add_argument(
        "--webhook", action="store_true",
        help="subscribe one webhook (a local receiver answering 200); report delivery latency",
    )  # fmt: skip


def _webhook_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--files", type=int, default=50, help="files per batch")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument(
        "--floor", action="store_true",
        help="a third side: no webhook, a process posting each event to the receiver",
    )  # fmt: skip
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per run")
    parser.add_argument("--log-dir", type=Path, help="service logs (default: a new temp dir)")


def _wait_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=wait_latency.ROUNDS)
    parser.add_argument("--work-s", type=float, default=wait_latency.WORK_S, help="file work")
    parser.add_argument(
        "--no-listen", action="store_true", help="open the client without LISTEN (polling)"
    )
    parser.add_argument(
        "--webhook", action="store_true", help="also subscribe a local receiver; its latency"
    )
    parser.add_argument("--log-dir", type=Path, help="service logs (default: a new temp dir)")


def _baseline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, default=baseline.SECONDS)
    parser.add_argument("--clients", type=int, default=baseline.CLIENTS)
    parser.add_argument("--threads", type=int, default=baseline.THREADS)
    parser.add_argument("--scale", type=int, default=baseline.SCALE)


def _sweep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--history-batches", type=int, default=sweep.HISTORY_BATCHES)
    parser.add_argument("--history-files", type=int, default=sweep.HISTORY_FILES)
    parser.add_argument("--unfinished-batches", type=int, default=sweep.UNFINISHED_BATCHES)
    parser.add_argument("--unfinished-files", type=int, default=sweep.UNFINISHED_FILES)
    parser.add_argument("--passes", type=int, default=sweep.PASSES)
    parser.add_argument("--chunk-batches", type=int, default=sweep.CHUNK_BATCHES)
    parser.add_argument(
        "--history-age-days",
        type=int,
        default=sweep.HISTORY_AGE_DAYS,
        help="how long ago the history was finalized",
    )
    parser.add_argument(
        "--retention-days",
        type=int,
        default=sweep.RETENTION_DAYS,
        help="retention of the 'retention on' passes; longer than the history's age",
    )
    parser.add_argument(
        "--no-drain",
        dest="drain",
        action="store_false",
        help="skip deleting the history with a retention of one day",
    )


def _submit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--files", type=int, default=submission.FILES)
    parser.add_argument("--repeat", type=int, default=submission.REPEAT)


def _http_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, default=summary_http.SECONDS)
    parser.add_argument("--connections", type=int, default=summary_http.CONNECTIONS)
    parser.add_argument("--threads", type=int, default=summary_http.THREADS)
    parser.add_argument("--files", type=int, default=summary_http.FILES, help="files in the batch")
    parser.add_argument("--log-dir", type=Path, help="service logs (default: a new temp dir)")


def _versus_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--files", type=int, default=50, help="files per batch")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--child-concurrency", type=int, default=peer.CHILD_CONCURRENCY)
    parser.add_argument("--parent-concurrency", type=int, default=peer.PARENT_CONCURRENCY)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per run of either side")
    parser.add_argument("--log-dir", type=Path, help="our service's logs (default: a temp dir)")


def _log_dir(args: argparse.Namespace) -> Path:
    path: Path = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-logs-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _throughput_options(args: argparse.Namespace) -> throughput.ThroughputOptions:
    return throughput.ThroughputOptions(
        batches=args.batches, files=args.files, handler=args.handler,
        concurrency=args.concurrency, replicas=args.replicas, submitters=args.submitters,
        timeout_s=args.timeout_s, log_dir=_log_dir(args), profile=args.profile,
        profile_format=args.profile_format, profile_native=args.profile_native,
        profile_rate_hz=args.profile_rate,
    )  # fmt: skip


def _baseline_options(args: argparse.Namespace) -> baseline.BaselineOptions:
    return baseline.BaselineOptions(args.seconds, args.clients, args.threads, args.scale)


async def _throughput(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    options = _throughput_options(args)
    if not args.webhook:
        return await throughput.run(server, options)
    with receiving() as receiver:
        return await throughput.run(server, dataclasses.replace(options, receiver=receiver))


async def _baseline(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    return await baseline.run(server, _baseline_options(args))


async def _compare(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    floor = await baseline.run(server, _baseline_options(args))
    figures = await _throughput(args, server)
    return {
        "benchmark": "compare",
        "files_per_s": figures["files_per_s"],
        "pgbench_tps": floor["pgbench_tps"],
        "ratio": ratio(figures["files_per_s"] or 0.0, floor["pgbench_tps"]),
        "checks": figures["checks"],
        "baseline": floor,
        "throughput": figures,
    }


async def _sweep(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    options = sweep.SweepOptions(
        history_batches=args.history_batches, history_files=args.history_files,
        unfinished_batches=args.unfinished_batches, unfinished_files=args.unfinished_files,
        passes=args.passes, chunk_batches=args.chunk_batches,
        history_age_days=args.history_age_days, retention_days=args.retention_days,
        drain=args.drain,
    )  # fmt: skip
    return await sweep.run(server, options)


async def _submit(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    return await submission.run(server, args.files, args.repeat)


async def _summary_http(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    options = summary_http.HttpOptions(
        args.seconds, args.connections, args.threads, args.files, _log_dir(args)
    )
    return await summary_http.run(server, options)


async def _versus(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    options = versus.VersusOptions(
        batches=args.batches, files=args.files, rounds=args.rounds,
        child_concurrency=args.child_concurrency, parent_concurrency=args.parent_concurrency,
        timeout_s=args.timeout_s, log_dir=_log_dir(args),
    )  # fmt: skip
    return await versus.run(server, options)


async def _webhook(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    options = webhook.WebhookOptions(
        batches=args.batches, files=args.files, rounds=args.rounds,
        timeout_s=args.timeout_s, log_dir=_log_dir(args), floor=args.floor,
    )  # fmt: skip
    return await webhook.run(server, options)


async def _wait(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    options = wait_latency.WaitOptions(
        args.rounds, args.work_s, not args.no_listen, _log_dir(args), args.webhook
    )
    return await wait_latency.run(server, options)


async def _post(args: argparse.Namespace, _: Server) -> dict[str, Any]:
    return await post.run(post.PostOptions(args.posts, args.concurrency, args.rounds))


async def _flame(args: argparse.Namespace, _: Server) -> dict[str, Any]:
    return {"benchmark": "flame", **profiling.summarize(args.stacks, args.top, args.focus)}


COMMANDS: Final[dict[str, Command]] = {
    "throughput": _throughput,
    "baseline": _baseline,
    "compare": _compare,
    "sweep": _sweep,
    "submit": _submit,
    "summary-http": _summary_http,
    "versus-bullmq": _versus,
    "webhook": _webhook,
    "wait": _wait,
    "post": _post,
    "flame": _flame,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("json", logging.WARNING)  # in-process service code logs to stderr
    server = dataclasses.replace(
        Server.from_env(os.environ), pg_settings=tuple(getattr(args, "pg_setting", ()))
    )
    try:
        result = anyio.run(
            COMMANDS[args.command], args, server, backend_options={"use_uvloop": True}
        )
    except BenchError as exc:
        note(f"[red]failed:[/red] {exc}")
        return EXIT_FAILURE
    if server.pg_settings:
        result["pg_settings"] = dict(server.pg_settings)
    emit(result)
    return EXIT_OK if result.get("checks", {}).get("ok", True) else EXIT_FAILURE
