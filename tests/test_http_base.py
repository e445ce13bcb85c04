"""Tests of the JSON HTTP layer and the embedded host's site."""

from __future__ import annotations

import io
import json
import logging
import tempfile
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from synapse_xsign_module.errors import InteractiveAuthIncomplete, MatrixError
from synapse_xsign_module.hosts.embedded.site import XSignRequest, XSignSite
from synapse_xsign_module.http.base import (
    JsonDict,
    JsonResource,
    read_json_body,
)
from tests.utils import HostTestCase, Response, capture_logs

UPLOAD = "/_matrix/client/v3/keys/upload"

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "X-Requested-With, Content-Type, Authorization",
}


class JsonHttpTestCase(HostTestCase):
    """The embedded host's tree, with helpers for checking JSON responses."""

    def assert_json_headers(self, resp: Response) -> None:
        """The response is JSON with the CORS headers."""
        self.assertEqual(resp.header("Content-Type"), "application/json", resp)
        for name, value in CORS.items():
            self.assertEqual(resp.header(name), value, name)

    def assert_error(self, resp: Response, code: int, errcode: str) -> None:
        """A Matrix error response with the given status and errcode."""
        self.assertEqual(resp.code, code, resp)
        self.assert_json_headers(resp)
        self.assertIsInstance(resp.json, dict, resp)
        self.assertEqual(resp.json["errcode"], errcode, resp)
        self.assertIsInstance(resp.json["error"], str)


class RoutingTest(JsonHttpTestCase):
    """Unknown paths, wrong methods and preflights."""

    async def test_unknown_paths_are_json_404(self) -> None:
        """Unknown paths anywhere in the tree get 404 M_UNRECOGNIZED as JSON."""
        for path in (
            "/",
            "/nothing/here",
            "/_matrix",
            "/_matrix/client/v3/nope",
            "/_matrix/client/v3/keys/nope",
            "/_matrix/client/v3/keys/upload/extra",
            "/_matrix/client/v3/keys/x/upload",
            "/_matrix/client/r0/keys/device_signing/upload",
        ):
            resp = await self.client.get(path)
            self.assert_error(resp, 404, "M_UNRECOGNIZED")
            resp = await self.client.post(path, {})
            self.assert_error(resp, 404, "M_UNRECOGNIZED")

    async def test_wrong_method_is_405(self) -> None:
        """A known path with a method it does not serve gets 405 M_UNRECOGNIZED."""
        resp = await self.client.get(UPLOAD)
        self.assert_error(resp, 405, "M_UNRECOGNIZED")
        resp = await self.client.request("PUT", "/_matrix/client/v3/login", body={})
        self.assert_error(resp, 405, "M_UNRECOGNIZED")
        resp = await self.client.post("/_matrix/client/versions", {})
        self.assert_error(resp, 405, "M_UNRECOGNIZED")

    async def test_options_preflight(self) -> None:
        """OPTIONS answers 200 with CORS headers on known and unknown paths, no auth."""
        for path in (
            UPLOAD,
            "/_matrix/client/v3/login",
            "/_matrix/client/v3/nope",
            "/x",
        ):
            resp = await self.client.request("OPTIONS", path)
            self.assertEqual(resp.code, 200, (path, resp))
            self.assert_json_headers(resp)
            self.assertEqual(resp.json, {})

    async def test_success_has_json_and_cors_headers(self) -> None:
        """Successful responses are JSON with CORS headers and no caching."""
        resp = await self.client.get("/_matrix/client/versions")
        self.assertEqual(resp.code, 200)
        self.assert_json_headers(resp)
        self.assertIn("v1.11", resp.json["versions"])
        self.assertIn("no-store", resp.header("Cache-Control") or "")
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.client.post(UPLOAD, {}, token=alice.token)
        self.assertEqual(resp.code, 200, resp)
        self.assert_json_headers(resp)

    async def test_head_has_headers_and_no_body(self) -> None:
        """HEAD on a GET route answers 200 with the JSON headers and an empty body."""
        resp = await self.client.request("HEAD", "/_matrix/client/versions")
        self.assertEqual(resp.code, 200)
        self.assert_json_headers(resp)
        self.assertEqual(resp.raw, b"")

    async def test_auth_errors_have_json_and_cors_headers(self) -> None:
        """A 401 from a key endpoint is JSON with CORS headers."""
        resp = await self.client.post(UPLOAD, {})
        self.assert_error(resp, 401, "M_MISSING_TOKEN")


