"""Starts real `reconciler` processes for acceptance tests and reads their JSON logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_S = 30.0


def reconciler_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "reconciler", *args]


class ServiceProcess:
    """One `reconciler run` child process with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            reconciler_command("run", *args), env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def wait_for_event(self, name: str, timeout_s: float = STARTUP_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == name:
                    return event
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} event; log:\n{self.log_path.read_text()[-4000:]}")

    @property
    def port(self) -> int:
        return int(self.wait_for_event("api_listening")["port"])

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


@contextmanager
def service_process(env: dict[str, str], log_path: Path, *args: str) -> Iterator[ServiceProcess]:
    process = ServiceProcess(env, log_path, *args)
    try:
        yield process
    finally:
        process.close()


def run_cli(
    env: dict[str, str], *args: str, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        reconciler_command(*args), env=env, capture_output=True, text=True, timeout=timeout_s,
        check=False,
    )  # fmt: skip


def with_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    merged = dict(env)
    merged.update(extra)
    merged.setdefault("PYTHONPATH", os.getcwd())
    return merged
