"""Fault injection at the ports: the Nth Postgres or Redis call of a run fails.

The wrappers subclass the real ports and reuse their open pool and client; every public
async method (found by introspection, so a method added later is wrapped too) counts
one call on the run's FaultPlan, which decides whether that call errs, loses its reply
or kills the process generation that made it.
"""

from __future__ import annotations

import contextvars
import enum
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import anyio

from reconciler.app import Ports
from reconciler.database import Database, Session
from reconciler.errors import RetryableError
from reconciler.queue import JobQueue

# Not wrapped: lifecycle methods belong to whoever opened the port (the harness).
EXCLUDED: Final = {
    "connect": "lifecycle: the harness opens the real pool once per lane",
    "close": "lifecycle: the harness closes the real pool and client after the sweep",
}


class Crash(BaseException):
    """The process of a generation died: not an Exception, so no supervisor catches it."""


class Mode(enum.StrEnum):
    ERROR = "error"  # the request never reached the server
    LOST = "lost"  # the server did it, the reply was lost
    CRASH = "crash"  # the server did it, then the process died


@dataclass(eq=False)
class Generation:
    """One life of the service process; dead after a crash, for good."""

    number: int
    dead: bool = False
    died: anyio.Event = field(default_factory=anyio.Event)
    # Run synchronously at death, before any task of the generation runs again.
    on_death: list[Callable[[], None]] = field(default_factory=list)

    def die(self) -> None:
        self.dead = True
        for callback in self.on_death:
            callback()
        self.died.set()

    def check(self) -> None:
        """A dead process does nothing: every call it still makes fails at once."""
        if self.dead:
            raise Crash(f"generation {self.number} is dead")


# The generation whose tasks are running: inherited by every task the service spawns.
CURRENT_GENERATION: contextvars.ContextVar[Generation | None] = contextvars.ContextVar(
    "fault_generation", default=None
)


@dataclass(eq=False)
class FaultPlan:
    """Which calls of a run fail and how; counts and logs every call that was made."""

    mode: Mode | None = None
    points: frozenset[int] = frozenset()
    # Or, instead of a position, the first call of this port method (`JobQueue.release`).
    method: str | None = None
    calls: int = 0
    log: list[tuple[int, str]] = field(default_factory=list)
    crashed: bool = False
    injected: list[tuple[int, str]] = field(default_factory=list)

    def point(self, name: str) -> Mode | None:
        """Counts one call; raises for `error`, else says what to do after the real call."""
        self.calls += 1
        self.log.append((self.calls, name))
        first_of_method = self.method == name and not self.injected
        if self.mode is None or not (self.calls in self.points or first_of_method):
            return None
        self.injected.append((self.calls, name))
        if self.mode is Mode.ERROR:
            raise RetryableError(f"injected: call {self.calls} ({name}) never reached the server")
        return self.mode

    def after(self, name: str, fault: Mode | None, generation: Generation) -> None:
        """Runs once the real call returned: a reply reaching a dead process is lost too."""
        generation.check()
        if fault is Mode.LOST:
            raise RetryableError(f"injected: the reply to {name} was lost")
        if fault is Mode.CRASH:
            self.crashed = True
            generation.die()
            raise Crash(f"injected: generation {generation.number} died after {name}")


class _Faulty:
    """What every wrapper holds: the real port, the run's plan, its generation."""

    _inner: Any
    _plan: FaultPlan
    _generation: Generation

    def _adopt(self, inner: Any, plan: FaultPlan, generation: Generation) -> None:
        # The real port's state as is (pool or client, key names, scripts), so whatever
        # the port grows later is shared rather than rebuilt from guessed arguments.
        self.__dict__.update(vars(inner))
        self._inner, self._plan, self._generation = inner, plan, generation

    def _wrap_result(self, value: Any) -> Any:
        if isinstance(value, Session):
            return FaultySession(value, self._plan, self._generation)
        return value


def port_methods(cls: type) -> Iterator[tuple[str, str]]:
    """(name, kind) of each public async method: `coroutine` or `context` manager."""
    for name, attr in inspect.getmembers(cls):
        if name.startswith("_"):
            continue
        if inspect.iscoroutinefunction(attr):
            yield name, "coroutine"
        elif inspect.isasyncgenfunction(getattr(attr, "__wrapped__", None)):
            yield name, "context"


def _coroutine(qualname: str, name: str) -> Callable[..., Any]:
    async def method(self: _Faulty, *args: Any, **kwargs: Any) -> Any:
        self._generation.check()
        fault = self._plan.point(qualname)
        result = await getattr(self._inner, name)(*args, **kwargs)
        self._plan.after(qualname, fault, self._generation)
        return self._wrap_result(result)

    method.__name__ = name
    return method


def _context(qualname: str, name: str) -> Callable[..., AbstractAsyncContextManager[Any]]:
    @asynccontextmanager
    async def method(self: _Faulty, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        # The fault point is the entry: acquiring the connection, beginning the transaction.
        self._generation.check()
        fault = self._plan.point(qualname)
        async with getattr(self._inner, name)(*args, **kwargs) as value:
            self._plan.after(qualname, fault, self._generation)
            yield self._wrap_result(value)

    method.__name__ = name
    return method


def _wrap_all(faulty: type[_Faulty], port: type) -> type[_Faulty]:
    """Overrides every public async method of `port` on `faulty` with a counting one."""
    for name, kind in port_methods(port):
        if name in EXCLUDED:
            continue
        make = _coroutine if kind == "coroutine" else _context
        setattr(faulty, name, make(f"{port.__name__}.{name}", name))
    return faulty


class FaultySession(_Faulty, Session):
    def __init__(self, inner: Session, plan: FaultPlan, generation: Generation) -> None:
        self._adopt(inner, plan, generation)


class FaultyDatabase(_Faulty, Database):
    def __init__(self, inner: Database, plan: FaultPlan, generation: Generation) -> None:
        self._adopt(inner, plan, generation)


class FaultyQueue(_Faulty, JobQueue):
    def __init__(self, inner: JobQueue, plan: FaultPlan, generation: Generation) -> None:
        self._adopt(inner, plan, generation)


_wrap_all(FaultySession, Session)
_wrap_all(FaultyDatabase, Database)
_wrap_all(FaultyQueue, JobQueue)

WRAPPERS: Final[dict[type, type[_Faulty]]] = {
    Database: FaultyDatabase,
    Session: FaultySession,
    JobQueue: FaultyQueue,
}


def faulty_ports(real: Ports, plan: FaultPlan, generation: Generation) -> Ports:
    """The ports one generation uses: the real pool and client, behind the plan."""
    return Ports(
        FaultyDatabase(real.db, plan, generation), FaultyQueue(real.queue, plan, generation)
    )
