"""The operators' admin API under /_synapse/client/xsign/admin/v1."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from signedjson.sign import sign_json

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from synapse_xsign_module.storage.util import lock_users
from tests.test_cross_signing import CrossSigningTestBase
from tests.utils import (
    TestUser,
    hold_in_other_transaction,
    public_key,
    result_once_released,
)

ADMIN = "/_synapse/client/xsign/admin/v1"
KEYS_UPLOAD = "/_matrix/client/v3/keys/upload"
SIG_UPLOAD = "/_matrix/client/v3/keys/signatures/upload"


def u(user_id: str) -> str:
    """A user id as a path segment."""
    return quote(user_id, safe="")


class AdminTestBase(CrossSigningTestBase):
    """An admin and helpers."""

    async def setUp(self) -> None:  # type: ignore[override]
        super().setUp()
        self.admin = await self.user_with_device("admin", admin=True)

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> Any:
        """Call the admin API as the admin (or with ``token``)."""
        return await self.client.request(
            method,
            ADMIN + path,
            body=body,
            token=token if token is not None else self.admin.token,
        )

    async def ready_user(self, name: str) -> TestUser:
        """A user with device keys, one-time keys and a cross-signing identity."""
        user = await self.user_with_device(name, f"{name.upper()}DEV")
        resp = await self.client.post(
            KEYS_UPLOAD,
            {
                "device_keys": user.device_keys(),
                "one_time_keys": {
                    "signed_curve25519:A": {"key": "a"},
                    "signed_curve25519:B": {"key": "b"},
                },
                "fallback_keys": {
                    "signed_curve25519:F": {"key": "f", "fallback": True}
                },
            },
            token=user.token,
        )
        self.assertEqual(resp.code, 200, resp)
        await self.bootstrap(user)
        signed = sign_json(user.device_keys(), user.user_id, user.self_signing)
        resp = await self.client.post(
            SIG_UPLOAD, {user.user_id: {user.device_id: signed}}, token=user.token
        )
        self.assertEqual(resp.json, {"failures": {}})
        return user


class GateTest(AdminTestBase):
    """Every endpoint checks for a server admin on every request."""

    ENDPOINTS = [
        ("GET", "/users/%40x%3Atest.local/keys"),
        ("GET", "/users/%40x%3Atest.local/cross_signing/history"),
        (
            "POST",
            "/users/%40x%3Atest.local/_allow_cross_signing_replacement_without_uia",
        ),
        ("DELETE", "/users/%40x%3Atest.local/cross_signing"),
        ("DELETE", "/users/%40x%3Atest.local/devices/D/keys"),
        ("GET", "/stats"),
        ("GET", "/users"),
        ("PUT", "/users/%40x%3Atest.local"),
        ("POST", "/users/%40x%3Atest.local/login"),
    ]

    async def test_no_token(self) -> None:
        """Without a token every endpoint is 401 M_MISSING_TOKEN."""
        for method, path in self.ENDPOINTS:
            resp = await self.client.request(method, ADMIN + path, body={})
            self.assertEqual(
                (resp.code, resp.json["errcode"]), (401, "M_MISSING_TOKEN"), path
            )

    async def test_non_admin(self) -> None:
        """A non-admin gets 403 M_FORBIDDEN everywhere and changes nothing."""
        alice = await self.ready_user("alice")
        for method, path in self.ENDPOINTS:
            path = path.replace("%40x%3Atest.local", u(alice.user_id))
            resp = await self.call(
                method, path, body={"admin": True}, token=alice.token
            )
            self.assertEqual(
                (resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"), path
            )
        result = await self.query(alice, alice.user_id)
        self.assertIn(alice.user_id, result["master_keys"])
        self.assertFalse(await self.host.is_admin(alice.user_id))

    async def test_admin_revoked(self) -> None:
        """Admin status is checked per request: a demoted admin is refused."""
        resp = await self.call("GET", "/stats")
        self.assertEqual(resp.code, 200, resp)
        await self.host.accounts.upsert_user(self.admin.user_id, 0, is_admin=False)
        resp = await self.call("GET", "/stats")
        self.assertEqual(resp.code, 403, resp)


class UserKeysTest(AdminTestBase):
    """GET users/{user_id}/keys and the history."""

    async def test_user_keys(self) -> None:
        """The summary lists devices, OTK counts, fallback state, keys and signature counts."""
        alice = await self.ready_user("alice")
        resp = await self.call("GET", f"/users/{u(alice.user_id)}/keys")
        self.assertEqual(resp.code, 200, resp)
        body = resp.json
        (device,) = body["devices"]
        self.assertEqual(device["device_id"], alice.device_id)
        self.assertIn(f"ed25519:{alice.device_id}", device["key_ids"])
        self.assertEqual(device["one_time_key_counts"], {"signed_curve25519": 2})
        self.assertEqual(
            device["fallback_keys"],
            {"signed_curve25519": {"key_id": "F", "used": False}},
        )
        self.assertEqual(device["signatures_received"], 1)
        cs = body["cross_signing"]
        self.assertEqual(cs["master"]["public_key"], public_key(alice.master))
        self.assertEqual(cs["self_signing"]["signatures_made"], 1)
        self.assertIsInstance(cs["user_signing"]["uploaded_ts"], int)
        self.assertIsNone(body["replacement_window"])

    async def test_unknown_user_404(self) -> None:
        """Unknown and remote users are 404 M_NOT_FOUND."""
        for user_id in ("@ghost:test.local", "@bob:elsewhere.example"):
            for method, path in (
                ("GET", f"/users/{u(user_id)}/keys"),
                ("GET", f"/users/{u(user_id)}/cross_signing/history"),
                (
                    "POST",
                    f"/users/{u(user_id)}/_allow_cross_signing_replacement_without_uia",
                ),
                ("DELETE", f"/users/{u(user_id)}/cross_signing"),
                ("DELETE", f"/users/{u(user_id)}/devices/D/keys"),
            ):
                resp = await self.call(method, path, body={})
                self.assertEqual(
                    (resp.code, resp.json["errcode"]), (404, "M_NOT_FOUND"), path
                )

    async def test_known_user_without_keys(self) -> None:
        """A local account without keys has an empty summary."""
        bob = await self.user_with_device("bob")
        resp = await self.call("GET", f"/users/{u(bob.user_id)}/keys")
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["devices"], [])
        self.assertIsNone(resp.json["cross_signing"]["master"])

    async def test_history_paginates(self) -> None:
        """History lists every key ever uploaded, with replacement times, in pages."""
        alice = await self.ready_user("alice")
        await self.replace_with_uia(alice, alice.make_cross_signing())
        await self.replace_with_uia(alice, alice.make_cross_signing())
        keys: list[dict[str, Any]] = []
        token: str | None = "0"
        pages = 0
        while token is not None:
            resp = await self.call(
                "GET",
                f"/users/{u(alice.user_id)}/cross_signing/history?from={token}&limit=4",
            )
            self.assertEqual(resp.code, 200, resp)
            self.assertEqual(resp.json["total"], 9)
            keys.extend(resp.json["keys"])
            token = resp.json.get("next_token")
            pages += 1
        self.assertEqual(pages, 3)
        self.assertEqual(len(keys), 9)
        self.assertEqual(sum(1 for k in keys if k["current"]), 3)
        self.assertTrue(all(k["replaced_ts"] is not None for k in keys[:6]))
        self.assertEqual(keys[-3]["public_key"], public_key(alice.master))
        resp = await self.call(
            "GET", f"/users/{u(alice.user_id)}/cross_signing/history?limit=x"
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (400, "M_INVALID_PARAM"))


class WindowTest(AdminTestBase):
    """The UIA-free replacement window."""

    async def test_window_lets_replacement_through_once(self) -> None:
        """Opening the window lets one master replacement through without UIA."""
        alice = await self.ready_user("alice")
        before = self.service.clock.time_msec()
        resp = await self.call(
            "POST",
            f"/users/{u(alice.user_id)}/_allow_cross_signing_replacement_without_uia",
            {},
        )
        self.assertEqual(resp.code, 200, resp)
        ts = resp.json["updatable_without_uia_before_ms"]
        self.assertGreaterEqual(ts, before + 600_000)
        summary = (await self.call("GET", f"/users/{u(alice.user_id)}/keys")).json
        self.assertEqual(
            summary["replacement_window"]["updatable_without_uia_before_ms"], ts
        )
        self.assertEqual(
            summary["replacement_window"]["granted_by"], self.admin.user_id
        )
        new = alice.make_cross_signing()
        resp = await self.upload(alice, new)
        self.assertEqual((resp.code, resp.json), (200, {}))
        self.assertEqual(
            (await self.query(alice, alice.user_id))["master_keys"][alice.user_id],
            new["master_key"],
        )
        resp = await self.upload(alice, alice.make_cross_signing())
        self.assertEqual(resp.code, 401, resp)

    async def test_opening_waits_for_a_key_change_in_progress(self) -> None:
        """Opening the window takes the user's lock, as uploads do: an upload
        of a new master (which closes the window) cannot miss a window opened
        while it runs."""
        if not self.db_url.startswith("postgresql"):
            raise unittest.SkipTest("SQLite writers are serial anyway")
        alice = await self.ready_user("alice")
        # A change of alice's keys, running:
        tx = hold_in_other_transaction(
            self, self.db.engine, lambda c: lock_users(c, [alice.user_id])
        )
        opening = defer.ensureDeferred(
            self.call(
                "POST",
                f"/users/{u(alice.user_id)}/_allow_cross_signing_replacement_without_uia",
                {},
            )
        )

        resp = await result_once_released(self, self.db.engine, opening, tx)
        self.assertEqual(resp.code, 200, resp)

    async def test_synapse_compatible_path(self) -> None:
        """The embedded host also serves Synapse's admin path for the window."""
        alice = await self.ready_user("alice")
        path = f"/_synapse/admin/v1/users/{u(alice.user_id)}/_allow_cross_signing_replacement_without_uia"
        resp = await self.client.post(path, {}, token=alice.token)
        self.assertEqual(resp.code, 403, resp)
        resp = await self.client.post(path, {}, token=self.admin.token)
        self.assertEqual(resp.code, 200, resp)
        self.assertIn("updatable_without_uia_before_ms", resp.json)

    async def test_no_master_404(self) -> None:
        """A user without a master key gets 404."""
        bob = await self.user_with_device("bob")
        resp = await self.call(
            "POST",
            f"/users/{u(bob.user_id)}/_allow_cross_signing_replacement_without_uia",
            {},
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (404, "M_NOT_FOUND"))


