"""A JSON-over-HTTP client on the real reactor, with persistent connections.

Plain ``http://`` targets go through the lean client in :mod:`bench.wire`;
``https://`` ones through treq.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attr

import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

try:
    # Parsing every answer (600 KB for W6 at Q=500) is most of the bench's own
    # CPU, which shares the machine with the server: orjson takes less of it.
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _DECODE_ERRORS: tuple[type[Exception], ...] = (ValueError, orjson.JSONDecodeError)
except ImportError:  # pragma: no cover - the bench env installs it
    _loads = json.loads
    _DECODE_ERRORS = (ValueError,)
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from bench.wire import WirePool

JsonDict = dict[str, Any]

#: Seconds before a request is given up (the bench counts it as an error).
REQUEST_TIMEOUT = 120.0


@attr.s(frozen=True, auto_attribs=True, slots=True)
class Answer:
    """A finished request: status, parsed body (None if not JSON), latency (s)."""

    code: int
    body: Any
    latency: float

    def describe(self) -> str:
        """A short text for error samples."""
        text = json.dumps(self.body)[:300] if self.body is not None else "(not JSON)"
        return f"HTTP {self.code} {text}"


class RequestFailed(Exception):
    """A setup request did not get the answer it needed."""


def encode(body: Any) -> bytes:
    """Compact JSON bytes (bodies are encoded before a cell is timed)."""
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


class JsonClient:
    """Talks to one homeserver over a persistent connection pool.

    Args:
        base_url: e.g. ``http://127.0.0.1:8008`` (no trailing slash needed).
        max_connections: persistent connections kept per host.
    """

    def __init__(self, base_url: str, max_connections: int = 32) -> None:
        self.base_url = base_url.rstrip("/")
        r: Any = reactor
        self.pool = HTTPConnectionPool(r, persistent=True)
        self.pool.maxPersistentPerHost = max_connections
        self.pool.cachedConnectionTimeout = 600
        self.pool.retryAutomatically = False
        # Agent implements IAgent (zope), which mypy does not see.
        self._http = HTTPClient(Agent(r, pool=self.pool))  # type: ignore[arg-type]
        url = urlsplit(self.base_url)
        self._prefix = url.path.rstrip("/")
        self._wire: WirePool | None = None
        if url.scheme == "http" and url.hostname:
            self._wire = WirePool(url.hostname, url.port or 80, REQUEST_TIMEOUT)

    async def open_connections(self, n: int) -> None:
        """Keep at least ``n`` connections open (plain-HTTP targets): requests
        rotate over all of them, as many clients' would."""
        if self._wire is not None:
            await self._wire.open(n)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        """Send one request and read the whole answer.

        Args:
            method: HTTP method.
            path: path (and query) below the base URL.
            body: a JSON value to send, or None.
            token: access token for ``Authorization: Bearer``.
            raw: pre-encoded JSON body (wins over ``body``).
        """
        data = raw if raw is not None else (encode(body) if body is not None else None)
        headers: list[tuple[bytes, bytes]] = []
        if token is not None:
            headers.append((b"Authorization", b"Bearer " + token.encode("ascii")))
        if data is not None:
            headers.append((b"Content-Type", b"application/json"))
        if self._wire is not None:
            wire_request = self._wire.encode(
                method, self._prefix + path, headers, data or b""
            )
            start = time.perf_counter()
            code, content = await self._wire.request(wire_request)
        else:
            treq_headers = Headers({name: [value] for name, value in headers})
            start = time.perf_counter()
            resp = await self._http.request(
                method,
                self.base_url + path,
                data=data,
                headers=treq_headers,
                timeout=REQUEST_TIMEOUT,
            )
            code, content = resp.code, await treq.content(resp)
        latency = time.perf_counter() - start
        try:
            parsed: Any = _loads(content) if content else None
        except _DECODE_ERRORS:
            parsed = None
        return Answer(code, parsed, latency)

    async def post(
        self, path: str, body: Any = None, token: str | None = None
    ) -> Answer:
        """POST JSON."""
        return await self.request("POST", path, body if body is not None else {}, token)

    async def must(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        ok: tuple[int, ...] = (200,),
        what: str = "",
    ) -> JsonDict:
        """A setup request that has to succeed; waits out rate limits (429).

        Raises:
            RequestFailed: any other status, or a body that is not an object.
        """
        for _ in range(200):
            answer = await self.request(method, path, body, token)
            if answer.code == 429:
                retry_ms = 500
                if isinstance(answer.body, dict):
                    retry_ms = int(answer.body.get("retry_after_ms") or retry_ms)
                await sleep(min(retry_ms, 10_000) / 1000)
                continue
            if answer.code in ok and isinstance(answer.body, dict):
                return answer.body
            raise RequestFailed(f"{what or method + ' ' + path}: {answer.describe()}")
        raise RequestFailed(f"{what or method + ' ' + path}: still rate-limited")

    async def close(self) -> None:
        """Close the pooled connections."""
        if self._wire is not None:
            self._wire.close()
        await self.pool.closeCachedConnections()


async def sleep(seconds: float) -> None:
    """Wait on the reactor."""
    await deferLater(reactor, seconds, lambda: None)


async def gather_limited(jobs: list[Any], limit: int, fn: Any) -> list[Any]:
    """``await fn(job)`` for every job, at most ``limit`` at a time; results in order.

    The first failure is raised as soon as it happens.
    """
    sem = defer.DeferredSemaphore(limit)

    def one(job: Any) -> defer.Deferred[Any]:
        return sem.run(lambda: defer.ensureDeferred(fn(job)))

    try:
        results: list[Any] = await defer.gatherResults(
            [one(j) for j in jobs], consumeErrors=True
        )
    except defer.FirstError as e:
        e.subFailure.raiseException()
    return results
