"""Hostile or odd client input gets a clear 4xx, never a 500, a hang or a leak."""

from __future__ import annotations

import json
import logging
from typing import Any

from twisted.trial import unittest

from synapse_xsign_module.errors import MatrixError
from synapse_xsign_module.http.base import (
    JsonResource,
    check_json_text,
    check_json_value,
)
from tests.utils import HostTestCase

UPLOAD = "/_matrix/client/v3/keys/upload"
QUERY = "/_matrix/client/v3/keys/query"
CLAIM = "/_matrix/client/v3/keys/claim"
SIGS = "/_matrix/client/v3/keys/signatures/upload"
XSIGN = "/_matrix/client/v3/keys/device_signing/upload"


class HardeningTest(HostTestCase):
    """Input that would poison stored keys or break the server is refused."""

    async def raw_post(self, path: str, raw: bytes, token: str) -> Any:
        return await self.client.request("POST", path, raw=raw, token=token)

    async def test_non_finite_and_huge_numbers(self) -> None:
        """1e400, -1e999 and integers beyond 2^53 are 400 M_BAD_JSON; nothing stored."""
        alice = await self.user_with_device("alice", "ADEV")
        dk = alice.device_keys()
        for extra in (b"1e400", b"-1e999", b"9007199254740993", b"-9007199254740993"):
            raw = (
                b'{"device_keys": '
                + json.dumps(dk).encode()[:-1]
                + b', "x": '
                + extra
                + b"}}"
            )
            resp = await self.raw_post(UPLOAD, raw, alice.token)
            self.assertEqual(
                (resp.code, resp.json["errcode"]), (400, "M_BAD_JSON"), extra
            )
        resp = await self.client.post(
            QUERY, {"device_keys": {alice.user_id: []}}, token=alice.token
        )
        self.assertEqual(resp.json["device_keys"][alice.user_id], {})

    async def test_deep_nesting(self) -> None:
        """JSON nested deeper than the limit is 400 M_BAD_JSON."""
        alice = await self.user_with_device("alice", "ADEV")
        deep: Any = "x"
        for _ in range(100):
            deep = {"a": deep}
        resp = await self.client.post(
            UPLOAD,
            {"device_keys": {**alice.device_keys(), "deep": deep}},
            token=alice.token,
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (400, "M_BAD_JSON"))

    async def test_lone_surrogate_and_nul(self) -> None:
        """Lone surrogates and NUL characters are 400, and the request is answered."""
        alice = await self.user_with_device("alice", "ADEV")
        for path, raw in (
            (CLAIM, b'{"one_time_keys": {"\\ud800": 5}}'),
            (UPLOAD, b'{"one_time_keys": {"a:\\udfff": 5}}'),
            (QUERY, b'{"device_keys": {"@a:test.local": ["\\u0000"]}}'),
            (QUERY, b'{"device_keys": {"@\\ud800:test.local": []}}'),
        ):
            resp = await self.raw_post(path, raw, alice.token)
            self.assertEqual(
                (resp.code, resp.json["errcode"]), (400, "M_BAD_JSON"), raw
            )
        resp = await self.client.request(
            "POST",
            "/_matrix/client/v3/login",
            raw=b'{"type":"m.login.password","user":"\\ud800","password":"x"}',
        )
        self.assertEqual(resp.code, 400, resp)

    async def test_signatures_not_an_object(self) -> None:
        """A signed object whose 'signatures' is not an object is 400, not 500."""
        alice = await self.user_with_device("alice", "ADEV")
        for sigs in (None, "x", {alice.user_id: []}):
            body = {
                alice.user_id: {"ADEV": {**alice.device_keys(), "signatures": sigs}}
            }
            resp = await self.client.post(SIGS, body, token=alice.token)
            self.assertEqual(
                (resp.code, resp.json["errcode"]), (400, "M_BAD_JSON"), sigs
            )

    async def test_auth_not_an_object(self) -> None:
        """'auth' that is not an object is 400."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.client.post(
            XSIGN, {**alice.make_cross_signing(), "auth": 5}, token=alice.token
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (400, "M_BAD_JSON"))

    async def test_overlong_ids(self) -> None:
        """Key and device ids longer than can be stored are 400; long query ids are harmless."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.client.post(
            UPLOAD,
            {"one_time_keys": {"signed_curve25519:" + "A" * 300: "k"}},
            token=alice.token,
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (400, "M_BAD_JSON"))
        resp = await self.client.post(
            "/_matrix/client/v3/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": alice.user_id},
                "password": "correct horse battery staple",
                "device_id": "D" * 300,
            },
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (400, "M_BAD_JSON"))
        resp = await self.client.post(
            QUERY, {"device_keys": {alice.user_id: ["X" * 400]}}, token=alice.token
        )
        self.assertEqual(
            (resp.code, resp.json["device_keys"]), (200, {alice.user_id: {}})
        )

    async def test_token_not_logged_on_error(self) -> None:
        """A 500 logs the URI with the query-string access token redacted."""
        alice = await self.user_with_device("alice", "ADEV")
        resource = JsonResource()

        async def boom(request: Any) -> Any:
            raise RuntimeError("boom")

        resource.add_route("GET", "", boom)
        self.host.register_resource("/boom", resource)
        with self.assertLogs("synapse_xsign_module.http.base", logging.ERROR) as logs:
            resp = await self.client.get("/boom", token=alice.token, query_token=True)
        self.assertEqual(resp.code, 500)
        self.flushLoggedErrors(RuntimeError)
        text = "\n".join(logs.output)
        self.assertIn("access_token=<redacted>", text)
        self.assertNotIn(alice.token, text)

    async def test_admin_page_overflow(self) -> None:
        """A huge 'from' is 400, not an overflow."""
        admin = await self.user_with_device("admin", "AD", admin=True)
        resp = await self.client.get(
            "/_synapse/client/xsign/admin/v1/users?from=99999999999999999999",
            token=admin.token,
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (400, "M_INVALID_PARAM"))


