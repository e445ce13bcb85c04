"""POST /keys/device_signing/upload: validation, UIA, storage and visibility."""

from __future__ import annotations

import copy
from typing import Any

from signedjson.sign import sign_json
from sqlalchemy import select

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from synapse_xsign_module.errors import MatrixError
from synapse_xsign_module.host import Requester
from synapse_xsign_module.storage.schema import cross_signing_keys
from tests.utils import (
    PASSWORD,
    HostTestCase,
    TestUser,
    cross_signing_key,
    make_device_keys,
    new_signing_key,
    public_key,
)

UPLOAD = "/_matrix/client/v3/keys/device_signing/upload"
QUERY = "/_matrix/client/v3/keys/query"


def password_auth(
    user: TestUser, session: str | None = None, legacy: bool = False
) -> dict[str, Any]:
    """An m.login.password auth dict for ``user``."""
    auth: dict[str, Any] = {"type": "m.login.password", "password": PASSWORD}
    if legacy:
        auth["user"] = user.user_id
    else:
        auth["identifier"] = {"type": "m.id.user", "user": user.user_id}
    if session is not None:
        auth["session"] = session
    return auth


class CrossSigningTestBase(HostTestCase):
    """Helpers shared by the cross-signing tests."""

    async def upload(
        self, user: TestUser, body: dict[str, Any], path: str = UPLOAD
    ) -> Any:
        """POST a device_signing upload as ``user``."""
        return await self.client.post(path, body, token=user.token)

    async def query(self, user: TestUser, *targets: str) -> dict[str, Any]:
        """Query the keys of ``targets`` as ``user``."""
        resp = await self.client.post(
            QUERY, {"device_keys": {t: [] for t in targets}}, token=user.token
        )
        self.assertEqual(resp.code, 200, resp)
        result: dict[str, Any] = resp.json
        return result

    async def bootstrap(self, user: TestUser) -> dict[str, Any]:
        """First cross-signing setup (no UIA); returns the uploaded body."""
        body = user.make_cross_signing()
        resp = await self.upload(user, body)
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json, {})
        return body

    async def replace_with_uia(self, user: TestUser, body: dict[str, Any]) -> Any:
        """Upload ``body``, complete the password stage, return the final response."""
        first = await self.upload(user, body)
        self.assertEqual(first.code, 401, first)
        return await self.upload(
            user, {**body, "auth": password_auth(user, first.json["session"])}
        )

    def stored_rows(self, user_id: str) -> list[Any]:
        """Every cross-signing key row of a user (history included)."""
        with self.db.engine.connect() as conn:
            return list(
                conn.execute(
                    select(cross_signing_keys)
                    .where(cross_signing_keys.c.user_id == user_id)
                    .order_by(cross_signing_keys.c.id)
                )
            )