class BodyTest(JsonHttpTestCase):
    """Parsing the JSON request body."""

    async def test_body_not_json(self) -> None:
        """A body that is not JSON (or not UTF-8, or NaN) is 400 M_NOT_JSON."""
        alice = await self.user_with_device("alice")
        for raw in (b"{not json", b"\xff\xfe{}", b'{"a": NaN}', b"{}{}", b"{'a': 1}"):
            resp = await self.client.request("POST", UPLOAD, raw=raw, token=alice.token)
            self.assert_error(resp, 400, "M_NOT_JSON")

    async def test_body_not_an_object(self) -> None:
        """A JSON array, string, number or null body is 400 M_BAD_JSON."""
        alice = await self.user_with_device("alice")
        for raw in (b"[]", b'[{"device_keys": {}}]', b'"str"', b"1", b"null"):
            resp = await self.client.request("POST", UPLOAD, raw=raw, token=alice.token)
            self.assert_error(resp, 400, "M_BAD_JSON")

    async def test_empty_body_is_empty_object(self) -> None:
        """An empty body counts as ``{}``."""
        alice = await self.user_with_device("alice")
        resp = await self.client.request("POST", UPLOAD, raw=b"", token=alice.token)
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json, {"one_time_key_counts": {"signed_curve25519": 0}})

    async def test_unexpected_exception_is_500_without_detail(self) -> None:
        """A handler crash is a bare 500 M_UNKNOWN; the traceback goes to the log."""
        records = capture_logs(self, "synapse_xsign_module.http.base")
        resource = JsonResource()

        async def boom(request: Request) -> tuple[int, JsonDict]:
            raise KeyError("secret-detail-1234")

        resource.add_route("GET", "", boom)
        self.host.register_resource("/_test/boom", resource)
        resp = await self.client.get("/_test/boom")
        self.assertEqual(resp.code, 500, resp)
        self.assert_json_headers(resp)
        self.assertEqual(
            resp.json, {"errcode": "M_UNKNOWN", "error": "Internal server error"}
        )
        self.assertNotIn(b"secret-detail", resp.raw)
        self.assertNotIn(b"KeyError", resp.raw)
        errors = [r for r in records if r.levelno >= logging.ERROR]
        self.assertEqual(len(errors), 1)
        message = errors[0].getMessage()
        self.assertIn("Traceback", message)
        self.assertIn("KeyError", message)
        self.assertIn("secret-detail-1234", message)
        self.assertIn("/_test/boom", message)

    async def test_matrix_error_and_uia_from_a_handler(self) -> None:
        """A MatrixError keeps its status, errcode and extra fields; UIA is 401 + body."""
        resource = JsonResource()

        async def limited(request: Request) -> tuple[int, JsonDict]:
            raise MatrixError(429, "M_LIMIT_EXCEEDED", "slow", {"retry_after_ms": 5})

        async def uia(request: Request) -> tuple[int, JsonDict]:
            raise InteractiveAuthIncomplete({"flows": [], "session": "abc"})

        async def named(request: Request, name: str) -> tuple[int, JsonDict]:
            return 201, {"name": name}

        resource.add_route("GET", "limited", limited)
        resource.add_route("GET", "uia", uia)
        resource.add_route("GET", "named/(?P<name>[^/]+)", named)
        self.host.register_resource("/_test/res", resource)

        resp = await self.client.get("/_test/res/limited")
        self.assert_error(resp, 429, "M_LIMIT_EXCEEDED")
        self.assertEqual(
            resp.json,
            {"errcode": "M_LIMIT_EXCEEDED", "error": "slow", "retry_after_ms": 5},
        )
        resp = await self.client.get("/_test/res/uia")
        self.assertEqual(resp.code, 401)
        self.assert_json_headers(resp)
        self.assertEqual(resp.json, {"flows": [], "session": "abc"})
        resp = await self.client.get("/_test/res/named/a%20b")
        self.assertEqual((resp.code, resp.json), (201, {"name": "a b"}))
        resp = await self.client.get("/_test/res/named/x/")
        self.assertEqual((resp.code, resp.json), (201, {"name": "x"}))


