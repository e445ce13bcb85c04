"""The bench's lean HTTP client against a real Twisted web server."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from bench.http import JsonClient
from bench.wire import WirePool


class _Answer(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        path = request.path.decode()
        body = request.content.read()
        echo = {
            "method": request.method.decode(),
            "path": path,
            "auth": (request.getHeader(b"authorization") or b"").decode(),
            "body": json.loads(body) if body else None,
        }
        payload = json.dumps(echo).encode()
        if path.endswith("/chunked"):
            # No Content-Length: Twisted sends the body in chunks.
            request.write(payload[:10])
            request.write(payload[10:])
            request.finish()
            return NOT_DONE_YET  # type: ignore[no-any-return]
        if path.endswith("/close"):
            request.setHeader(b"Connection", b"close")
        request.setResponseCode(201 if path.endswith("/created") else 200)
        request.setHeader(b"Content-Length", str(len(payload)).encode())
        return payload


class WireClientTest(unittest.TestCase):
    def setUp(self) -> None:
        self.port = reactor.listenTCP(0, Site(_Answer()), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        base = f"http://127.0.0.1:{self.port.getHost().port}/prefix"
        self.client = JsonClient(base, max_connections=2)
        self.addCleanup(self.client.close)

    async def test_length_chunked_and_close(self) -> None:
        """Bodies by length and by chunks; a closing server gets a new connection."""
        for path in ("/plain", "/chunked", "/close", "/plain", "/created"):
            answer = await self.client.request("POST", path, {"n": path}, token="tok")
            self.assertEqual(answer.code, 201 if path == "/created" else 200)
            self.assertEqual(
                answer.body,
                {
                    "method": "POST",
                    "path": "/prefix" + path,
                    "auth": "Bearer tok",
                    "body": {"n": path},
                },
            )

    async def test_get_without_body(self) -> None:
        answer = await self.client.request("GET", "/plain")
        self.assertEqual(answer.body["method"], "GET")
        self.assertIsNone(answer.body["body"])


class _CountingSite(Site):
    """A Site that counts the connections made to it."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


class IdleConnectionTest(unittest.TestCase):
    """A kept connection idle for longer than ``max_idle`` is closed, not
    reused: the server may be closing it at that very moment."""

    def setUp(self) -> None:
        self.site = _CountingSite(_Answer())
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.now = 1000.0
        self.pool = WirePool(
            "127.0.0.1",
            self.port.getHost().port,
            timeout=10,
            max_idle=30,
            clock=lambda: self.now,
        )
        self.addCleanup(self.pool.close)

    async def _get(self) -> int:
        status, _ = await self.pool.request(self.pool.encode("GET", "/x", [], b""))
        return status

    async def test_reused_while_fresh_replaced_once_idle_too_long(self) -> None:
        self.assertEqual(await self._get(), 200)
        for _ in range(2):  # idle, but never for too long: reused, 40 s on
            self.now += 20
            self.assertEqual(await self._get(), 200)
        self.assertEqual(self.site.connections, 1)
        self.now += 31  # idle for too long: a new connection
        self.assertEqual(await self._get(), 200)
        self.assertEqual(self.site.connections, 2)
        self.now += 10  # the new one is kept
        self.assertEqual(await self._get(), 200)
        self.assertEqual(self.site.connections, 2)

    async def test_open_replaces_stale_connections(self) -> None:
        await self.pool.open(2)
        self.assertEqual(self.site.connections, 2)
        await self.pool.open(2)  # both still fresh
        self.assertEqual(self.site.connections, 2)
        self.now += 31
        await self.pool.open(2)
        self.assertEqual(self.site.connections, 4)
