"""Redis commands packed by hiredis's C packer, on the asyncio client too.

redis-py's synchronous connections pack commands with `hiredis.pack_command` when
hiredis is installed; before 8.2 its asyncio connections packed them in Python, one
encode and one join per argument (redis/redis-py#4176). The job stream's commands carry many
arguments (a block's acknowledgements, a batch's jobs), so the Python packer was 0.27 s
of a 1.08 s profile of `Client.submit` (400 batches of 50 files). `in_c` gives a client's
pool the same connection classes with redis-py's own hiredis packer; the bytes on the
wire are the same (tested). Without hiredis the pool is left as it is.

redis-py 8.2 packs asyncio commands with hiredis too, but it encodes each argument in
Python first: 99 us for an XACK of 64 ids against 34-37 us here, 77-91 against 33 for a
50-job EVALSHA (timeit, redis-py 8.2.0, two runs each), so the swap still pays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.connection import HiredisRespSerializer
from redis.typing import EncodableT
from redis.utils import HIREDIS_AVAILABLE

# redis-py 8.2 gave the serializer a constructor without annotations (a fallback and an
# encoder, both optional), which mypy --strict will not call directly; 8.1 had none.
# Without either it packs as 8.1's did: the arguments as they are, in C.
_new_serializer: Callable[[], HiredisRespSerializer] = HiredisRespSerializer
_PACKER: Final = _new_serializer()


def _packed(connection: AbstractConnection, args: tuple[EncodableT, ...]) -> list[bytes]:
    if any(isinstance(arg, memoryview) for arg in args):
        # The Python packer sends large memoryviews without a copy: keep it for them.
        return AbstractConnection.pack_command(connection, *args)
    # redis-py annotates each of `pack`'s arguments as a list; they are the command's.
    packed: list[bytes] = _PACKER.pack(*args)  # type: ignore[arg-type]
    return packed


class TcpConnection(Connection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return _packed(self, args)


class TlsConnection(SSLConnection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return _packed(self, args)


class UnixConnection(UnixDomainSocketConnection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return _packed(self, args)


_IN_C: Final[dict[type[AbstractConnection], type[AbstractConnection]]] = {
    Connection: TcpConnection,
    SSLConnection: TlsConnection,
    UnixDomainSocketConnection: UnixConnection,
}


def in_c(client: aioredis.Redis) -> aioredis.Redis:
    """The client, its new connections packing commands with hiredis (when installed)."""
    pool = client.connection_pool
    if HIREDIS_AVAILABLE:
        pool.connection_class = _IN_C.get(pool.connection_class, pool.connection_class)
    return client