class JsonTextChecksTest(unittest.TestCase):
    """check_json_text skips only the checks the raw text rules out."""

    def check(self, text: str) -> None:
        check_json_text(text, json.loads(text))

    def test_escapes(self) -> None:
        for bad in ('{"a": "\\uD83D"}', '{"\\udfff": 1}', '["\\u0000"]'):
            with self.assertRaises(MatrixError, msg=bad):
                self.check(bad)
        # A surrogate pair (an emoji) and an escaped backslash are fine.
        self.check('{"a": "\\ud83d\\udd11", "b": "\\\\u0000"}')

    def test_depth(self) -> None:
        wide = json.dumps({"k": [{"a": [1]} for _ in range(200)]})
        self.check(wide)  # many brackets, shallow
        self.check("[" * 64 + "]" * 64)
        with self.assertRaises(MatrixError):
            self.check("[" * 65 + "]" * 65)

    def test_depth_at_the_limit_with_and_without_string_checks(self) -> None:
        """The level-by-level depth check (no suspect escapes) and the full walk
        draw the line at the same place, whatever the mix of containers."""

        def nested(levels: int) -> Any:
            """The root, ``levels`` wrappers, and the innermost wrapper's
            empty dict: ``levels + 2`` levels of containers."""
            value: Any = "leaf"
            for i in range(levels):
                value = [1, value] if i % 2 else {"s": "x", "n": value, "e": {}}
            return {"wide": [[] for _ in range(50)], "deep": value}

        for strings in (False, True):
            check_json_value(nested(62), strings=strings)  # 64 levels
            with self.assertRaises(MatrixError, msg=strings) as cm:
                check_json_value(nested(63), strings=strings)
            self.assertEqual(cm.exception.errcode, "M_BAD_JSON")
        check_json_value(nested(63), strings=False, depth=False)
        for scalar in ("s", 1, None):
            check_json_value(scalar, strings=False)
