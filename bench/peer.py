"""The BullMQ flows peer in bench/bullmq/: installs its pinned Node packages, runs it.

One run is one `node bench/bullmq/flows.js` process under a fresh BullMQ key prefix,
which is deleted afterwards even if the process died before deleting it itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio

from bench.errors import BenchError
from bench.report import note
from bench.scratch import delete_namespace, random_suffix

PEER_DIR: Final = Path(__file__).resolve().parent / "bullmq"
SCRIPT: Final = PEER_DIR / "flows.js"
CHILD_CONCURRENCY: Final = 32
PARENT_CONCURRENCY: Final = 16
SUBMITTERS: Final = 8  # the same number of submitting lanes as our harness
INSTALL_TIMEOUT_S: Final = 300.0
EXIT_GRACE_S: Final = 60.0  # start-up, closing the workers, deleting the keys


@dataclass(frozen=True, slots=True)
class PeerOptions:
    batches: int
    files: int
    child_concurrency: int = CHILD_CONCURRENCY
    parent_concurrency: int = PARENT_CONCURRENCY
    submitters: int = SUBMITTERS
    timeout_s: float = 600.0


def ensure_installed() -> None:
    """`npm ci` in bench/bullmq/ unless the pinned packages are already there."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"the BullMQ peer needs {' and '.join(missing)} on PATH (Node 20+)")
    if _installed():
        return
    note(f"installing the BullMQ peer's pinned packages: npm ci in {PEER_DIR}")
    # --ignore-scripts: no dependency runs code at install; msgpackr's native part
    # ships prebuilt in a registry package and loads without its install script.
    command = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
    try:
        done = subprocess.run(
            command, cwd=PEER_DIR, capture_output=True, text=True,
            timeout=INSTALL_TIMEOUT_S, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise BenchError(f"npm ci in {PEER_DIR} took over {INSTALL_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        raise BenchError(f"npm ci in {PEER_DIR} failed: {_npm_error(done.stderr)}")


def _installed() -> bool:
    """Whether node_modules holds exactly the versions package.json pins."""
    pinned: dict[str, str] = json.loads((PEER_DIR / "package.json").read_text())["dependencies"]
    for name, version in pinned.items():
        manifest = PEER_DIR / "node_modules" / name / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text()).get("version") != version:
            return False
    return True


def _npm_error(stderr: str) -> str:
    """npm's own error lines in one line, without the pointer to its log file."""
    lines = [line.strip() for line in stderr.splitlines() if line.startswith("npm error")]
    useful = [line for line in lines if "complete log" not in line and line != "npm error"]
    return "; ".join(useful[:3]) or stderr.strip()[-300:] or "no output"


def command(options: PeerOptions, redis_url: str, prefix: str) -> list[str]:
    return [
        "node", str(SCRIPT),
        "--batches", str(options.batches), "--files", str(options.files),
        "--child-concurrency", str(options.child_concurrency),
        "--parent-concurrency", str(options.parent_concurrency),
        "--submitters", str(options.submitters), "--timeout-s", str(options.timeout_s),
        "--redis-url", redis_url, "--prefix", prefix,
        "--clock-ticks", str(os.sysconf("SC_CLK_TCK")),
    ]  # fmt: skip


async def run(options: PeerOptions, redis_url: str) -> dict[str, Any]:
    """One peer run; returns its JSON line, with the command that produced it."""
    prefix = f"bench-bullmq-{random_suffix()}"
    argv = command(options, redis_url, prefix)
    try:
        with anyio.fail_after(options.timeout_s + EXIT_GRACE_S):
            # stderr is inherited: the peer's own errors show where ours do.
            done = await anyio.run_process(argv, check=False, stderr=None)
    except TimeoutError:
        raise BenchError(f"the BullMQ peer did not exit within {options.timeout_s:g} s") from None
    finally:
        await delete_namespace(redis_url, prefix)
    return _parsed(done.stdout.decode(errors="replace"), done.returncode, argv)


def _parsed(stdout: str, returncode: int, argv: list[str]) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"the BullMQ peer exited with {returncode} and printed no figures")
    result: dict[str, Any] = json.loads(lines[-1])
    result["exit_code"] = returncode
    # The tuning as given, without the Redis URL (it may hold a password).
    shown = argv[: argv.index("--redis-url")]
    result["command"] = " ".join(["node", str(SCRIPT.relative_to(PEER_DIR.parents[1])), *shown[2:]])
    return result
