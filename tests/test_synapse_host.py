"""Tests of the module as Synapse loads it, over a hand-written fake ModuleApi."""

from __future__ import annotations

from typing import Any

from signedjson.sign import sign_json

from twisted.internet import defer
from twisted.trial import unittest

from synapse_xsign_module import XSignModule
from synapse_xsign_module.hosts.synapse_internals import SynapseTooOld, as_matrix_error
from synapse_xsign_module.http.admin import ADMIN_PREFIX
from synapse_xsign_module.http.base import UnrecognizedResource, put_resource
from synapse_xsign_module.storage import migrate
from tests.fake_module_api import (
    UIA_PASSWORD,
    FakeModuleApi,
    FakeSynapseError,
    make_requester,
)
from tests.utils import (
    SERVER_NAME,
    Client,
    TestUser,
    cross_signing_key,
    make_config,
    prepare_database,
    public_key,
    remove_sqlite,
    test_db_url,
)

SIGNING_UPLOAD = "/_matrix/client/v3/keys/device_signing/upload"
UPLOAD = "/_matrix/client/v3/keys/upload"
QUERY = "/_matrix/client/v3/keys/query"

ALICE = f"@alice:{SERVER_NAME}"
BOB = f"@bob:{SERVER_NAME}"


def expected_paths() -> set[str]:
    """Every key path the module serves inside Synapse."""
    paths = set()
    for version in ("r0", "v3", "unstable"):
        for name in ("upload", "query", "claim", "signatures/upload"):
            paths.add(f"/_matrix/client/{version}/keys/{name}")
        if version != "r0":
            paths.add(f"/_matrix/client/{version}/keys/device_signing/upload")
    return paths


class SynapseHostTestCase(unittest.TestCase):
    """The module built by XSignModule on a fake ModuleApi over a clean database."""

    def setUp(self) -> None:
        self.db_url = test_db_url()
        if self.db_url.startswith("sqlite:///"):
            self.addCleanup(remove_sqlite, self.db_url[len("sqlite:///") :])
        else:
            # Migrated and emptied, as HostTestCase does.
            prepare_database(make_config(self.db_url).database).close()
        self.api = FakeModuleApi(SERVER_NAME)
        config = XSignModule.parse_config({"database": {"url": self.db_url}})
        self.module = XSignModule(config, self.api)
        self.addCleanup(self.module.service.stop)
        root = UnrecognizedResource()
        for path, resource in self.api.resources.items():
            put_resource(root, path, resource)
        self.client = Client(root)

    def user(
        self,
        user_id: str,
        device_id: str,
        token: str,
        is_guest: bool = False,
        app_service_id: str | None = None,
    ) -> TestUser:
        """A user known to the fake by ``token``."""
        self.api.add_token(
            token, make_requester(user_id, device_id, is_guest, app_service_id)
        )
        return TestUser(user_id, device_id, token)

    async def upload_cross_signing(
        self, user: TestUser, auth: dict[str, Any] | None = None
    ) -> Any:
        """Upload new cross-signing keys for ``user``."""
        body = user.make_cross_signing()
        if auth is not None:
            body["auth"] = auth
        return await self.client.post(SIGNING_UPLOAD, body, token=user.token)

    async def master_key(self, user: TestUser, user_id: str) -> str | None:
        """The public master key of ``user_id`` as /keys/query shows it."""
        resp = await self.client.post(
            QUERY, {"device_keys": {user_id: []}}, token=user.token
        )
        self.assertEqual(resp.code, 200, resp)
        master = resp.json["master_keys"].get(user_id)
        if master is None:
            return None
        ((value,),) = [list(master["keys"].values())]
        return str(value)


