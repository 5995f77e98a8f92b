"""The Redis port's commands, packed in C, are the bytes redis-py's own packer sends."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.typing import EncodableT

from reconciler import resp
from reconciler.queue import JobQueue
from tests.services import Endpoints

COMMANDS: list[tuple[EncodableT, ...]] = [
    ("XACK", "ns:jobs", "ns:workers", "1-0", "2-0"),
    ("XREADGROUP", "GROUP", "g", "c", "COUNT", 128, "BLOCK", 500, "STREAMS", "s", ">"),
    ("EVALSHA", "0" * 40, 2, "ns:jobs", "ns:queued", 1, 2, "job", '{"a": "é"}'),
    ("SET", "k", 1.5),
    ("SET", "k", -3),
    ("SET", "k", b"\x00\xff\r\n"),
    ("SET", "k", "x" * 10_000),  # longer than redis-py's buffer cutoff: chunked there
    ("CONFIG GET", "maxmemory"),  # a command name of two words
    (b"CLIENT SETNAME", "consumer-1"),
]


def _wire(connection: Any, args: tuple[EncodableT, ...]) -> bytes:
    return b"".join(connection.pack_command(*args))


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: str(args[0]))
def test_packed_in_c_as_redis_py_packs_in_python(args: tuple[EncodableT, ...]) -> None:
    assert _wire(resp.TcpConnection(), args) == _wire(Connection(), args)


def test_a_memoryview_goes_through_the_python_packer() -> None:
    args: tuple[EncodableT, ...] = ("SET", "k", memoryview(b"v" * 10_000))
    assert _wire(resp.TcpConnection(), args) == _wire(Connection(), args)


@pytest.mark.parametrize(
    ("url", "made"),
    [
        ("redis://127.0.0.1:1/0", resp.TcpConnection),
        ("rediss://127.0.0.1:1/0", resp.TlsConnection),
        ("unix:///tmp/none.sock", resp.UnixConnection),
    ],
)
async def test_every_scheme_gets_its_class_packing_in_c(url: str, made: type[object]) -> None:
    queue = JobQueue.connect(url, "ns")
    try:
        pool = queue._redis.connection_pool
        assert pool.connection_class is made
        assert issubclass(made, (Connection, SSLConnection, UnixDomainSocketConnection))
    finally:
        await queue.close()


async def test_the_port_round_trips_through_the_c_packer(
    services: Endpoints, namespace: str
) -> None:
    """Jobs enqueued, read and acknowledged over a real connection packed in C."""
    queue = JobQueue.connect(services.redis_url, namespace)
    try:
        await queue.ensure_group()
        entries = [{"job": f'{{"batch_id": "b", "file_id": "f{i}", "uri": "é"}}'} for i in range(3)]
        ids = await queue.enqueue(entries, [f"b/f{i}" for i in range(3)])
        read = await queue.read("c1", 10, 100)
        assert [d.id for d in read] == ids
        assert [d.fields[b"job"].decode() for d in read] == [e["job"] for e in entries]
        await queue.ack(ids, [f"b/f{i}" for i in range(3)])
        assert await queue.length() == 0
    finally:
        await queue.close()