class ValidationTest(CrossSigningTestBase):
    """Each validation failure is a clear 4xx and stores nothing."""

    async def assert_rejected(
        self, user: TestUser, body: dict[str, Any], code: int, errcode: str
    ) -> Any:
        resp = await self.upload(user, body)
        self.assertEqual(resp.code, code, resp)
        self.assertEqual(resp.json["errcode"], errcode, resp)
        self.assertIsInstance(resp.json["error"], str)
        self.assertEqual(self.stored_rows(user.user_id), [])
        return resp

    async def test_wrong_user_id(self) -> None:
        """A master key naming another user is M_INVALID_PARAM."""
        alice = await self.user_with_device("alice")
        body = alice.make_cross_signing()
        body["master_key"]["user_id"] = "@mallory:test.local"
        resp = await self.assert_rejected(alice, body, 400, "M_INVALID_PARAM")
        self.assertIn("master_key", resp.json["error"])

    async def test_usage_missing_role(self) -> None:
        """A master key whose usage lacks 'master' is M_INVALID_PARAM."""
        alice = await self.user_with_device("alice")
        key = new_signing_key()
        body = {"master_key": cross_signing_key(alice.user_id, "self_signing", key)}
        resp = await self.assert_rejected(alice, body, 400, "M_INVALID_PARAM")
        self.assertIn("usage", resp.json["error"])

    async def test_two_keys(self) -> None:
        """A key object with two public keys is M_INVALID_PARAM."""
        alice = await self.user_with_device("alice")
        master = cross_signing_key(alice.user_id, "master", new_signing_key())
        other = public_key(new_signing_key())
        master["keys"][f"ed25519:{other}"] = other
        await self.assert_rejected(
            alice, {"master_key": master}, 400, "M_INVALID_PARAM"
        )

    async def test_key_id_mismatch(self) -> None:
        """A key id whose suffix differs from the key is M_INVALID_PARAM."""
        alice = await self.user_with_device("alice")
        pub = public_key(new_signing_key())
        other = public_key(new_signing_key())
        master = {
            "user_id": alice.user_id,
            "usage": ["master"],
            "keys": {f"ed25519:{other}": pub},
        }
        await self.assert_rejected(
            alice, {"master_key": master}, 400, "M_INVALID_PARAM"
        )

    async def test_not_ed25519(self) -> None:
        """A key of another algorithm, or not 32 bytes, is M_INVALID_PARAM."""
        alice = await self.user_with_device("alice")
        pub = public_key(new_signing_key())
        for key_id, value in (
            (f"curve25519:{pub}", pub),
            ("ed25519:AAAA", "AAAA"),
            ("ed25519:not base64!", "not base64!"),
        ):
            master = {
                "user_id": alice.user_id,
                "usage": ["master"],
                "keys": {key_id: value},
            }
            await self.assert_rejected(
                alice, {"master_key": master}, 400, "M_INVALID_PARAM"
            )

    async def test_wrong_json_types(self) -> None:
        """Keys that are not objects, or with mistyped fields, are M_BAD_JSON."""
        alice = await self.user_with_device("alice")
        good = cross_signing_key(alice.user_id, "master", new_signing_key())
        bad_values: list[Any] = [
            "x",
            [],
            {**good, "usage": "master"},
            {**good, "keys": ["a"]},
            {**good, "user_id": 5},
            {k: v for k, v in good.items() if k != "keys"},
            {**good, "signatures": {"@a:b": "x"}},
        ]
        for value in bad_values:
            await self.assert_rejected(alice, {"master_key": value}, 400, "M_BAD_JSON")

    async def test_ssk_without_master_anywhere(self) -> None:
        """An SSK with no master in the request or stored is M_MISSING_PARAM."""
        alice = await self.user_with_device("alice")
        body = alice.make_cross_signing()
        del body["master_key"]
        await self.assert_rejected(alice, body, 400, "M_MISSING_PARAM")

    async def test_ssk_bad_signature(self) -> None:
        """An SSK not signed by the master is M_INVALID_SIGNATURE."""
        alice = await self.user_with_device("alice")
        body = alice.make_cross_signing()
        body["self_signing_key"] = cross_signing_key(
            alice.user_id, "self_signing", alice.self_signing, new_signing_key()
        )
        await self.assert_rejected(alice, body, 400, "M_INVALID_SIGNATURE")

    async def test_usk_unsigned(self) -> None:
        """A USK without any signature is M_INVALID_SIGNATURE."""
        alice = await self.user_with_device("alice")
        body = alice.make_cross_signing()
        body["user_signing_key"] = cross_signing_key(
            alice.user_id, "user_signing", alice.user_signing
        )
        await self.assert_rejected(alice, body, 400, "M_INVALID_SIGNATURE")

    async def test_tampered_ssk(self) -> None:
        """An SSK changed after the master signed it is M_INVALID_SIGNATURE."""
        alice = await self.user_with_device("alice")
        body = alice.make_cross_signing()
        body["self_signing_key"]["usage"].append("extra")
        await self.assert_rejected(alice, body, 400, "M_INVALID_SIGNATURE")

    async def test_key_id_in_use(self) -> None:
        """A public key equal to one of the user's device ids is 403."""
        alice = await self.user_with_device("alice")
        master = new_signing_key()
        pub = public_key(master)
        # A second device whose id is that public key.
        await self.login(alice.user_id, device_id=pub)
        body = {"master_key": cross_signing_key(alice.user_id, "master", master)}
        resp = await self.assert_rejected(alice, body, 403, "M_FORBIDDEN")
        self.assertIn("Key ID in use", resp.json["error"])

    async def test_key_id_of_device_with_keys_only_here(self) -> None:
        """A device known only by its stored keys (not by the host) counts too."""
        alice = await self.user_with_device("alice")
        master = new_signing_key()
        pub = public_key(master)
        from synapse_xsign_module.storage.device_keys import upload_txn

        keys = make_device_keys(alice.user_id, pub, new_signing_key())
        with self.db.engine.begin() as conn:
            upload_txn(conn, alice.user_id, pub, keys, [], [], 0)
        self.assertNotIn(pub, await self.host.get_device_ids(alice.user_id) or set())
        body = {"master_key": cross_signing_key(alice.user_id, "master", master)}
        resp = await self.assert_rejected(alice, body, 403, "M_FORBIDDEN")
        self.assertIn("Key ID in use", resp.json["error"])

    async def test_guest_forbidden(self) -> None:
        """A guest gets 403 M_GUEST_ACCESS_FORBIDDEN."""
        alice = await self.user_with_device("alice")
        guest = Requester(alice.user_id, None, is_guest=True)
        with self.assertRaises(MatrixError) as cm:
            await self.service.cross_signing.upload(
                None, guest, alice.make_cross_signing()
            )
        self.assertEqual(
            (cm.exception.code, cm.exception.errcode), (403, "M_GUEST_ACCESS_FORBIDDEN")
        )
        self.assertEqual(self.stored_rows(alice.user_id), [])

    async def test_no_keys_is_ok(self) -> None:
        """A body without keys is 200 {} and stores nothing."""
        alice = await self.user_with_device("alice")
        resp = await self.upload(alice, {})
        self.assertEqual((resp.code, resp.json), (200, {}))
        self.assertEqual(self.stored_rows(alice.user_id), [])

    async def test_not_under_r0(self) -> None:
        """The endpoint is served under v3 and unstable, not r0."""
        alice = await self.user_with_device("alice")
        resp = await self.upload(
            alice, {}, path="/_matrix/client/r0/keys/device_signing/upload"
        )
        self.assertEqual(
            (resp.code, resp.json and resp.json.get("errcode")),
            (404, "M_UNRECOGNIZED"),
            resp,
        )
        resp = await self.upload(
            alice,
            alice.make_cross_signing(),
            path="/_matrix/client/unstable/keys/device_signing/upload",
        )
        self.assertEqual(resp.code, 200, resp)