class BodyLimitTest(JsonHttpTestCase):
    """The request body size limit through the host's tree."""

    config_overrides = {"max_request_body_size": 1000}

    async def test_body_over_limit_is_413(self) -> None:
        """A body over max_request_body_size is 413 M_TOO_LARGE."""
        alice = await self.user_with_device("alice")
        big = json.dumps({"pad": "x" * 2000}).encode()
        resp = await self.client.request("POST", UPLOAD, raw=big, token=alice.token)
        self.assert_error(resp, 413, "M_TOO_LARGE")
        self.assertIn("1000", resp.json["error"])

    async def test_body_at_limit_is_accepted(self) -> None:
        """A body of exactly max_request_body_size bytes is read."""
        alice = await self.user_with_device("alice")
        body = b'{"pad": "' + b"x" * 1000
        body = body[: 1000 - 2] + b'"}'
        self.assertEqual(len(body), 1000)
        resp = await self.client.request("POST", UPLOAD, raw=body, token=alice.token)
        self.assertEqual(resp.code, 200, resp)

    async def test_login_over_limit_is_413(self) -> None:
        """The host's own endpoints enforce the same limit."""
        big = json.dumps({"type": "m.login.password", "pad": "x" * 2000}).encode()
        resp = await self.client.request("POST", "/_matrix/client/v3/login", raw=big)
        self.assert_error(resp, 413, "M_TOO_LARGE")


def _dummy_request(content: bytes, headers: dict[bytes, bytes] | None = None) -> Any:
    request = DummyRequest([b""])
    request.content = io.BytesIO(content)
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    return request


class ReadJsonBodyTest(unittest.TestCase):
    """read_json_body on requests built directly."""

    def test_reads_object(self) -> None:
        """A JSON object within the limit is returned."""
        self.assertEqual(read_json_body(_dummy_request(b'{"a": [1]}'), 100), {"a": [1]})

    def test_undeclared_body_over_limit(self) -> None:
        """A body over the limit without Content-Length is still 413."""
        with self.assertRaises(MatrixError) as cm:
            read_json_body(_dummy_request(b"{" + b" " * 200 + b"}"), 100)
        self.assertEqual(
            (cm.exception.code, cm.exception.errcode), (413, "M_TOO_LARGE")
        )

    def test_declared_length_over_limit(self) -> None:
        """A declared Content-Length over the limit is 413 before the body is read."""
        request = _dummy_request(b"{}", {b"content-length": b"5000"})
        with self.assertRaises(MatrixError) as cm:
            read_json_body(request, 100)
        self.assertEqual(cm.exception.code, 413)

    def test_flagged_request(self) -> None:
        """A request flagged by the site as too large is 413."""
        request = _dummy_request(b"{}")
        request.xsign_body_too_large = True
        with self.assertRaises(MatrixError) as cm:
            read_json_body(request, 100)
        self.assertEqual(cm.exception.code, 413)

    def test_bad_content_length(self) -> None:
        """A Content-Length that is not a number is 400."""
        request = _dummy_request(b"{}", {b"content-length": b"abc"})
        with self.assertRaises(MatrixError) as cm:
            read_json_body(request, 100)
        self.assertEqual(cm.exception.code, 400)

    def test_no_content(self) -> None:
        """A request without content is ``{}``."""
        request = DummyRequest([b""])
        request.content = None
        self.assertEqual(read_json_body(request, 100), {})


