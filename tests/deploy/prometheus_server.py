"""Runs Debian's Prometheus server for a test and talks to its HTTP API.

The server scrapes the given targets and evaluates the given rule files, both every
second, with its data in the test's temporary folder. It is stopped with SIGTERM (a
kill only if that fails) when the block ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

DEBIAN_PROMETHEUS: Final = Path("/usr/bin/prometheus")
INTERVAL: Final = "1s"  # scrape and rule evaluation period of the test server
READY_TIMEOUT_S: Final = 20.0
STOP_TIMEOUT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 5.0
PORT_ATTEMPTS: Final = 3


def prometheus_binary() -> Path | None:
    """Debian's server binary, else a `prometheus` on PATH, else None."""
    if DEBIAN_PROMETHEUS.exists():
        return DEBIAN_PROMETHEUS
    found = shutil.which("prometheus")
    return Path(found) if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def config(job: str, targets: Sequence[str], rule_files: Sequence[Path]) -> dict[str, Any]:
    """A Prometheus configuration (JSON is valid YAML) scraping `targets` as `job`."""
    return {
        "global": {
            "scrape_interval": INTERVAL,
            "scrape_timeout": INTERVAL,
            "evaluation_interval": INTERVAL,
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }


def is_running(pid: int) -> bool:
    """Whether a Prometheus process with this pid still exists."""
    try:
        return b"prometheus" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False


@dataclass
class Prometheus:
    """One running server: its process, address and log, and its HTTP API."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def api(self, path: str, **params: str) -> dict[str, Any]:
        """The JSON answer of an API endpoint, whatever its status."""
        async with httpx.AsyncClient(base_url=self.url, timeout=REQUEST_TIMEOUT_S) as client:
            answer = await client.get(path, params=params)
        body: dict[str, Any] = answer.json()
        return body

    async def data(self, path: str, **params: str) -> Any:
        """The `data` of a successful API answer; fails with the server's error otherwise."""
        body = await self.api(path, **params)
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, expr: str) -> dict[str, Any]:
        """An instant query's whole answer, so callers can check its status."""
        return await self.api("/api/v1/query", query=expr)

    async def alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts."""
        alerts: list[dict[str, Any]] = (await self.data("/api/v1/alerts"))["alerts"]
        return alerts

    async def rules(self) -> dict[str, dict[str, Any]]:
        """Every loaded rule by name, with its state, health and last error."""
        groups = (await self.data("/api/v1/rules"))["groups"]
        return {rule["name"]: rule for group in groups for rule in group["rules"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def prometheus_server(
    binary: Path, workdir: Path, job: str, targets: Sequence[str], rule_files: Sequence[Path]
) -> Iterator[Prometheus]:
    """A ready Prometheus scraping `targets` and evaluating `rule_files` every second."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(json.dumps(config(job, targets, rule_files)), encoding="utf-8")
    server = _start_on_a_free_port(binary, workdir, config_path)
    try:
        yield server
    finally:
        server.stop()


def _start_on_a_free_port(binary: Path, workdir: Path, config_path: Path) -> Prometheus:
    # Another process may take the port between probing and binding it: try again.
    for attempt in range(PORT_ATTEMPTS):
        server = _start(binary, workdir, config_path, free_port(), attempt)
        if _wait_ready(server):
            return server
        server.stop()
        if "address already in use" not in server.log_tail():
            break
    raise AssertionError(f"Prometheus did not become ready; log:\n{server.log_tail()}")


def _start(binary: Path, workdir: Path, config_path: Path, port: int, attempt: int) -> Prometheus:
    log_path = workdir / f"prometheus-{attempt}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},  # nothing else leaks in
        )
    return Prometheus(proc, port, log_path)


def _wait_ready(server: Prometheus) -> bool:
    """Polls /-/ready until it answers 200, the process exits, or the deadline passes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            if httpx.get(f"{server.url}/-/ready", timeout=1.0).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False