class UIATest(CrossSigningTestBase):
    """When UIA is needed, and how it completes (Matrix 1.11 rules)."""

    async def test_first_upload_without_uia(self) -> None:
        """The first set of keys needs no UIA and is returned exactly as sent."""
        alice = await self.user_with_device("alice")
        body = await self.bootstrap(alice)
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["master_keys"][alice.user_id], body["master_key"])
        self.assertEqual(
            result["self_signing_keys"][alice.user_id], body["self_signing_key"]
        )
        self.assertEqual(
            result["user_signing_keys"][alice.user_id], body["user_signing_key"]
        )
        self.assertNotIn("signatures", result["master_keys"][alice.user_id])

    async def test_identical_reupload_without_uia(self) -> None:
        """Re-sending the same keys is 200 without UIA, with or without a stale auth."""
        alice = await self.user_with_device("alice")
        body = await self.bootstrap(alice)
        resp = await self.upload(alice, body)
        self.assertEqual((resp.code, resp.json), (200, {}))
        stale = {**body, "auth": password_auth(alice, "no-such-session")}
        resp = await self.upload(alice, stale)
        self.assertEqual((resp.code, resp.json), (200, {}))
        subset = {
            "self_signing_key": body["self_signing_key"],
            "auth": {"session": "used"},
        }
        resp = await self.upload(alice, subset)
        self.assertEqual((resp.code, resp.json), (200, {}))
        self.assertEqual(len(self.stored_rows(alice.user_id)), 3)

    async def test_replacement_requires_uia(self) -> None:
        """A new master key gets 401 with flows, params and session; nothing changes."""
        alice = await self.user_with_device("alice")
        old = await self.bootstrap(alice)
        resp = await self.upload(alice, alice.make_cross_signing())
        self.assertEqual(resp.code, 401, resp)
        self.assertIn({"stages": ["m.login.password"]}, resp.json["flows"])
        self.assertIsInstance(resp.json["params"], dict)
        self.assertIsInstance(resp.json["session"], str)
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["master_keys"][alice.user_id], old["master_key"])

    async def test_replacement_with_password(self) -> None:
        """Completing m.login.password with the session stores the new keys."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        new = alice.make_cross_signing()
        resp = await self.replace_with_uia(alice, new)
        self.assertEqual((resp.code, resp.json), (200, {}))
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["master_keys"][alice.user_id], new["master_key"])

    async def test_replacement_with_legacy_user_form(self) -> None:
        """The legacy flat 'user' form of m.login.password works, even in one request."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        new = alice.make_cross_signing()
        resp = await self.upload(
            alice, {**new, "auth": password_auth(alice, legacy=True)}
        )
        self.assertEqual((resp.code, resp.json), (200, {}))

    async def test_wrong_password(self) -> None:
        """A wrong password is 401 M_FORBIDDEN with the same session; nothing stored."""
        alice = await self.user_with_device("alice")
        old = await self.bootstrap(alice)
        new = alice.make_cross_signing()
        first = await self.upload(alice, new)
        session = first.json["session"]
        auth = {**password_auth(alice, session), "password": "wrong"}
        resp = await self.upload(alice, {**new, "auth": auth})
        self.assertEqual(resp.code, 401, resp)
        self.assertEqual(resp.json["errcode"], "M_FORBIDDEN")
        self.assertEqual(resp.json["session"], session)
        self.assertIn("flows", resp.json)
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["master_keys"][alice.user_id], old["master_key"])
        # The same session still completes with the right password.
        resp = await self.upload(alice, {**new, "auth": password_auth(alice, session)})
        self.assertEqual(resp.code, 200, resp)

    async def test_completed_session_is_used_up(self) -> None:
        """A session that authorised one replacement cannot authorise another."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        new = alice.make_cross_signing()
        first = await self.upload(alice, new)
        session = first.json["session"]
        resp = await self.upload(alice, {**new, "auth": password_auth(alice, session)})
        self.assertEqual(resp.code, 200, resp)
        third = alice.make_cross_signing()
        resp = await self.upload(alice, {**third, "auth": {"session": session}})
        self.assertEqual(resp.code, 400, resp)
        resp = await self.upload(
            alice, {**third, "auth": password_auth(alice, session)}
        )
        self.assertEqual(resp.code, 400, resp)
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["master_keys"][alice.user_id], new["master_key"])

    async def test_session_of_another_user(self) -> None:
        """A session started by one user cannot be used by another (403)."""
        alice = await self.user_with_device("alice")
        bob = await self.user_with_device("bob")
        await self.bootstrap(alice)
        await self.bootstrap(bob)
        first = await self.upload(alice, alice.make_cross_signing())
        new_bob = bob.make_cross_signing()
        resp = await self.upload(
            bob, {**new_bob, "auth": password_auth(bob, first.json["session"])}
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"))

    async def test_uia_identity_mismatch(self) -> None:
        """Authenticating as another user than the token's is 403."""
        alice = await self.user_with_device("alice")
        bob = await self.user_with_device("bob")
        await self.bootstrap(alice)
        new = alice.make_cross_signing()
        first = await self.upload(alice, new)
        resp = await self.upload(
            alice, {**new, "auth": password_auth(bob, first.json["session"])}
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"))

    async def test_session_bound_to_request(self) -> None:
        """A session cannot authorise a different body."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        first = await self.upload(alice, alice.make_cross_signing())
        other = alice.make_cross_signing()
        resp = await self.upload(
            alice, {**other, "auth": password_auth(alice, first.json["session"])}
        )
        self.assertEqual(resp.code, 403, resp)

    async def test_unknown_session(self) -> None:
        """An unknown session id is a 400."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        resp = await self.upload(
            alice, {**alice.make_cross_signing(), "auth": password_auth(alice, "nope")}
        )
        self.assertEqual(resp.code, 400, resp)

    async def test_adding_missing_usk_needs_uia(self) -> None:
        """With a master stored, adding a USK is a change and needs UIA."""
        alice = await self.user_with_device("alice")
        body = alice.make_cross_signing()
        usk = body.pop("user_signing_key")
        await self.upload(alice, body)
        resp = await self.upload(alice, {"user_signing_key": usk})
        self.assertEqual(resp.code, 401, resp)