class SiteTest(unittest.TestCase):
    """XSignSite and XSignRequest, fed raw HTTP bytes over a fake transport."""

    def setUp(self) -> None:
        self.seen: list[Any] = []
        self.buffered: list[bytes] = []
        self.resource = JsonResource()

        async def echo(request: Request) -> tuple[int, JsonDict]:
            self.seen.append(request)
            assert request.content is not None
            request.content.seek(0)
            self.buffered.append(request.content.read())
            body = read_json_body(request, request.max_body)  # type: ignore[attr-defined]
            return 200, {"keys": sorted(body)}

        self.resource.add_route("POST", "", echo)
        self.resource.add_route("GET", "", echo)
        self.access = capture_logs(self, "synapse_xsign_module.access")

    def make_site(
        self, access_log: bool = False, x_forwarded: bool = False, max_body: int = 100
    ) -> XSignSite:
        """A site over the echo resource (a 100-byte body limit by default)."""
        site = XSignSite(self.resource, max_body, x_forwarded, access_log)
        site.reactor = Clock()  # channel timeouts on a fake clock
        return site

    def count_temp_files(self) -> list[int]:
        """A list that grows by one for every temporary file opened."""
        opened: list[int] = []
        real = tempfile.TemporaryFile

        def counting(*args: Any, **kwargs: Any) -> Any:
            opened.append(1)
            return real(*args, **kwargs)

        self.patch(tempfile, "TemporaryFile", counting)
        return opened

    def send(self, site: XSignSite, data: bytes) -> bytes:
        """Feed raw bytes to a new connection; returns what the server wrote."""
        channel = site.buildProtocol(IPv4Address("TCP", "10.1.2.3", 12345))
        assert channel is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 12345))
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        channel.dataReceived(data)
        written: bytes = transport.value()
        return written

    @staticmethod
    def status_and_body(raw: bytes) -> tuple[int, Any]:
        """Status code and JSON body of a raw HTTP/1.1 response."""
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, json.loads(body)

    def test_request_class(self) -> None:
        """The site builds XSignRequests carrying its limit."""
        site = self.make_site()
        self.send(site, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(len(self.seen), 1)
        self.assertIsInstance(self.seen[0], XSignRequest)
        self.assertEqual(self.seen[0].max_body, 100)

    def test_form_content_type_is_not_parsed_as_a_form(self) -> None:
        """A POST labelled as a form is not parsed as one: the body stays JSON."""
        body = b"a=1&b=2"
        out = self.send(
            self.make_site(),
            b"POST / HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        self.assertEqual(self.seen[0].args, {})
        self.assertEqual(self.buffered, [body])
        status, payload = self.status_and_body(out)
        self.assertEqual((status, payload["errcode"]), (400, "M_NOT_JSON"))

    def test_body_within_limit_is_buffered(self) -> None:
        """A body within the limit is buffered and parsed."""
        body = b'{"a": 1, "b": 2}'
        out = self.send(
            self.make_site(),
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body),
        )
        self.assertEqual(self.status_and_body(out), (200, {"keys": ["a", "b"]}))
        self.assertFalse(self.seen[0].xsign_body_too_large)
        self.assertEqual(self.buffered, [body])
        self.assertIn(b"\r\nContent-Length: 18\r\n", out)  # {"keys":["a","b"]}

    def test_declared_length_over_limit_is_flagged_and_not_buffered(self) -> None:
        """A Content-Length over the limit flags the request; no body is kept."""
        body = b'{"a": "' + b"x" * 500 + b'"}'
        out = self.send(
            self.make_site(),
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body),
        )
        status, payload = self.status_and_body(out)
        self.assertEqual(status, 413)
        self.assertEqual(payload["errcode"], "M_TOO_LARGE")
        self.assertTrue(self.seen[0].xsign_body_too_large)
        self.assertEqual(self.buffered, [b""])

    def test_huge_declared_length_opens_no_temp_file(self) -> None:
        """A declared length over the limit gets an in-memory buffer, not a temp file."""
        opened = self.count_temp_files()
        out = self.send(
            self.make_site(),
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n"
            + b"x" * 200000,
        )
        status, _ = self.status_and_body(out)
        self.assertEqual(status, 413)
        self.assertEqual(opened, [])

    def test_large_body_within_limit_is_kept_in_memory(self) -> None:
        """A body of 100 kB or more within the limit is parsed from memory:
        Twisted alone would write it to a temp file and read it back."""
        opened = self.count_temp_files()
        site = self.make_site(max_body=1_000_000)
        body = b'{"a": "' + b"x" * 200_000 + b'", "b": 1}'
        out = self.send(
            site,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body),
        )
        self.assertEqual(self.status_and_body(out), (200, {"keys": ["a", "b"]}))
        self.assertEqual(opened, [])
        self.assertEqual(self.buffered, [body])

    def test_bodies_past_a_megabyte_move_to_a_file(self) -> None:
        """A body declared over 1 MiB, or chunked past 1 MiB, within the limit,
        is buffered in a file once past 1 MiB (not all in memory), and read
        back whole."""
        from synapse_xsign_module.hosts.embedded.site import MEMORY_BODY

        opened = self.count_temp_files()
        site = self.make_site(max_body=4 * MEMORY_BODY)
        body = b'{"a": "' + b"x" * (2 * MEMORY_BODY) + b'", "b": 1}'
        out = self.send(
            site,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body),
        )
        self.assertEqual(self.status_and_body(out), (200, {"keys": ["a", "b"]}))
        self.assertEqual(opened, [1])
        self.assertEqual(self.buffered, [body])
        small = b'{"c": 1}'
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)
        out = self.send(
            site,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked,
        )
        self.assertEqual(self.status_and_body(out), (200, {"keys": ["c"]}))
        self.assertEqual(opened, [1])  # a small chunked body stays in memory

    def test_requests_in_progress_are_counted(self) -> None:
        """A request counts from its request line until it is answered, or
        until its connection is lost."""
        site = self.make_site()
        channel = site.buildProtocol(IPv4Address("TCP", "10.1.2.3", 12345))
        assert channel is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 12345))
        channel.makeConnection(transport)
        self.assertEqual(site.in_progress, 0)
        channel.dataReceived(b"POST / HTTP/1.1\r\n")
        self.assertEqual(site.in_progress, 1)
        channel.dataReceived(b"Host: x\r\nContent-Length: 8\r\n\r\n{}")
        self.assertEqual(site.in_progress, 1)  # body still arriving
        channel.dataReceived(b"      ")
        self.assertEqual(self.status_and_body(transport.value()), (200, {"keys": []}))
        self.assertEqual(site.in_progress, 0)
        # Lost while its body arrives: no longer in progress.
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{"
        )
        self.assertEqual(site.in_progress, 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(site.in_progress, 0)

    def test_chunked_body_over_limit_is_flagged(self) -> None:
        """A chunked body growing past the limit is flagged; the excess is dropped."""
        chunk = b"x" * 80
        data = (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"50\r\n"
            + chunk
            + b"\r\n"
            + b"50\r\n"
            + chunk
            + b"\r\n"
            + b"50\r\n"
            + chunk
            + b"\r\n"
            + b"0\r\n\r\n"
        )
        out = self.send(self.make_site(), data)
        status, payload = self.status_and_body(out)
        self.assertEqual((status, payload["errcode"]), (413, "M_TOO_LARGE"))
        self.assertTrue(self.seen[0].xsign_body_too_large)
        self.assertEqual(self.buffered, [chunk])

    def test_access_log_masks_token(self) -> None:
        """The access log names client, method, path and status, never the token."""
        self.send(
            self.make_site(access_log=True),
            b"GET /?a=1&access_token=sekrit&b=2 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        self.assertEqual(len(self.access), 1)
        line = self.access[0].getMessage()
        self.assertNotIn("sekrit", line)
        self.assertIn("10.1.2.3 - GET /?a=1&access_token=<redacted>&b=2 200", line)

    def test_access_log_forwarded_for(self) -> None:
        """With x_forwarded the logged client is the first X-Forwarded-For entry."""
        self.send(
            self.make_site(access_log=True, x_forwarded=True),
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.7, 10.0.0.1\r\n\r\n",
        )
        self.assertTrue(self.access[0].getMessage().startswith("192.0.2.7 - GET / 200"))

    def test_forwarded_for_ignored_unless_trusted(self) -> None:
        """Without x_forwarded the peer address is logged, not X-Forwarded-For."""
        self.send(
            self.make_site(access_log=True),
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n",
        )
        self.assertTrue(self.access[0].getMessage().startswith("10.1.2.3 - GET / 200"))

    def test_access_log_off(self) -> None:
        """With access_log off nothing is logged per request."""
        self.send(self.make_site(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.access, [])
