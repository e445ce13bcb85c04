"""The bench's lean HTTP client against a real Twisted web server."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from bench.http import JsonClient


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