class DummyFlowTest(CrossSigningTestBase):
    """``uia.allow_dummy`` adds m.login.dummy as an alternative flow."""

    config_overrides = {"uia": {"allow_dummy": True}}

    async def test_dummy_flow(self) -> None:
        """The dummy stage completes the replacement."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        new = alice.make_cross_signing()
        first = await self.upload(alice, new)
        self.assertIn({"stages": ["m.login.dummy"]}, first.json["flows"])
        resp = await self.upload(
            alice,
            {
                **new,
                "auth": {"type": "m.login.dummy", "session": first.json["session"]},
            },
        )
        self.assertEqual(resp.code, 200, resp)


class SessionExpiryTest(CrossSigningTestBase):
    """UIA sessions expire after ``uia.session_timeout_ms``."""

    config_overrides = {"uia": {"session_timeout_ms": 1}}

    async def test_expired_session(self) -> None:
        """An expired session is refused."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        new = alice.make_cross_signing()
        first = await self.upload(alice, new)
        await deferLater(reactor, 0.01, lambda: None)
        resp = await self.upload(
            alice, {**new, "auth": password_auth(alice, first.json["session"])}
        )
        self.assertEqual(resp.code, 400, resp)


class StorageTest(CrossSigningTestBase):
    """Atomic storage, replacement semantics and history."""

    async def test_ssk_only_signed_by_stored_master(self) -> None:
        """An SSK-only upload is checked against the stored master key."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        new_ssk_key = new_signing_key()
        ssk = cross_signing_key(
            alice.user_id, "self_signing", new_ssk_key, alice.master
        )
        resp = await self.replace_with_uia(alice, {"self_signing_key": ssk})
        self.assertEqual(resp.code, 200, resp)
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["self_signing_keys"][alice.user_id], ssk)

    async def test_ssk_signed_by_other_key_rejected_after_uia(self) -> None:
        """An SSK-only upload signed by a non-master key is M_INVALID_SIGNATURE."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        ssk = cross_signing_key(
            alice.user_id, "self_signing", new_signing_key(), new_signing_key()
        )
        resp = await self.upload(alice, {"self_signing_key": ssk})
        self.assertEqual(
            (resp.code, resp.json["errcode"]), (400, "M_INVALID_SIGNATURE")
        )

    async def test_master_replacement_retires_old_ssk_usk(self) -> None:
        """A new master alone retires the SSK and USK the old master signed."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        new_master = new_signing_key()
        body = {"master_key": cross_signing_key(alice.user_id, "master", new_master)}
        resp = await self.replace_with_uia(alice, body)
        self.assertEqual(resp.code, 200, resp)
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["master_keys"][alice.user_id], body["master_key"])
        self.assertNotIn(alice.user_id, result["self_signing_keys"])
        self.assertNotIn(alice.user_id, result["user_signing_keys"])
        rows = self.stored_rows(alice.user_id)
        self.assertEqual(len(rows), 4)
        self.assertEqual(sum(1 for r in rows if r.replaced_ts is None), 1)

    async def test_master_with_new_ssk_usk_in_same_request(self) -> None:
        """A new master with new SSK/USK signed by it replaces all three together."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        new = alice.make_cross_signing()
        await self.replace_with_uia(alice, new)
        result = await self.query(alice, alice.user_id)
        self.assertEqual(
            result["self_signing_keys"][alice.user_id], new["self_signing_key"]
        )
        self.assertEqual(
            result["user_signing_keys"][alice.user_id], new["user_signing_key"]
        )

    async def test_same_master_new_ssk(self) -> None:
        """The stored master re-sent with a new SSK stores the SSK (no 500)."""
        alice = await self.user_with_device("alice")
        body = await self.bootstrap(alice)
        ssk = cross_signing_key(
            alice.user_id, "self_signing", new_signing_key(), alice.master
        )
        resp = await self.replace_with_uia(
            alice, {"master_key": body["master_key"], "self_signing_key": ssk}
        )
        self.assertEqual(resp.code, 200, resp)
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["self_signing_keys"][alice.user_id], ssk)
        self.assertEqual(
            result["user_signing_keys"][alice.user_id], body["user_signing_key"]
        )

    async def test_old_key_reupload_after_replacement(self) -> None:
        """An old key can come back later; history keeps every row."""
        alice = await self.user_with_device("alice")
        first = await self.bootstrap(alice)
        second = alice.make_cross_signing()
        await self.replace_with_uia(alice, second)
        resp = await self.replace_with_uia(alice, first)
        self.assertEqual(resp.code, 200, resp)
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["master_keys"][alice.user_id], first["master_key"])
        self.assertEqual(len(self.stored_rows(alice.user_id)), 9)

    async def test_failed_upload_stores_nothing(self) -> None:
        """A valid master with an invalid SSK stores neither (one transaction)."""
        alice = await self.user_with_device("alice")
        body = alice.make_cross_signing()
        body["self_signing_key"] = copy.deepcopy(body["self_signing_key"])
        body["self_signing_key"]["signatures"] = {}
        resp = await self.upload(alice, body)
        self.assertEqual(resp.code, 400, resp)
        self.assertEqual(self.stored_rows(alice.user_id), [])

    async def test_concurrent_first_uploads(self) -> None:
        """Two concurrent first uploads leave one consistent identity."""
        alice = await self.user_with_device("alice")
        bodies = [alice.make_cross_signing() for _ in range(6)]
        results = await defer.gatherResults(
            [defer.ensureDeferred(self.upload(alice, b)) for b in bodies]
        )
        codes = sorted(r.code for r in results)
        self.assertEqual(codes.count(200), 1, codes)
        self.assertEqual(codes.count(401), 5, codes)
        winner = bodies[[r.code for r in results].index(200)]
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["master_keys"][alice.user_id], winner["master_key"])
        self.assertEqual(
            result["self_signing_keys"][alice.user_id], winner["self_signing_key"]
        )
        self.assertEqual(
            result["user_signing_keys"][alice.user_id], winner["user_signing_key"]
        )
        self.assertEqual(len(self.stored_rows(alice.user_id)), 3)

    async def test_login_refuses_device_id_equal_to_key(self) -> None:
        """Logging in with a device id equal to a current cross-signing key is 403."""
        alice = await self.user_with_device("alice")
        body = await self.bootstrap(alice)
        (pub,) = body["master_key"]["keys"].values()
        resp = await self.client.post(
            "/_matrix/client/v3/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": alice.user_id},
                "password": PASSWORD,
                "device_id": pub,
            },
        )
        self.assertEqual((resp.code, resp.json["errcode"]), (403, "M_FORBIDDEN"))