class ShortWindowTest(AdminTestBase):
    """The window length is configurable and the window expires."""

    config_overrides = {"replacement_window_ms": 1}

    async def test_window_expires(self) -> None:
        """After the window's length has passed, UIA is needed again."""

        alice = await self.ready_user("alice")
        resp = await self.call(
            "POST",
            f"/users/{u(alice.user_id)}/_allow_cross_signing_replacement_without_uia",
            {},
        )
        self.assertEqual(resp.code, 200, resp)
        await deferLater(reactor, 0.01, lambda: None)
        resp = await self.upload(alice, alice.make_cross_signing())
        self.assertEqual(resp.code, 401, resp)
        summary = (await self.call("GET", f"/users/{u(alice.user_id)}/keys")).json
        self.assertIsNone(summary["replacement_window"])


class RepairTest(AdminTestBase):
    """Reset of an identity and removal of a device's keys."""

    async def test_reset_identity(self) -> None:
        """After a reset the keys and signatures are gone and bootstrap needs no UIA."""
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        signed = sign_json(
            {
                "user_id": alice.user_id,
                "usage": ["master"],
                "keys": {
                    f"ed25519:{public_key(alice.master)}": public_key(alice.master)
                },
            },
            bob.user_id,
            bob.user_signing,
        )
        resp = await self.client.post(
            SIG_UPLOAD,
            {alice.user_id: {public_key(alice.master): signed}},
            token=bob.token,
        )
        self.assertEqual(resp.json, {"failures": {}})
        with self.assertLogs(
            "synapse_xsign_module.handlers.admin", logging.INFO
        ) as logs:
            resp = await self.call("DELETE", f"/users/{u(alice.user_id)}/cross_signing")
        self.assertEqual((resp.code, resp.json), (200, {"retired_keys": 3}))
        self.assertTrue(any(self.admin.user_id in line for line in logs.output))
        for viewer in (alice, bob):
            result = await self.query(viewer, alice.user_id)
            self.assertNotIn(alice.user_id, result["master_keys"])
            self.assertNotIn(alice.user_id, result["self_signing_keys"])
            self.assertNotIn(alice.user_id, result["user_signing_keys"])
            device = result["device_keys"][alice.user_id][alice.device_id]
            self.assertEqual(
                list(device["signatures"][alice.user_id]),
                [f"ed25519:{alice.device_id}"],
            )
        stats = (await self.call("GET", "/stats")).json
        self.assertEqual(stats["signatures"], 1)  # bob's own SSK signature remains
        # Bootstrap again without UIA.
        resp = await self.upload(alice, alice.make_cross_signing())
        self.assertEqual((resp.code, resp.json), (200, {}))
        history = (
            await self.call("GET", f"/users/{u(alice.user_id)}/cross_signing/history")
        ).json
        self.assertEqual(history["total"], 6)
        self.assertEqual({k["replaced_reason"] for k in history["keys"][:3]}, {"reset"})

    async def test_delete_device_keys(self) -> None:
        """Removing a device's keys drops its keys, OTKs, fallback and signatures over it."""
        alice = await self.ready_user("alice")
        resp = await self.call(
            "DELETE", f"/users/{u(alice.user_id)}/devices/{alice.device_id}/keys"
        )
        self.assertEqual(resp.code, 200, resp)
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["device_keys"][alice.user_id], {})
        resp = await self.client.post(
            "/_matrix/client/v3/keys/claim",
            {"one_time_keys": {alice.user_id: {alice.device_id: "signed_curve25519"}}},
            token=alice.token,
        )
        self.assertEqual(resp.json["one_time_keys"], {})
        stats = (await self.call("GET", "/stats")).json
        self.assertEqual(stats["signatures"], 0)
        self.assertEqual(stats["unclaimed_one_time_keys"], 0)
        resp = await self.call(
            "DELETE", f"/users/{u(alice.user_id)}/devices/{alice.device_id}/keys"
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (404, "M_NOT_FOUND"))


