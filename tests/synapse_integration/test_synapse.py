"""The module inside a real Synapse, driven over real HTTP.

Runs under ``tox -e synapse`` (which installs matrix-synapse and sets
``XSIGN_RUN_SYNAPSE=1``); elsewhere it is skipped. Logins, tokens and admin
status come from Synapse alone; the key endpoints are reached through a routing
front that sends the key paths to a listener without ``client``.
"""

from __future__ import annotations

import atexit
import os
import secrets
import time
from typing import Any, ClassVar

from signedjson.sign import sign_json

from twisted.trial import unittest

from tests.interop import test_rust_sdk
from tests.synapse_integration.harness import (
    SERVER_NAME,
    SynapseServer,
    call,
    user_path,
)
from tests.utils import POSTGRES_ENV, TestUser, public_key

RUN_ENV = "XSIGN_RUN_SYNAPSE"
SKIP = None if os.environ.get(RUN_ENV) else f"runs under 'tox -e synapse' ({RUN_ENV}=1)"
PASSWORD = "synapse password"
ADMIN = "/_synapse/client/xsign/admin/v1"


class SynapseTestBase(unittest.TestCase):
    """One Synapse (with the module) per test class."""

    if SKIP:
        skip = SKIP

    module_db_url: ClassVar[str | None] = None
    _server: ClassVar[SynapseServer | None] = None
    _startup_error: ClassVar[str | None] = None

    def setUp(self) -> None:
        """Start this class's Synapse on first use (trial has no setUpClass).

        It is stopped when the test process exits, pass or fail.
        """
        cls = type(self)
        if (
            cls.__dict__.get("_server") is None
            and cls.__dict__.get("_startup_error") is None
        ):
            server = SynapseServer(module_db_url=cls.module_db_url)
            atexit.register(server.cleanup)
            try:
                server.start()
            except RuntimeError as e:
                cls._startup_error = str(e)
            else:
                cls._server = server
        if cls.__dict__.get("_startup_error") is not None:
            self.fail(f"Synapse did not start: {cls._startup_error}")
        server = cls.__dict__["_server"]
        assert server is not None
        self.server = server

    def new_user(self, prefix: str, admin: bool = False) -> TestUser:
        """A Synapse account logged in on one device."""
        localpart = f"{prefix}{secrets.token_hex(4)}"
        user_id = self.server.register(localpart, PASSWORD, admin=admin)
        token, device = self.server.login(localpart, PASSWORD)
        return TestUser(user_id, device, token)

    def post(self, path: str, body: Any, user: TestUser) -> Any:
        """POST through the routing front."""
        return call("POST", self.server.front_url + path, body, user.token)

    def keys_ready(self, user: TestUser) -> dict[str, Any]:
        """Upload device keys and bootstrap cross-signing; returns the body."""
        resp = self.post(
            "/_matrix/client/v3/keys/upload", {"device_keys": user.device_keys()}, user
        )
        self.assertEqual(resp.code, 200, resp)
        body = user.make_cross_signing()
        resp = self.post("/_matrix/client/v3/keys/device_signing/upload", body, user)
        self.assertEqual((resp.code, resp.json), (200, {}))
        return body

    def query(self, user: TestUser, *targets: str) -> dict[str, Any]:
        """keys/query through the front."""
        resp = self.post(
            "/_matrix/client/v3/keys/query",
            {"device_keys": {t: [] for t in targets}},
            user,
        )
        self.assertEqual(resp.code, 200, resp)
        result: dict[str, Any] = resp.json
        return result


