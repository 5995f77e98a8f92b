"""`reconciler demo`: the whole story on one machine, with nothing installed by hand.

Starts embedded Postgres and Redis when no URLs are set, makes sample files (some
missing or unreadable, so partial failure shows), submits batches, runs the worker,
sweeper and API in-process with a live progress bar per batch, and prints the run
summaries, the URLs to try and one batch's explanation. `--kill-worker` kills the
worker mid-batch and shows the batch finalized anyway, with the trigger named.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import anyio
import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reconciler import batches, logs, migrations
from reconciler.app import Ports, Role, Service, open_ports
from reconciler.batches import FileSpec
from reconciler.config import Settings, redact_url
from reconciler.handlers import inspect_file
from reconciler.jobs import FileJob
from reconciler.views import print_batches, print_explain, print_summary

DATA_DIR: Final = Path(".reconciler/demo")
DEMO_PORT: Final = 8080
POLL_INTERVAL_S: Final = 0.1
WAIT_LIMIT_S: Final = 120.0
DOOMED_DEADLINE_S: Final = 8.0

console = Console()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="embedded servers' data")
    parser.add_argument("--batches", type=int, default=2, help="sample batches to submit")
    parser.add_argument("--pause-s", type=float, default=0.05, help="pretend work per file")
    parser.add_argument("--port", type=int, default=DEMO_PORT, help="HTTP port (0: any free)")
    parser.add_argument("--serve", action="store_true", help="keep serving until Ctrl-C")
    parser.add_argument(
        "--kill-worker", action="store_true", help="kill the worker mid-batch, watch recovery"
    )
    parser.add_argument("--verbose", action="store_true", help="show the service's log events")


async def inspect_slowly(job: FileJob) -> dict[str, Any]:
    """The demo's handler: pauses as the payload says so progress is visible, then inspects."""
    pause = job.payload.get("pause_s", 0.0) if isinstance(job.payload, dict) else 0.0
    await anyio.sleep(float(pause))
    return await anyio.to_thread.run_sync(inspect_file, job)


