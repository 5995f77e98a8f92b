"""Real `reconciler run` processes for the benchmarks, with their logs in files.

The harness watches each process from outside, as an operator would: readiness from
its JSON log, peak memory and CPU time from /proc.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final

from bench import cpu
from bench.errors import BenchError
from bench.scratch import Scratch, reconciler_command

STARTUP_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 30.0
LOG_POLL_S: Final = 0.05
SWEEP_INTERVAL_S: Final = 3600.0  # finalizations under load then come from events
HANDLERS_MODULE: Final = "reconciler.handlers"


def handler_spec(name: str) -> str:
    """`noop` means `reconciler.handlers:noop`; a `module:function` is kept as given."""
    return name if ":" in name else f"{HANDLERS_MODULE}:{name}"


def service_env(
    place: Scratch, handler: str, concurrency: int | None, sweep_interval_s: float
) -> dict[str, str]:
    extra = {
        "RECONCILER_HANDLER": handler_spec(handler),
        "RECONCILER_LOG_FORMAT": "json",
        "RECONCILER_HTTP_HOST": "127.0.0.1",
        "RECONCILER_HTTP_PORT": "0",
        "RECONCILER_SWEEP_INTERVAL_S": str(sweep_interval_s),
    }
    if concurrency is not None:
        extra["RECONCILER_CONCURRENCY"] = str(concurrency)
    return place.service_env(**extra)


class ServiceProcess:
    """One `reconciler run` child; stdout and stderr go to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            reconciler_command("run"), env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.proc.pid

    def events(self) -> Iterator[dict[str, Any]]:
        with self.log_path.open(errors="replace") as lines:
            for line in lines:
                if line.startswith("{"):
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> int:
        """Waits for the API to listen; returns its port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == "api_listening":
                    return int(event["port"])
            self.check_alive()
            time.sleep(LOG_POLL_S)
        raise BenchError(f"service not ready after {timeout_s:g} s; see {self.log_path}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"service exited with {self.proc.returncode}:\n{tail}")

    def peak_rss_mb(self) -> float:
        """The process's resident-set high-water mark (VmHWM), in MiB."""
        return _status_kib(self.pid, "VmHWM") / 1024

    def cpu_s(self) -> tuple[float, float]:
        """User and system CPU time used so far, all threads."""
        return cpu.process_s(self.pid)

    def stop(self) -> int:
        """SIGTERM (drain), then SIGKILL if it outlives the stop timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._log.close()
        return self.proc.returncode


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


@contextmanager
def running(
    env: dict[str, str], log_dir: Path, replicas: int = 1
) -> Iterator[list[ServiceProcess]]:
    """Starts `replicas` service processes, waits until each listens, stops them all."""
    with ExitStack() as stack:
        services = []
        for index in range(replicas):
            service = ServiceProcess(env, log_dir / f"service-{index}.log")
            stack.callback(service.stop)
            services.append(service)
        for service in services:
            service.wait_ready()
        yield services
