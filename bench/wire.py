"""A lean HTTP/1.1 client for plain-HTTP targets: keep-alive connections, one
request at a time on each, no more parsing than a JSON API needs.

treq's Agent costs the bench about as much CPU per request as a small request
costs the server, and the bench shares the machine with the server it measures;
this client leaves the cores to the server. It speaks just enough HTTP/1.1 for
the homeservers under test: ``Content-Length`` and chunked bodies, ``Connection:
close``, and a fresh connection whenever a kept one has gone away, or has
been idle long enough for the server to be closing it.
"""

from __future__ import annotations

import time
import typing
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

#: Seconds a kept connection may stay idle and still be reused. Servers close
#: idle connections (Twisted's web server, the embedded host's, after 60 s by
#: default); a request written just as the server closes is lost ("connection
#: lost: Connection was closed cleanly"). With ``--interleave`` a target's
#: connections stay idle while the other targets run their cells.
MAX_IDLE = 30.0


class WireError(Exception):
    """The connection broke or the server's answer was not HTTP/1.1."""


class _Transport(typing.Protocol):
    """What this client uses of a TCP transport (Twisted declares its
    interfaces' methods without ``self``, which mypy cannot check)."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...


class _Connection(Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self._buf = b""
        self._waiting: defer.Deferred[tuple[int, bytes]] | None = None
        self._reset()
        self.usable = True
        #: When the connection last became idle (the pool's clock).
        self.idle_since = 0.0

    def _reset(self) -> None:
        self._status: int | None = None
        self._length: int | None = None
        self._chunked = False
        self._close_after = False
        self._chunks: list[bytes] = []

    @property
    def wire(self) -> _Transport | None:
        """The connection's transport; None until connected."""
        return cast("_Transport | None", self.transport)

    def close(self) -> None:
        """Close the connection, if it was made."""
        if self.wire is not None:
            self.wire.loseConnection()

    def send(self, data: bytes) -> defer.Deferred[tuple[int, bytes]]:
        """Write a whole request; fires with (status, body)."""
        assert self._waiting is None, "one request at a time"
        d: defer.Deferred[tuple[int, bytes]] = defer.Deferred()
        self._waiting = d
        assert self.wire is not None
        self.wire.write(data)
        return d

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        try:
            self._parse()
        except (ValueError, IndexError) as e:
            self._fail(WireError(f"bad HTTP answer: {e}"))
            assert self.wire is not None
            self.wire.loseConnection()

    def _parse(self) -> None:
        if self._status is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buf = self._buf[:end], self._buf[end + 4 :]
            lines = head.split(b"\r\n")
            self._status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                value = value.strip()
                if name == b"content-length":
                    self._length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self._chunked = True
                elif name == b"connection" and value.lower() == b"close":
                    self._close_after = True
        if self._chunked:
            self._parse_chunks()
        elif self._length is not None and len(self._buf) >= self._length:
            body, self._buf = self._buf[: self._length], self._buf[self._length :]
            self._done(body)

    def _parse_chunks(self) -> None:
        while True:
            end = self._buf.find(b"\r\n")
            if end < 0:
                return
            size = int(self._buf[:end].split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = self._buf.find(b"\r\n\r\n", end)
                if trailer_end < 0:
                    return
                self._buf = self._buf[trailer_end + 4 :]
                self._done(b"".join(self._chunks))
                return
            if len(self._buf) < end + 2 + size + 2:
                return
            self._chunks.append(self._buf[end + 2 : end + 2 + size])
            self._buf = self._buf[end + 2 + size + 2 :]

    def _done(self, body: bytes) -> None:
        status = self._status
        assert status is not None
        if self._close_after:
            self.usable = False
        self._reset()
        d, self._waiting = self._waiting, None
        if d is not None:
            d.callback((status, body))

    def _fail(self, error: Exception) -> None:
        self.usable = False
        d, self._waiting = self._waiting, None
        if d is not None:
            d.errback(Failure(error))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._status is not None and self._length is None and not self._chunked:
            # A body delimited by the end of the connection.
            body = self._buf
            self._buf = b""
            self._done(body)
        self._fail(WireError(f"connection lost: {reason.getErrorMessage()}"))


class WirePool:
    """Keep-alive connections to one ``host:port``.

    Args:
        host: the server's host name or address.
        port: its port.
        timeout: seconds before a request is given up.
        max_idle: seconds after which an idle connection is closed rather than
            reused (see :data:`MAX_IDLE`).
        clock: the time in seconds (monotonic).
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        max_idle: float = MAX_IDLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._host = host
        self._port = port
        self._timeout = timeout
        self._max_idle = max_idle
        self._clock = clock
        self._idle: deque[_Connection] = deque()
        self._all: set[_Connection] = set()
        self._host_header = f"{host}:{port}".encode("ascii")

    async def open(self, n: int) -> None:
        """Have at least ``n`` kept connections: idle ones are reused first."""
        self._drop_unusable()
        missing = n - len(self._idle)
        if missing <= 0:
            return
        new = await defer.gatherResults(
            [defer.ensureDeferred(self._connect()) for _ in range(missing)],
            consumeErrors=True,
        )
        self._idle.extend(new)

    def _reusable(self, conn: _Connection) -> bool:
        return (
            conn.usable
            and conn.transport is not None
            and self._clock() - conn.idle_since <= self._max_idle
        )

    def _drop_unusable(self) -> None:
        """Close and forget the idle connections that may not be reused."""
        keep: deque[_Connection] = deque()
        for conn in self._idle:
            if self._reusable(conn):
                keep.append(conn)
            else:
                self._forget(conn)
        self._idle = keep

    def _forget(self, conn: _Connection) -> None:
        """Close a connection and never hand it out again."""
        self._all.discard(conn)
        conn.close()

    async def _connect(self) -> _Connection:
        """A new kept connection."""
        r: Any = reactor
        endpoint = TCP4ClientEndpoint(r, self._host, self._port, timeout=30)
        conn: _Connection = await connectProtocol(endpoint, _Connection())
        conn.idle_since = self._clock()
        self._all.add(conn)
        return conn

    async def _connection(self) -> _Connection:
        # First in, first out: requests rotate over every kept connection, and
        # so over every process of a server whose processes share the port
        # (the kernel hands each connection to one of them).
        while self._idle:
            conn = self._idle.popleft()
            if self._reusable(conn):
                return conn
            self._forget(conn)
        return await self._connect()

    def encode(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> bytes:
        """The bytes of one request."""
        lines = [
            f"{method} {path} HTTP/1.1".encode("ascii"),
            b"Host: " + self._host_header,
            b"Content-Length: " + str(len(body)).encode("ascii"),
        ]
        lines += [name + b": " + value for name, value in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send the bytes of one request; returns (status, body)."""
        conn = await self._connection()
        d = conn.send(data)
        r: Any = reactor
        timer = r.callLater(self._timeout, d.cancel)
        try:
            result = await d
        except BaseException:
            self._forget(conn)
            raise
        finally:
            if timer.active():
                timer.cancel()
        if conn.usable:
            conn.idle_since = self._clock()
            self._idle.append(conn)
        else:
            self._forget(conn)
        return result

    def close(self) -> None:
        """Close every connection."""
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