class RegistrationTest(SynapseHostTestCase):
    """What the module registers with Synapse."""

    def test_registers_every_key_path(self) -> None:
        """Every key path (v3, unstable, r0 except device_signing) is registered."""
        key_paths = {p for p in self.api.resources if "/keys/" in p}
        self.assertEqual(key_paths, expected_paths())
        self.assertEqual(len(key_paths), 14)
        # Beside them only the admin API, under /_synapse/client.
        self.assertEqual(set(self.api.resources) - key_paths, {ADMIN_PREFIX})
        self.assertEqual(set(self.module.paths), set(self.api.resources))

    def test_versions_share_one_resource(self) -> None:
        """The same endpoint is one resource under every version."""
        res = self.api.resources
        self.assertIs(
            res["/_matrix/client/r0/keys/upload"],
            res["/_matrix/client/v3/keys/upload"],
        )
        self.assertIsNot(
            res["/_matrix/client/v3/keys/upload"],
            res["/_matrix/client/v3/keys/query"],
        )

    def test_schema_migrated_at_startup(self) -> None:
        """Loading the module migrates the database."""
        self.assertEqual(self.module.service.schema_version, migrate.head_revision())

    def test_synapse_without_internals_refused(self) -> None:
        """A Synapse lacking an internal the module uses is refused before registering."""
        config = XSignModule.parse_config({"database": {"url": self.db_url}})
        for api, missing in (
            (FakeModuleApi(SERVER_NAME, with_auth_handler=False), "_auth_handler"),
            (FakeModuleApi(SERVER_NAME, with_device_handler=False), "_device_handler"),
        ):
            with self.assertRaises(SynapseTooOld) as cm:
                XSignModule(config, api)
            self.assertIn(missing, str(cm.exception))
            self.assertEqual(api.resources, {})


class OwnReadsTest(SynapseHostTestCase):
    """Inside Synapse every request reads on its own: one database call never
    answers several requests (Synapse's log contexts follow each request)."""

    async def test_concurrent_cross_signing_reads_are_not_shared(self) -> None:
        self.assertFalse(self.module.host.shares_reads)
        store = self.module.service.cross_signing_store
        db = self.module.service.db
        before = db.transactions
        users = ["@a:test.local", "@b:test.local", "@c:test.local"]
        got = await defer.gatherResults([store.get_state(u) for u in users])
        self.assertEqual(got, [({}, None)] * 3)
        self.assertEqual(db.transactions - before, 3)