async def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Runs the demo; returns the exit code."""
    logs.configure("console", level=logging.INFO if args.verbose else logging.ERROR)
    with _services(settings, args.data_dir) as urls:
        demo_settings = _settings_for_demo(settings, urls, args)
        async with open_ports(demo_settings, listen=True) as ports:
            await migrations.migrate(ports.db)
            await _story(args, demo_settings, ports)
    console.print("[green]demo finished[/]: embedded servers (if any) stopped")
    return 0


@contextlib.contextmanager
def _services(settings: Settings, data_dir: Path) -> Iterator[tuple[str, str]]:
    """The configured URLs, or embedded servers for the missing ones."""
    with contextlib.ExitStack() as stack:
        db_url, redis_url = settings.database_url, settings.redis_url
        if db_url is None or redis_url is None:
            from reconciler.embedded import embedded_postgres, embedded_redis

            console.print(f"starting embedded servers in [bold]{data_dir}[/] ...")
            if db_url is None:
                db_url = stack.enter_context(embedded_postgres(data_dir)).url
            if redis_url is None:
                redis_url = stack.enter_context(embedded_redis(data_dir)).url
        console.print(f"postgres: {redact_url(db_url)}   redis: {redact_url(redis_url)}")
        yield db_url, redis_url


def _settings_for_demo(
    settings: Settings, urls: tuple[str, str], args: argparse.Namespace
) -> Settings:
    # Short intervals so recovery shows within seconds; the defaults suit production.
    return dataclasses.replace(
        settings,
        database_url=urls[0],
        redis_url=urls[1],
        http_host="127.0.0.1",
        http_port=_usable_port(args.port),
        handler="reconciler.demo:inspect_slowly",
        sweep_interval_s=1.0,
        stuck_grace_s=1.0,
        visibility_timeout_s=3.0,
        stats_interval_s=0.5,
        drain_timeout_s=2.0,
    )


def _usable_port(port: int) -> int:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def make_samples(root: Path, pause_s: float) -> list[FileSpec]:
    """Sample files: readable ones, plus a folder, a dangling link and a missing path."""
    root.mkdir(parents=True, exist_ok=True)
    contents = {
        "orders.csv": "id,amount\n" + "".join(f"{i},{i * 3}\n" for i in range(200)),
        "readme.txt": "batch-reconciler demo\n" * 20,
        "config.json": '{"retries": 3, "mode": "demo"}\n',
        "notes.md": "# notes\n\n- one\n- two\n",
        "report.html": "<html><body><p>demo</p></body></html>\n",
    }
    for name, text in contents.items():
        (root / name).write_text(text)
    (root / "image.bin").write_bytes(bytes(range(256)) * 64)
    (root / "a-folder").mkdir(exist_ok=True)
    dangling = root / "dangling-link"
    if not dangling.is_symlink():
        dangling.symlink_to(root / "deleted-long-ago.txt")
    names = [*contents, "image.bin", "a-folder", "dangling-link", "missing.txt"]
    return [FileSpec(name, str(root / name), {"pause_s": pause_s}) for name in names]


async def _story(args: argparse.Namespace, settings: Settings, ports: Ports) -> None:
    samples = make_samples(args.data_dir / "samples", args.pause_s)
    run = f"demo-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    ids = [f"{run}-{n + 1}" for n in range(args.batches)]
    async with _running(settings, ports) as services:
        api = services[Role.API].api
        api_port = api.port if api is not None else None
        if api_port is not None:
            console.print(f"web console: [bold]http://127.0.0.1:{api_port}/ui/[/]")
        for batch_id in ids:
            await batches.submit(ports.db, ports.queue, samples, batch_id=batch_id, run_id=run)
        doomed = await _submit_doomed(args, ports, run, samples)
        every = ids + ([doomed] if doomed else [])
        seen = await _watch(ports, every, services, args.kill_worker)
        await _report(ports, every, seen, settings, api_port)
        if args.serve:
            console.print(f"[bold]serving[/] the web console at http://127.0.0.1:{api_port}/ui/")
            console.print("press Ctrl-C to stop")
            await anyio.sleep_forever()


async def _submit_doomed(
    args: argparse.Namespace, ports: Ports, run: str, samples: list[FileSpec]
) -> str | None:
    if not args.kill_worker:
        return None
    slow = [dataclasses.replace(s, payload={"pause_s": 2.0}) for s in samples[:6]]
    batch_id = f"{run}-killed-worker"
    await batches.submit(
        ports.db, ports.queue, slow, batch_id=batch_id, run_id=run, deadline_s=DOOMED_DEADLINE_S
    )
    return batch_id


@contextlib.asynccontextmanager
async def _running(settings: Settings, ports: Ports) -> AsyncIterator[dict[Role, Service]]:
    """Worker, sweeper and API as separate services, as a scaled deployment runs them."""
    quiet = dataclasses.replace(settings, http_port=0)
    services = {
        Role.WORKER: Service(quiet, ports, Role.WORKER),
        Role.SWEEPER: Service(quiet, ports, Role.SWEEPER),
        Role.API: Service(settings, ports, Role.API),
    }
    async with anyio.create_task_group() as tg:
        for service in services.values():
            tg.start_soon(service.serve)
        api = services[Role.API].api
        if api is not None:
            await api.started.wait()
        try:
            yield services
        finally:
            for service in services.values():
                service.stop.set()


async def _watch(
    ports: Ports, ids: list[str], services: dict[Role, Service], kill: bool
) -> dict[str, Any] | None:
    """Shows a bar per batch until all are finalized; returns the explain at the kill."""
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[state]}"), TimeElapsedColumn())  # fmt: skip
    killed, seen = not kill, None
    with Progress(*columns, console=console) as bar, anyio.fail_after(WAIT_LIMIT_S):
        tasks = {b: bar.add_task(b, total=1, state="") for b in ids}
        while True:
            states = {b: await batches.progress(ports.db, b) for b in ids}
            for batch_id, state in states.items():
                _show(bar, tasks[batch_id], state)
            if not killed and _time_to_kill(states, ids[-1]):
                killed = True
                _kill(services[Role.WORKER])
                bar.console.print(
                    f"[red]worker killed[/] with {states[ids[-1]]['files_processing']} files of "
                    f"{ids[-1]} in flight: their leases expire, the sweeper reclaims them, and "
                    f"with no worker left the batch's {DOOMED_DEADLINE_S:g} s deadline ends it"
                )
                seen = await batches.explain(ports.db, ids[-1], 0.0)
            if all(s["status"] != "processing" for s in states.values()):
                return seen
            await anyio.sleep(POLL_INTERVAL_S)


def _time_to_kill(states: dict[str, dict[str, Any]], doomed: str) -> bool:
    others_done = all(s["status"] != "processing" for b, s in states.items() if b != doomed)
    return others_done and states[doomed]["files_processing"] > 0


def _kill(service: Service) -> None:
    """Stops the worker as a crash would: in-flight files keep their leases."""
    if service.consumer is not None:
        service.consumer.abandon()
    service.stop.set()


def _done(state: dict[str, Any]) -> int:
    return int(state["files_succeeded"]) + int(state["files_failed"])


def _show(bar: Progress, task: Any, state: dict[str, Any]) -> None:
    text = f"{state['files_failed']} failed"
    if state["status"] != "processing":
        text = f"[green]{state['status']}[/] by [bold]{state['finalized_by']}[/]"
    bar.update(task, total=max(1, state["total_files"]), completed=_done(state), state=text)


async def _report(
    ports: Ports, ids: list[str], seen: dict[str, Any] | None, settings: Settings, port: int | None
) -> None:
    found = [await batches.summary(ports.db, b) for b in ids]
    summaries = [s for s in found if s is not None]
    console.print()
    print_batches(summaries)
    print_summary(summaries[0])
    base = f"http://127.0.0.1:{port}"
    console.print("\n[bold]try these[/]:")
    for path in (f"/api/batches/{ids[0]}", f"/api/batches/{ids[0]}/summary",
                 f"/api/batches/{ids[0]}/explain", "/metrics", "/openapi.json"):  # fmt: skip
        console.print(f"  curl {base}{path}")
    async with httpx.AsyncClient(base_url=base) as http:
        answer = await http.get(f"/api/batches/{ids[0]}/summary")
    console.print(f"\nGET /api/batches/{ids[0]}/summary -> {answer.status_code}")
    if seen is not None:
        console.print(f"\n[bold]reconciler explain {seen['batch_id']}[/], just after the kill:")
        print_explain(seen)
    console.print(f"\n[bold]reconciler explain {ids[0]}[/]:")
    print_explain(await batches.explain(ports.db, ids[0], settings.stuck_grace_s))
