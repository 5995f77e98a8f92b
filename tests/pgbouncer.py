"""A real PgBouncer in front of a test's database: its own process, port and config.

`pgbouncer(database_url, tmp_path, pool_mode)` starts `pgbouncer` with a generated ini
in `tmp_path`, pointing at the database of `database_url` (trust auth, as the local
Postgres), waits until it accepts connections and stops it at the end. The Debian
package's service is never used. Tests skip when no pgbouncer is installed
(`scripts/ensure-tools` installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit, urlunsplit

import pytest

PoolMode = Literal["session", "transaction"]
STARTUP_TIMEOUT_S: Final = 15.0
STOP_TIMEOUT_S: Final = 10.0
POLL_S: Final = 0.02
# Few server connections for the many client connections of two replicas: in
# transaction mode every server connection serves several clients in turn.
TRANSACTION_POOL_SIZE: Final = 4
# Session mode holds one server connection per client connection for its whole life.
SESSION_POOL_SIZE: Final = 60
MAX_CLIENT_CONN: Final = 200
# PgBouncer refuses to run as root; it switches to this account when started as root.
UNPRIVILEGED_USER: Final = "nobody"


@dataclass(frozen=True)
class PgBouncer:
    """A running pgbouncer: the URL clients use, its pool mode and its log."""

    url: str
    pool_mode: PoolMode
    pool_size: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def binary() -> str | None:
    """The pgbouncer executable (Debian installs it in /usr/sbin), if any."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ini(database_url: str, port: int, pool_mode: PoolMode, pool_size: int, auth: Path) -> str:
    upstream = urlsplit(database_url)
    dbname = upstream.path.lstrip("/")
    return f"""\
[databases]
{dbname} = host={upstream.hostname or "127.0.0.1"} port={upstream.port or 5432} dbname={dbname}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {auth}
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = {MAX_CLIENT_CONN}
; asyncpg sends only client_encoding, which PgBouncer tracks itself; other drivers
; send extra_float_digits.
ignore_startup_parameters = extra_float_digits
; Log to stderr, which the fixture keeps in a file of its own.
logfile =
pidfile =
log_connections = 0
log_disconnections = 0
"""


@contextmanager
def pgbouncer(database_url: str, tmp_path: Path, pool_mode: PoolMode) -> Iterator[PgBouncer]:
    """Runs a pgbouncer for `database_url`'s database until the block ends."""
    executable = binary()
    if executable is None:
        pytest.skip("pgbouncer is not installed (scripts/ensure-tools installs it)")
    workdir = tmp_path / f"pgbouncer-{pool_mode}"
    workdir.mkdir()
    user = urlsplit(database_url).username or "postgres"
    auth = workdir / "userlist.txt"
    auth.write_text(f'"{user}" ""\n')
    port = free_port()
    pool_size = TRANSACTION_POOL_SIZE if pool_mode == "transaction" else SESSION_POOL_SIZE
    ini = workdir / "pgbouncer.ini"
    ini.write_text(_ini(database_url, port, pool_mode, pool_size, auth))
    command = [executable, str(ini)]
    if os.geteuid() == 0:
        # It reads its config and auth file before it drops to this account.
        command[1:1] = ["-u", UNPRIVILEGED_USER]
    log_path = workdir / "pgbouncer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    parts = urlsplit(database_url)
    netloc = f"{parts.username}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
    running = PgBouncer(urlunsplit(parts._replace(netloc=netloc)), pool_mode, pool_size, log_path)
    try:
        _wait_until_listening(proc, port, running)
        yield running
    finally:
        _stop(proc)


def _wait_until_listening(proc: subprocess.Popen[bytes], port: int, bouncer: PgBouncer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pgbouncer exited with {proc.returncode}:\n{bouncer.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=POLL_S * 10):
                return
        except OSError:
            time.sleep(POLL_S)  # polling the condition above, bounded by the deadline
    raise AssertionError(f"pgbouncer not listening after {STARTUP_TIMEOUT_S} s:\n{bouncer.log()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        # SIGTERM: PgBouncer's immediate shutdown; the test is over, clients may go.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