class StatsTest(AdminTestBase):
    """GET stats."""

    async def test_stats(self) -> None:
        """Counts, schema version and engine, and no credentials."""
        await self.ready_user("alice")
        await self.ready_user("bob")
        resp = await self.call("GET", "/stats")
        self.assertEqual(resp.code, 200, resp)
        body = resp.json
        self.assertEqual(body["users_with_cross_signing"], 2)
        self.assertEqual(body["devices_with_keys"], 2)
        self.assertEqual(body["signatures"], 2)
        self.assertEqual(body["unclaimed_one_time_keys"], 4)
        self.assertEqual(body["database_engine"], self.db.engine_name)
        self.assertEqual(body["schema_version"], self.service.schema_version)
        self.assertNotIn("password", resp.raw.decode().lower())
        self.assertNotIn(self.db_url, resp.raw.decode())


class AccountsTest(AdminTestBase):
    """The embedded host's account management."""

    async def test_create_login_deactivate(self) -> None:
        """PUT creates, login issues a token, deactivation revokes and removes keys."""
        resp = await self.call(
            "PUT", "/users/%40dave%3Atest.local", {"password": "pw1", "admin": False}
        )
        self.assertEqual(resp.code, 201, resp)
        self.assertEqual(resp.json["user_id"], "@dave:test.local")
        resp = await self.call(
            "PUT", "/users/%40dave%3Atest.local", {"password": "pw2"}
        )
        self.assertEqual(resp.code, 200, resp)
        token, device = await self.login("@dave:test.local", password="pw2")
        resp = await self.call(
            "POST", "/users/%40dave%3Atest.local/login", {"device_id": "ADMINMADE"}
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["device_id"], "ADMINMADE")
        dave = TestUser("@dave:test.local", device, token)
        await self.client.post(
            KEYS_UPLOAD, {"device_keys": dave.device_keys()}, token=dave.token
        )
        await self.bootstrap(dave)
        resp = await self.call(
            "PUT", "/users/%40dave%3Atest.local", {"deactivated": True}
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertTrue(resp.json["deactivated"])
        resp = await self.client.get(
            "/_matrix/client/v3/account/whoami", token=dave.token
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (401, "M_UNKNOWN_TOKEN"))
        result = await self.query(self.admin, dave.user_id)
        self.assertEqual(result["device_keys"][dave.user_id], {})
        self.assertNotIn(dave.user_id, result["master_keys"])
        resp = await self.call("POST", "/users/%40dave%3Atest.local/login", {})
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_USER_DEACTIVATED"))

    async def test_bad_bodies(self) -> None:
        """Wrong types and foreign user ids are 400; unknown users 404 on login."""
        for body in ({"password": 5}, {"admin": "yes"}, {"deactivated": 1}):
            resp = await self.call("PUT", "/users/%40erin%3Atest.local", body)
            self.assertEqual(
                (resp.code, resp.json["errcode"]), (400, "M_BAD_JSON"), body
            )
        resp = await self.call(
            "PUT", "/users/%40erin%3Aelsewhere.example", {"password": "x"}
        )
        self.assertEqual(resp.code, 400, resp)
        resp = await self.call("POST", "/users/%40nobody%3Atest.local/login", {})
        self.assertEqual((resp.code, resp.json["errcode"]), (404, "M_NOT_FOUND"))

    async def test_list_users_paginates(self) -> None:
        """GET users pages through every account with total and next_token."""
        for i in range(5):
            await self.make_user(f"user{i}")
        seen: list[str] = []
        token: str | None = "0"
        while token is not None:
            resp = await self.call("GET", f"/users?from={token}&limit=2")
            self.assertEqual(resp.code, 200, resp)
            self.assertEqual(resp.json["total"], 6)
            seen.extend(x["user_id"] for x in resp.json["users"])
            token = resp.json.get("next_token")
        self.assertEqual(len(seen), 6)
        self.assertEqual(seen, sorted(seen))
        self.assertIn(self.admin.user_id, seen)