class GrantWindowTest(CrossSigningTestBase):
    """An admin-granted window lets a master replacement through without UIA."""

    async def test_window_allows_one_replacement(self) -> None:
        """Inside the window a replacement needs no UIA; the window then closes."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        now = self.service.clock.time_msec()
        ok = await self.service.cross_signing_store.set_grant(
            alice.user_id, now + 600_000, "@admin:test.local", now
        )
        self.assertTrue(ok)
        new = alice.make_cross_signing()
        resp = await self.upload(alice, new)
        self.assertEqual((resp.code, resp.json), (200, {}))
        resp = await self.upload(alice, alice.make_cross_signing())
        self.assertEqual(resp.code, 401, resp)

    async def test_expired_window(self) -> None:
        """An expired window does not skip UIA."""
        alice = await self.user_with_device("alice")
        await self.bootstrap(alice)
        now = self.service.clock.time_msec()
        await self.service.cross_signing_store.set_grant(
            alice.user_id, now - 1, "@admin:test.local", now - 600_000
        )
        resp = await self.upload(alice, alice.make_cross_signing())
        self.assertEqual(resp.code, 401, resp)

    async def test_no_window_without_master(self) -> None:
        """A window cannot be opened for a user without a master key."""
        alice = await self.user_with_device("alice")
        now = self.service.clock.time_msec()
        ok = await self.service.cross_signing_store.set_grant(
            alice.user_id, now + 1000, "@admin:test.local", now
        )
        self.assertFalse(ok)


class QueryVisibilityTest(CrossSigningTestBase):
    """/keys/query shows master and SSK to all, the USK to its owner alone."""

    async def test_usk_visible_to_owner_only(self) -> None:
        """Bob sees Alice's master and SSK but never her USK."""
        alice = await self.user_with_device("alice")
        bob = await self.user_with_device("bob")
        body = await self.bootstrap(alice)
        result = await self.query(bob, alice.user_id, bob.user_id)
        self.assertEqual(result["master_keys"][alice.user_id], body["master_key"])
        self.assertEqual(
            result["self_signing_keys"][alice.user_id], body["self_signing_key"]
        )
        self.assertEqual(result["user_signing_keys"], {})
        own = await self.query(alice, alice.user_id)
        self.assertEqual(
            own["user_signing_keys"], {alice.user_id: body["user_signing_key"]}
        )
        others = await self.query(alice, bob.user_id)
        self.assertEqual(others["user_signing_keys"], {})

    async def test_master_with_device_signature_is_returned_as_sent(self) -> None:
        """A master key uploaded with extra signatures comes back byte for byte."""
        alice = await self.user_with_device("alice")
        master = cross_signing_key(alice.user_id, "master", new_signing_key())
        master = sign_json(master, alice.user_id, alice.device_key)
        resp = await self.upload(alice, {"master_key": master})
        self.assertEqual(resp.code, 200, resp)
        result = await self.query(alice, alice.user_id)
        self.assertEqual(result["master_keys"][alice.user_id], master)