class KeysTest(SynapseHostTestCase):
    """Key endpoints authenticated by the fake's tokens."""

    async def test_upload_and_query(self) -> None:
        """Device keys uploaded with one token are served to another user."""
        alice = self.user(ALICE, "ADEV", "tok-alice")
        bob = self.user(BOB, "BDEV", "tok-bob")
        dk = alice.device_keys()
        resp = await self.client.post(UPLOAD, {"device_keys": dk}, token=alice.token)
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json, {"one_time_key_counts": {"signed_curve25519": 0}})
        resp = await self.client.post(
            "/_matrix/client/r0/keys/query",
            {"device_keys": {ALICE: []}},
            token=bob.token,
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(
            resp.json["device_keys"][ALICE], {"ADEV": {**dk, "unsigned": {}}}
        )
        self.assertGreater(self.api.threadpool_calls, 0)
        # Synapse's device-list stream is told about the new device keys.
        self.assertIn((ALICE, ["ADEV"]), self.api._device_handler.device_updates)

    async def test_query_uses_synapse_devices(self) -> None:
        """Display names and device existence come from Synapse's device store."""
        alice = self.user(ALICE, "ADEV", "tok-alice")
        phone = self.user(ALICE, "PHONE", "tok-phone")
        for user in (alice, phone):
            resp = await self.client.post(
                UPLOAD, {"device_keys": user.device_keys()}, token=user.token
            )
            self.assertEqual(resp.code, 200, resp)
        self.api._store.devices[ALICE]["ADEV"] = "Laptop"
        query = {"device_keys": {ALICE: []}}
        resp = await self.client.post(QUERY, query, token=alice.token)
        devices = resp.json["device_keys"][ALICE]
        self.assertEqual(set(devices), {"ADEV", "PHONE"})
        self.assertEqual(devices["ADEV"]["unsigned"], {"device_display_name": "Laptop"})
        self.assertEqual(devices["PHONE"]["unsigned"], {})
        # The device is deleted in Synapse: its keys are no longer served.
        del self.api._store.devices[ALICE]["PHONE"]
        resp = await self.client.post(QUERY, query, token=alice.token)
        self.assertEqual(set(resp.json["device_keys"][ALICE]), {"ADEV"})

    async def test_master_signature_kept_when_no_device_is_served(self) -> None:
        """A query that names none of a user's devices still shows the master
        key's signature by a device that exists in Synapse."""
        alice = self.user(ALICE, "ADEV", "tok-alice")
        bob = self.user(BOB, "BDEV", "tok-bob")
        self.api._store.devices.setdefault(ALICE, {})["ADEV"] = None
        resp = await self.client.post(
            UPLOAD, {"device_keys": alice.device_keys()}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        resp = await self.upload_cross_signing(alice)
        self.assertEqual(resp.code, 200, resp)
        master = sign_json(
            cross_signing_key(ALICE, "master", alice.master), ALICE, alice.device_key
        )
        resp = await self.client.post(
            "/_matrix/client/v3/keys/signatures/upload",
            {ALICE: {public_key(alice.master): master}},
            token=alice.token,
        )
        self.assertEqual(resp.json, {"failures": {}}, resp)
        for devices in ([], ["NOSUCH"]):
            resp = await self.client.post(
                QUERY, {"device_keys": {ALICE: devices}}, token=bob.token
            )
            served = resp.json["master_keys"][ALICE]
            self.assertIn("ed25519:ADEV", served["signatures"][ALICE], devices)
        # Deleted in Synapse: its signature is no longer served.
        del self.api._store.devices[ALICE]["ADEV"]
        resp = await self.client.post(
            QUERY, {"device_keys": {ALICE: ["NOSUCH"]}}, token=bob.token
        )
        served = resp.json["master_keys"][ALICE]
        self.assertNotIn("ed25519:ADEV", served.get("signatures", {}).get(ALICE, {}))

    async def test_upload_for_other_device_refused(self) -> None:
        """The device id comes from the fake's requester, not the body."""
        alice = self.user(ALICE, "ADEV", "tok-alice")
        other = TestUser(ALICE, "OTHER", "unused")
        resp = await self.client.post(
            UPLOAD, {"device_keys": other.device_keys()}, token=alice.token
        )
        self.assertEqual(resp.code, 400, resp)

    async def test_query_token(self) -> None:
        """The token may come as ``?access_token=``."""
        alice = self.user(ALICE, "ADEV", "tok-alice")
        resp = await self.client.post(
            QUERY, {"device_keys": {ALICE: []}}, token=alice.token, query_token=True
        )
        self.assertEqual(resp.code, 200, resp)

    async def test_missing_token(self) -> None:
        """No token is 401 M_MISSING_TOKEN, from Synapse's error."""
        for path in expected_paths():
            resp = await self.client.post(path, {})
            self.assertEqual(resp.code, 401, (path, resp))
            self.assertEqual(resp.json["errcode"], "M_MISSING_TOKEN")
            self.assertEqual(resp.json["error"], "Missing access token")

    async def test_unknown_token(self) -> None:
        """A token the fake does not know is 401 M_UNKNOWN_TOKEN."""
        resp = await self.client.post(UPLOAD, {}, token="nope")
        self.assertEqual((resp.code, resp.json["errcode"]), (401, "M_UNKNOWN_TOKEN"))

    async def test_guest_cannot_upload_cross_signing_keys(self) -> None:
        """A guest gets 403 M_GUEST_ACCESS_FORBIDDEN on device_signing/upload."""
        guest = self.user(ALICE, "GDEV", "tok-guest", is_guest=True)
        resp = await self.upload_cross_signing(guest)
        self.assertEqual(resp.code, 403, resp)
        self.assertEqual(resp.json["errcode"], "M_GUEST_ACCESS_FORBIDDEN")
        self.assertEqual(self.api._auth_handler.calls, [])
        # Guests may still use the other key endpoints.
        resp = await self.client.post(
            QUERY, {"device_keys": {ALICE: []}}, token=guest.token
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["master_keys"], {})


class UIATest(SynapseHostTestCase):
    """User-interactive auth is Synapse's, through ``_auth_handler``."""

    async def test_first_upload_needs_no_uia(self) -> None:
        """The first cross-signing setup succeeds without calling Synapse's UIA."""
        alice = self.user(ALICE, "ADEV", "tok-alice")
        resp = await self.upload_cross_signing(alice)
        self.assertEqual((resp.code, resp.json), (200, {}))
        self.assertEqual(self.api._auth_handler.calls, [])
        self.assertEqual(await self.master_key(alice, ALICE), public_key(alice.master))

    async def test_replacement_is_delegated_to_synapse(self) -> None:
        """Replacing keys returns Synapse's UIA body, then succeeds with its auth."""
        alice = self.user(ALICE, "ADEV", "tok-alice")
        self.assertEqual((await self.upload_cross_signing(alice)).code, 200)
        first = public_key(alice.master)

        new = alice.make_cross_signing()
        resp = await self.client.post(SIGNING_UPLOAD, new, token=alice.token)
        self.assertEqual(resp.code, 401, resp)
        self.assertEqual(
            resp.json,
            {
                "flows": [{"stages": ["m.login.password"]}],
                "params": {},
                "session": "session1",
            },
        )
        self.assertEqual(await self.master_key(alice, ALICE), first)
        (call,) = self.api._auth_handler.calls
        self.assertIs(call.can_skip_ui_auth, False)
        self.assertIs(call.requester, self.api.tokens["tok-alice"])
        self.assertIsInstance(call.description, str)
        self.assertTrue(call.description)

        auth = {"type": "m.login.password", "session": "session1"}
        resp = await self.client.post(
            SIGNING_UPLOAD,
            {**new, "auth": {**auth, "password": "wrong"}},
            token=alice.token,
        )
        self.assertEqual(resp.code, 401, resp)
        self.assertEqual(resp.json["session"], "session2")
        self.assertEqual(await self.master_key(alice, ALICE), first)

        resp = await self.client.post(
            SIGNING_UPLOAD,
            {**new, "auth": {**auth, "password": UIA_PASSWORD}},
            token=alice.token,
        )
        self.assertEqual((resp.code, resp.json), (200, {}), resp)
        self.assertEqual(await self.master_key(alice, ALICE), public_key(alice.master))
        self.assertNotEqual(public_key(alice.master), first)
        self.assertEqual(
            [c.passed for c in self.api._auth_handler.calls], [False, False, True]
        )

    async def test_session_bound_to_its_body_and_used_once(self) -> None:
        """Synapse's session authorises the body that started it, once."""
        alice = self.user(ALICE, "ADEV", "tok-alice")
        self.assertEqual((await self.upload_cross_signing(alice)).code, 200)
        new = alice.make_cross_signing()
        resp = await self.client.post(SIGNING_UPLOAD, new, token=alice.token)
        session = resp.json["session"]
        auth = {
            "type": "m.login.password",
            "session": session,
            "password": UIA_PASSWORD,
        }
        # Another body with the same session: refused, Synapse not even asked.
        other = alice.make_cross_signing()
        resp = await self.client.post(
            SIGNING_UPLOAD, {**other, "auth": auth}, token=alice.token
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"))
        resp = await self.client.post(
            SIGNING_UPLOAD, {**new, "auth": auth}, token=alice.token
        )
        self.assertEqual((resp.code, resp.json), (200, {}), resp)
        # Used up: a third identity cannot ride on it (Synapse would still say yes).
        third = alice.make_cross_signing()
        resp = await self.client.post(
            SIGNING_UPLOAD, {**third, "auth": auth}, token=alice.token
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"))
        (new_pub,) = new["master_key"]["keys"].values()
        self.assertEqual(await self.master_key(alice, ALICE), new_pub)

    async def test_identical_reupload_needs_no_uia(self) -> None:
        """Uploading the current keys again is 200 without UIA."""
        alice = self.user(ALICE, "ADEV", "tok-alice")
        body = alice.make_cross_signing()
        resp = await self.client.post(SIGNING_UPLOAD, body, token=alice.token)
        self.assertEqual(resp.code, 200, resp)
        resp = await self.client.post(SIGNING_UPLOAD, body, token=alice.token)
        self.assertEqual((resp.code, resp.json), (200, {}), resp)
        self.assertEqual(self.api._auth_handler.calls, [])

    async def test_appservice_replaces_without_uia(self) -> None:
        """An application service requester replaces keys without UIA."""
        alice = self.user(ALICE, "ADEV", "tok-as", app_service_id="bridge")
        self.assertEqual((await self.upload_cross_signing(alice)).code, 200)
        resp = await self.upload_cross_signing(alice)
        self.assertEqual((resp.code, resp.json), (200, {}), resp)
        self.assertEqual(self.api._auth_handler.calls, [])
        self.assertEqual(await self.master_key(alice, ALICE), public_key(alice.master))

    async def test_synapse_uia_error_is_passed_on(self) -> None:
        """A SynapseError raised by Synapse's UIA becomes the same Matrix error."""
        alice = self.user(ALICE, "ADEV", "tok-alice")
        self.assertEqual((await self.upload_cross_signing(alice)).code, 200)
        first = public_key(alice.master)
        self.api._auth_handler.fail_with = FakeSynapseError(
            403, "Invalid auth", "M_FORBIDDEN"
        )
        resp = await self.upload_cross_signing(alice, {"password": UIA_PASSWORD})
        self.assertEqual(resp.code, 403, resp)
        self.assertEqual(resp.json, {"errcode": "M_FORBIDDEN", "error": "Invalid auth"})
        self.assertEqual(await self.master_key(alice, ALICE), first)

    async def test_unexpected_uia_failure_is_500(self) -> None:
        """Any other exception from Synapse's UIA is a bare 500, and nothing is stored."""
        alice = self.user(ALICE, "ADEV", "tok-alice")
        self.assertEqual((await self.upload_cross_signing(alice)).code, 200)
        first = public_key(alice.master)
        self.api._auth_handler.fail_with = RuntimeError("internal detail")
        resp = await self.upload_cross_signing(alice, {"password": UIA_PASSWORD})
        self.assertEqual(resp.code, 500, resp)
        self.assertNotIn(b"internal detail", resp.raw)
        self.assertEqual(await self.master_key(alice, ALICE), first)


class SynapseErrorConversionTest(unittest.TestCase):
    """Synapse's errors keep the fields clients act on."""

    def test_soft_logout_and_retry_after_survive(self) -> None:
        """Extra fields of Synapse's error_dict (soft_logout, retry_after_ms) are kept."""

        class FakeSynapseError(Exception):
            code = 401
            errcode = "M_UNKNOWN_TOKEN"
            msg = "Token expired"

            def error_dict(self, config: Any) -> dict[str, Any]:
                return {"errcode": self.errcode, "error": self.msg, "soft_logout": True}

        converted = as_matrix_error(FakeSynapseError())
        assert converted is not None
        self.assertEqual(
            converted.to_dict(),
            {
                "errcode": "M_UNKNOWN_TOKEN",
                "error": "Token expired",
                "soft_logout": True,
            },
        )
