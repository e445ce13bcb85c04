"""Tests of the embedded host's own endpoints and its register-user command."""

from __future__ import annotations

import gc
import io
import os
import shutil
import sys
import tempfile
from typing import Any

from twisted.trial import unittest

from synapse_xsign_module.hosts.embedded import cli
from tests.utils import (
    PASSWORD,
    SERVER_NAME,
    HostTestCase,
    TestUser,
    public_key,
    restore_root_logging,
)

LOGIN = "/_matrix/client/v3/login"
WHOAMI = "/_matrix/client/v3/account/whoami"
LOGOUT = "/_matrix/client/v3/logout"
UPLOAD = "/_matrix/client/v3/keys/upload"
QUERY = "/_matrix/client/v3/keys/query"


def password_body(identifier: Any = None, **extra: Any) -> dict[str, Any]:
    """An m.login.password body."""
    body: dict[str, Any] = {"type": "m.login.password", "password": PASSWORD}
    if identifier is not None:
        body["identifier"] = identifier
    body.update(extra)
    return body


class LoginTest(HostTestCase):
    """POST and GET /login."""

    async def assert_login_ok(self, body: dict[str, Any], user_id: str) -> str:
        """The login succeeds for ``user_id``; returns the token."""
        resp = await self.client.post(LOGIN, body)
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["user_id"], user_id)
        self.assertEqual(resp.json["home_server"], SERVER_NAME)
        token = resp.json["access_token"]
        whoami = await self.client.get(WHOAMI, token=token)
        self.assertEqual(whoami.json["user_id"], user_id)
        self.assertEqual(whoami.json["device_id"], resp.json["device_id"])
        return str(token)

    async def test_login_identifier_full_user_id(self) -> None:
        """m.id.user with a full user id logs in."""
        alice = await self.make_user("alice")
        await self.assert_login_ok(
            password_body({"type": "m.id.user", "user": alice}), alice
        )

    async def test_login_identifier_localpart(self) -> None:
        """m.id.user with a bare localpart logs in as the local user."""
        alice = await self.make_user("alice")
        await self.assert_login_ok(
            password_body({"type": "m.id.user", "user": "alice"}), alice
        )

    async def test_login_legacy_user_field(self) -> None:
        """The legacy flat ``user`` field (localpart or full id) logs in."""
        alice = await self.make_user("alice")
        await self.assert_login_ok(password_body(user="alice"), alice)
        await self.assert_login_ok(password_body(user=alice), alice)

    async def test_login_r0(self) -> None:
        """The r0 login path works as well."""
        alice = await self.make_user("alice")
        resp = await self.client.post(
            "/_matrix/client/r0/login", password_body(user="alice")
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["user_id"], alice)

    async def test_wrong_password(self) -> None:
        """A wrong password is 403 M_FORBIDDEN and issues no token."""
        alice = await self.make_user("alice")
        body = password_body({"type": "m.id.user", "user": alice})
        body["password"] = "wrong"
        resp = await self.client.post(LOGIN, body)
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"))
        self.assertNotIn("access_token", resp.json)
        self.assertEqual(await self.host.accounts.device_ids(alice), set())

    async def test_unknown_user(self) -> None:
        """An unknown user is 403 M_FORBIDDEN with the same message as a bad password."""
        await self.make_user("alice")
        resp = await self.client.post(LOGIN, password_body(user="nobody"))
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"))
        bad = password_body(user="alice")
        bad["password"] = "wrong"
        resp2 = await self.client.post(LOGIN, bad)
        self.assertEqual(resp.json["error"], resp2.json["error"])

    async def test_user_on_other_server(self) -> None:
        """A user id of another server cannot log in."""
        await self.make_user("alice")
        resp = await self.client.post(LOGIN, password_body(user="@alice:elsewhere"))
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"))

    async def test_malformed_login_bodies(self) -> None:
        """Unsupported types and malformed fields are 400 errors."""
        await self.make_user("alice")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"type": "m.login.token", "token": "x"}, "M_UNKNOWN"),
            ({"user": "alice", "password": PASSWORD}, "M_UNKNOWN"),
            (
                password_body({"type": "m.id.thirdparty", "medium": "email"}),
                "M_BAD_JSON",
            ),
            (password_body("alice"), "M_BAD_JSON"),
            ({"type": "m.login.password", "user": "alice"}, "M_BAD_JSON"),
            (
                {"type": "m.login.password", "user": "alice", "password": 1},
                "M_BAD_JSON",
            ),
            (password_body(user="alice", device_id=""), "M_BAD_JSON"),
            (password_body(user="alice", device_id=5), "M_BAD_JSON"),
            (
                password_body(user="alice", initial_device_display_name=["x"]),
                "M_BAD_JSON",
            ),
        ]
        for body, errcode in cases:
            resp = await self.client.post(LOGIN, body)
            self.assertEqual((resp.code, resp.json["errcode"]), (400, errcode), body)

    async def test_login_flows(self) -> None:
        """GET /login lists the password flow."""
        resp = await self.client.get(LOGIN)
        self.assertEqual(resp.code, 200)
        self.assertEqual(resp.json, {"flows": [{"type": "m.login.password"}]})

    async def test_generated_device_ids(self) -> None:
        """Without device_id each login gets a new ten-letter device."""
        alice = await self.make_user("alice")
        _, dev1 = await self.login(alice)
        _, dev2 = await self.login(alice)
        self.assertNotEqual(dev1, dev2)
        for dev in (dev1, dev2):
            self.assertRegex(dev, r"^[A-Z]{10}$")
        self.assertEqual(await self.host.accounts.device_ids(alice), {dev1, dev2})

    async def test_requested_device_id_and_relogin(self) -> None:
        """A requested device id is used; logging in to it again revokes the old token."""
        alice = await self.make_user("alice")
        old, dev = await self.login(alice, "MYDEVICE")
        self.assertEqual(dev, "MYDEVICE")
        other, _ = await self.login(alice, "OTHERDEV")
        new, dev2 = await self.login(alice, "MYDEVICE")
        self.assertEqual(dev2, "MYDEVICE")
        self.assertNotEqual(old, new)
        resp = await self.client.get(WHOAMI, token=old)
        self.assertEqual((resp.code, resp.json["errcode"]), (401, "M_UNKNOWN_TOKEN"))
        resp = await self.client.get(WHOAMI, token=new)
        self.assertEqual(resp.json["device_id"], "MYDEVICE")
        resp = await self.client.get(WHOAMI, token=other)
        self.assertEqual(resp.json["device_id"], "OTHERDEV")
        self.assertEqual(
            await self.host.accounts.device_ids(alice), {"MYDEVICE", "OTHERDEV"}
        )

    async def test_relogin_keeps_device_keys(self) -> None:
        """Logging in again to a device keeps the keys it uploaded."""
        alice = await self.user_with_device("alice", "ADEV")
        dk = alice.device_keys()
        resp = await self.client.post(UPLOAD, {"device_keys": dk}, token=alice.token)
        self.assertEqual(resp.code, 200, resp)
        token, _ = await self.login(alice.user_id, "ADEV")
        resp = await self.client.post(
            QUERY, {"device_keys": {alice.user_id: []}}, token=token
        )
        self.assertIn("ADEV", resp.json["device_keys"][alice.user_id])

    async def test_display_name_in_query(self) -> None:
        """initial_device_display_name appears as unsigned.device_display_name."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.client.post(
            LOGIN,
            password_body(
                user="alice", device_id="PHONE", initial_device_display_name="My phone"
            ),
        )
        self.assertEqual(resp.code, 200, resp)
        phone_token = resp.json["access_token"]
        phone = TestUser(alice.user_id, "PHONE", phone_token)
        for user in (alice, phone):
            resp = await self.client.post(
                UPLOAD, {"device_keys": user.device_keys()}, token=user.token
            )
            self.assertEqual(resp.code, 200, resp)
        resp = await self.client.post(
            QUERY, {"device_keys": {alice.user_id: []}}, token=alice.token
        )
        devices = resp.json["device_keys"][alice.user_id]
        self.assertEqual(
            devices["PHONE"]["unsigned"], {"device_display_name": "My phone"}
        )
        self.assertEqual(devices["ADEV"]["unsigned"], {})

    async def test_device_id_equal_to_cross_signing_key_refused(self) -> None:
        """A device id equal to one of the user's cross-signing keys is refused."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.client.post(
            "/_matrix/client/v3/keys/device_signing/upload",
            alice.make_cross_signing(),
            token=alice.token,
        )
        self.assertEqual(resp.code, 200, resp)
        resp = await self.client.post(
            LOGIN, password_body(user="alice", device_id=public_key(alice.master))
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"))


class SessionTest(HostTestCase):
    """whoami, logout, versions and health."""

    async def test_whoami(self) -> None:
        """whoami names the user and device of the token."""
        alice = await self.user_with_device("alice", "ADEV")
        for version in ("r0", "v3"):
            resp = await self.client.get(
                f"/_matrix/client/{version}/account/whoami", token=alice.token
            )
            self.assertEqual(resp.code, 200, resp)
            self.assertEqual(
                resp.json,
                {"user_id": alice.user_id, "device_id": "ADEV", "is_guest": False},
            )

    async def test_logout_deletes_device_keys(self) -> None:
        """Logout revokes the token and the device's keys vanish from /keys/query."""
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        resp = await self.client.post(
            UPLOAD,
            {
                "device_keys": alice.device_keys(),
                "one_time_keys": {"curve25519:AAAA": "a" * 43},
            },
            token=alice.token,
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["one_time_key_counts"]["curve25519"], 1)
        query: dict[str, Any] = {"device_keys": {alice.user_id: []}}
        resp = await self.client.post(QUERY, query, token=bob.token)
        self.assertEqual(list(resp.json["device_keys"][alice.user_id]), ["ADEV"])

        resp = await self.client.post(LOGOUT, {}, token=alice.token)
        self.assertEqual((resp.code, resp.json), (200, {}))
        self.assertIn(alice.user_id, self.host.changed_users)
        resp = await self.client.post(QUERY, query, token=bob.token)
        self.assertEqual(resp.json["device_keys"], {alice.user_id: {}})
        resp = await self.client.post(
            "/_matrix/client/v3/keys/claim",
            {"one_time_keys": {alice.user_id: {"ADEV": "curve25519"}}},
            token=bob.token,
        )
        self.assertEqual(resp.json["one_time_keys"], {})
        self.assertEqual(await self.host.accounts.device_ids(alice.user_id), set())
        resp = await self.client.get(WHOAMI, token=alice.token)
        self.assertEqual(resp.code, 401)

    async def test_logout_keeps_other_devices(self) -> None:
        """Logging out of one device leaves the user's other devices and keys."""
        alice = await self.user_with_device("alice", "ADEV")
        token2, _ = await self.login(alice.user_id, "BDEV")
        second = TestUser(alice.user_id, "BDEV", token2)
        for user in (alice, second):
            resp = await self.client.post(
                UPLOAD, {"device_keys": user.device_keys()}, token=user.token
            )
            self.assertEqual(resp.code, 200, resp)
        await self.client.post(LOGOUT, {}, token=alice.token)
        resp = await self.client.post(
            QUERY, {"device_keys": {alice.user_id: []}}, token=token2
        )
        self.assertEqual(list(resp.json["device_keys"][alice.user_id]), ["BDEV"])

    async def test_logout_needs_token(self) -> None:
        """Logout without a token is 401 M_MISSING_TOKEN."""
        resp = await self.client.post(LOGOUT, {})
        self.assertEqual((resp.code, resp.json["errcode"]), (401, "M_MISSING_TOKEN"))

    async def test_versions(self) -> None:
        """GET /_matrix/client/versions lists the spec versions, no auth needed."""
        resp = await self.client.get("/_matrix/client/versions")
        self.assertEqual(resp.code, 200)
        self.assertIn("v1.1", resp.json["versions"])
        self.assertIn("r0.6.1", resp.json["versions"])
        self.assertEqual(resp.json["unstable_features"], {})

    async def test_health(self) -> None:
        """GET /health is a plain-text 200 OK."""
        resp = await self.client.get("/health")
        self.assertEqual(resp.code, 200)
        self.assertEqual(resp.raw, b"OK")
        self.assertEqual(resp.header("Content-Type"), "text/plain")


class DeactivationTest(HostTestCase):
    """Deactivated accounts."""

    async def test_deactivated_user(self) -> None:
        """A deactivated user cannot log in and its tokens stop working."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.client.post(
            UPLOAD, {"device_keys": alice.device_keys()}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        bob = await self.user_with_device("bob", "BDEV")
        await self.host.accounts.upsert_user(
            alice.user_id, self.service.clock.time_msec(), deactivated=True
        )
        resp = await self.client.get(WHOAMI, token=alice.token)
        self.assertEqual((resp.code, resp.json["errcode"]), (401, "M_UNKNOWN_TOKEN"))
        resp = await self.client.post(LOGIN, password_body(user="alice"))
        self.assertEqual(resp.code, 403, resp)
        self.assertEqual(resp.json["errcode"], "M_USER_DEACTIVATED")
        resp = await self.client.post(
            QUERY, {"device_keys": {alice.user_id: []}}, token=bob.token
        )
        self.assertEqual(resp.json["device_keys"], {alice.user_id: {}})
        self.assertFalse(await self.host.is_admin(alice.user_id))

    async def test_deactivated_wrong_password_is_plain_forbidden(self) -> None:
        """A wrong password on a deactivated account does not reveal the deactivation."""
        alice = await self.make_user("alice")
        await self.host.accounts.upsert_user(
            alice, self.service.clock.time_msec(), deactivated=True
        )
        body = password_body(user="alice")
        body["password"] = "wrong"
        resp = await self.client.post(LOGIN, body)
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"))


class RegisterUserCommandTest(HostTestCase):
    """``synapse-xsign register-user`` against the host's database."""

    def setUp(self) -> None:
        super().setUp()
        restore_root_logging(self)
        tmp = tempfile.mkdtemp(prefix="xsign-reg-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.config_path = os.path.join(tmp, "config.yaml")
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(
                f"database:\n  url: {self.db_url}\n"
                f"embedded:\n  server_name: {SERVER_NAME}\n"
            )

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        """Run the CLI with the host's config; returns (status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(["--config", self.config_path, *argv])
        return code, out.getvalue(), err.getvalue()

    async def test_register_user_then_login(self) -> None:
        """A user made by register-user (admin) can log in over HTTP."""
        code, out, _ = self.run_cli(
            "register-user", "bob", "--password", "pw", "--admin"
        )
        self.assertEqual(code, 0)
        self.assertIn(f"created @bob:{SERVER_NAME} (admin)", out)
        resp = await self.client.post(
            LOGIN, {"type": "m.login.password", "user": "bob", "password": "pw"}
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["user_id"], f"@bob:{SERVER_NAME}")
        self.assertTrue(await self.host.is_admin(f"@bob:{SERVER_NAME}"))

    async def test_register_user_updates(self) -> None:
        """Running it again updates the password and, with --no-admin, the flag."""
        self.assertEqual(
            self.run_cli("register-user", "bob", "--password", "pw", "--admin")[0], 0
        )
        code, out, _ = self.run_cli(
            "register-user", f"@bob:{SERVER_NAME}", "--password", "pw2", "--no-admin"
        )
        self.assertEqual(code, 0)
        self.assertIn(f"updated @bob:{SERVER_NAME}", out)
        self.assertFalse(await self.host.is_admin(f"@bob:{SERVER_NAME}"))
        resp = await self.client.post(
            LOGIN, {"type": "m.login.password", "user": "bob", "password": "pw"}
        )
        self.assertEqual(resp.code, 403)
        resp = await self.client.post(
            LOGIN, {"type": "m.login.password", "user": "bob", "password": "pw2"}
        )
        self.assertEqual(resp.code, 200, resp)

    def test_register_user_refuses_other_server(self) -> None:
        """A user id on another server is refused with status 2."""
        code, _, err = self.run_cli(
            "register-user", "@bob:elsewhere", "--password", "pw"
        )
        self.assertEqual(code, 2)
        self.assertIn("not a user id on", err)

    def test_register_user_refuses_empty_password(self) -> None:
        """An empty password is refused with status 2."""
        code, _, err = self.run_cli("register-user", "bob", "--password", "")
        self.assertEqual(code, 2)
        self.assertIn("password", err)


class TuneGcTest(unittest.TestCase):
    """``run`` sets the collector's thresholds and freezes what startup made."""

    def setUp(self) -> None:
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)

    def test_thresholds_set_and_startup_frozen(self) -> None:
        gc.unfreeze()
        cli.tune_gc((12345, 11, 13))
        self.assertEqual(gc.get_threshold(), (12345, 11, 13))
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_none_keeps_pythons(self) -> None:
        gc.set_threshold(700, 10, 10)
        cli.tune_gc(None)
        self.assertEqual(gc.get_threshold(), (700, 10, 10))