class KeysInSynapseMixin:
    """The key endpoints served by the module inside Synapse."""

    def test_module_answers_key_paths(self: Any) -> None:
        """Keys uploaded through the front are served by the module, not Synapse."""
        alice = self.new_user("alice")
        body = self.keys_ready(alice)
        result = self.query(alice, alice.user_id)
        self.assertEqual(result["master_keys"][alice.user_id], body["master_key"])
        device = result["device_keys"][alice.user_id][alice.device_id]
        self.assertEqual(
            {k: v for k, v in device.items() if k != "unsigned"}, alice.device_keys()
        )
        # Synapse's own client listener knows nothing of these keys.
        direct = call(
            "POST",
            self.server.client_url + "/_matrix/client/v3/keys/query",
            {"device_keys": {alice.user_id: []}},
            alice.token,
        )
        self.assertNotIn(alice.user_id, direct.json.get("master_keys", {}))

    def test_replacement_uses_synapse_uia(self: Any) -> None:
        """Replacing keys asks for Synapse's UIA and completes with the Synapse password."""
        alice = self.new_user("alice")
        self.keys_ready(alice)
        new = alice.make_cross_signing()
        first = self.post("/_matrix/client/v3/keys/device_signing/upload", new, alice)
        self.assertEqual(first.code, 401, first)
        self.assertIn({"stages": ["m.login.password"]}, first.json["flows"])
        wrong = self.post(
            "/_matrix/client/v3/keys/device_signing/upload",
            {
                **new,
                "auth": {
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": alice.user_id},
                    "password": "wrong",
                    "session": first.json["session"],
                },
            },
            alice,
        )
        self.assertEqual((wrong.code, wrong.json.get("errcode")), (401, "M_FORBIDDEN"))
        done = self.post(
            "/_matrix/client/v3/keys/device_signing/upload",
            {
                **new,
                "auth": {
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": alice.user_id},
                    "password": PASSWORD,
                    "session": first.json["session"],
                },
            },
            alice,
        )
        self.assertEqual((done.code, done.json), (200, {}))
        self.assertEqual(
            self.query(alice, alice.user_id)["master_keys"][alice.user_id],
            new["master_key"],
        )

    def test_signatures_and_visibility(self: Any) -> None:
        """SSK and USK signatures are stored and shown under the visibility rules."""
        alice = self.new_user("alice")
        bob = self.new_user("bob")
        carol = self.new_user("carol")
        self.keys_ready(alice)
        bob_body = self.keys_ready(bob)
        self.keys_ready(carol)
        signed_device = sign_json(
            alice.device_keys(), alice.user_id, alice.self_signing
        )
        signed_bob = sign_json(
            dict(bob_body["master_key"]), alice.user_id, alice.user_signing
        )
        resp = self.post(
            "/_matrix/client/v3/keys/signatures/upload",
            {
                alice.user_id: {alice.device_id: signed_device},
                bob.user_id: {public_key(bob.master): signed_bob},
            },
            alice,
        )
        self.assertEqual((resp.code, resp.json), (200, {"failures": {}}))
        ssk_id = f"ed25519:{public_key(alice.self_signing)}"
        usk_id = f"ed25519:{public_key(alice.user_signing)}"
        for viewer in (alice, bob, carol):
            result = self.query(viewer, alice.user_id, bob.user_id)
            device = result["device_keys"][alice.user_id][alice.device_id]
            self.assertIn(ssk_id, device["signatures"][alice.user_id])
            bob_master = result["master_keys"][bob.user_id]
            seen = usk_id in bob_master.get("signatures", {}).get(alice.user_id, {})
            self.assertEqual(seen, viewer is alice, viewer.user_id)
            self.assertEqual(
                list(result["user_signing_keys"]),
                [viewer.user_id] if viewer in (alice, bob) else [],
            )

    def test_sync_device_lists(self: Any) -> None:
        """Key changes reach Synapse's /sync device_lists.changed for room members."""
        alice = self.new_user("alice")
        bob = self.new_user("bob")
        room = call(
            "POST",
            self.server.front_url + "/_matrix/client/v3/createRoom",
            {"preset": "public_chat"},
            alice.token,
        )
        self.assertEqual(room.code, 200, room)
        joined = call(
            "POST",
            self.server.front_url + f"/_matrix/client/v3/join/{room.json['room_id']}",
            {},
            bob.token,
        )
        self.assertEqual(joined.code, 200, joined)

        def sync(user: TestUser, since: str | None) -> dict[str, Any]:
            url = self.server.front_url + "/_matrix/client/v3/sync?timeout=0"
            if since:
                url += f"&since={since}"
            resp = call("GET", url, token=user.token)
            self.assertEqual(resp.code, 200, resp)
            result: dict[str, Any] = resp.json
            return result

        def changed_eventually(user: TestUser, since: str, target: str) -> bool:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                result = sync(user, since)
                if target in result.get("device_lists", {}).get("changed", []):
                    return True
                time.sleep(0.3)
            return False

        since_bob = sync(bob, None)["next_batch"]
        self.keys_ready(alice)
        self.assertTrue(changed_eventually(bob, since_bob, alice.user_id))

        # Alice signs Bob with her USK: Alice (and only Alice) hears of Bob.
        bob_body = self.keys_ready(bob)
        since_alice = sync(alice, None)["next_batch"]
        signed = sign_json(
            dict(bob_body["master_key"]), alice.user_id, alice.user_signing
        )
        resp = self.post(
            "/_matrix/client/v3/keys/signatures/upload",
            {bob.user_id: {public_key(bob.master): signed}},
            alice,
        )
        self.assertEqual(resp.json, {"failures": {}})
        self.assertTrue(changed_eventually(alice, since_alice, bob.user_id))

    def test_admin_api(self: Any) -> None:
        """The admin API answers Synapse admins on the client listener; 403 otherwise."""
        admin = self.new_user("admin", admin=True)
        alice = self.new_user("alice")
        self.keys_ready(alice)
        for base in (self.server.client_url, self.server.front_url):
            resp = call("GET", f"{base}{ADMIN}/stats", token=admin.token)
            self.assertEqual(resp.code, 200, resp)
            self.assertIs(resp.json["key_paths_shadowed"], False)
            self.assertGreaterEqual(resp.json["users_with_cross_signing"], 1)
        resp = call("GET", f"{self.server.client_url}{ADMIN}/stats", token=alice.token)
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"))
        resp = call(
            "GET",
            f"{self.server.client_url}{ADMIN}/users/{user_path(alice.user_id)}/keys",
            token=admin.token,
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(
            resp.json["cross_signing"]["master"]["public_key"], public_key(alice.master)
        )
        resp = call(
            "POST",
            f"{self.server.client_url}{ADMIN}/users/{user_path(alice.user_id)}/_allow_cross_signing_replacement_without_uia",
            {},
            admin.token,
        )
        self.assertEqual(resp.code, 200, resp)
        replaced = self.post(
            "/_matrix/client/v3/keys/device_signing/upload",
            alice.make_cross_signing(),
            alice,
        )
        self.assertEqual((replaced.code, replaced.json), (200, {}))
        resp = call(
            "GET",
            f"{self.server.client_url}{ADMIN}/users/{user_path('@ghost:synapse.test')}/keys",
            token=admin.token,
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (404, "M_NOT_FOUND"))

    def test_logged_out_device_not_served(self: Any) -> None:
        """A device deleted in Synapse (logout) is no longer served by the module."""
        alice = self.new_user("alice")
        self.keys_ready(alice)
        resp = call(
            "POST", self.server.front_url + "/_matrix/client/v3/logout", {}, alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        bob = self.new_user("bob")
        result = self.query(bob, alice.user_id)
        self.assertEqual(result["device_keys"][alice.user_id], {})


class SynapseSQLiteTest(KeysInSynapseMixin, SynapseTestBase):
    """The module's own database on SQLite."""


class SynapsePostgresTest(KeysInSynapseMixin, SynapseTestBase):
    """The module's own database on the CI PostgreSQL."""

    module_db_url = os.environ.get(POSTGRES_ENV) or None
    if not SKIP and not module_db_url:
        skip = f"{POSTGRES_ENV} is not set"


class ShadowedListenerTest(unittest.TestCase):
    """Without a listener free of 'client', the module warns at startup."""

    if SKIP:
        skip = SKIP

    def test_warning_logged(self) -> None:
        """The warning names the fix, and stats reports the shadowing."""
        server = SynapseServer(module_listener=False)
        try:
            server.start()
            log = server.log()
            self.assertIn("key endpoints are never reached", log)
            self.assertIn("resources: []", log)
            localpart = f"admin{secrets.token_hex(4)}"
            server.register(localpart, PASSWORD, admin=True)
            token, _ = server.login(localpart, PASSWORD, base=server.client_url)
            resp = call("GET", f"{server.client_url}{ADMIN}/stats", token=token)
            self.assertEqual(resp.code, 200, resp)
            self.assertIs(resp.json["key_paths_shadowed"], True)
        finally:
            server.cleanup()


class RustSdkThroughSynapseTest(test_rust_sdk.RustSdkInteropTest):
    """matrix-rust-sdk reaches full trust through Synapse and the routing front."""

    if SKIP:
        skip = SKIP
    server_name = SERVER_NAME

    @classmethod
    def scenario(cls) -> dict[str, Any]:
        """Run interop.mjs against Synapse users, through the front."""
        server = SynapseServer()
        try:
            server.start()
            passwords = {
                u: f"synapse interop password of {u}" for u in ("alice", "bob", "carol")
            }
            for user, password in passwords.items():
                server.register(user, password)
            return test_rust_sdk.run_script(
                server.front_url, passwords, server.log_path
            )
        finally:
            server.cleanup()
