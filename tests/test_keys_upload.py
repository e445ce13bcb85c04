"""``POST /_matrix/client/{r0,v3,unstable}/keys/upload`` through the HTTP layer."""

from __future__ import annotations

import copy
from typing import Any

from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from sqlalchemy import Connection, select

from twisted.internet import defer, reactor
from twisted.trial import unittest

from synapse_xsign_module.hosts.embedded.accounts import hash_token, new_token
from synapse_xsign_module.storage.schema import (
    device_keys,
    fallback_keys,
    host_access_tokens,
    one_time_keys,
)
from synapse_xsign_module.storage.util import lock_device, lock_users
from tests.utils import (
    HostTestCase,
    Response,
    TestUser,
    hold_in_other_transaction,
    make_device_keys,
    public_key,
    result_once_released,
    signed_key,
)

ALG = "signed_curve25519"


class KeysUploadTest(HostTestCase):
    """``/keys/upload``: validation, storage and one-time/fallback key rules."""

    # More database threads than the default, so that uploads really overlap.
    config_overrides = {"database": {"threadpool_size": 8}}

    async def upload(
        self, user: TestUser, body: dict[str, Any], version: str = "v3"
    ) -> Response:
        """POST ``body`` to ``/keys/upload`` as ``user``."""
        return await self.client.post(
            f"/_matrix/client/{version}/keys/upload", body, token=user.token
        )

    async def query_devices(self, user: TestUser) -> dict[str, Any]:
        """The device objects ``/keys/query`` returns for ``user``."""
        resp = await self.client.post(
            "/_matrix/client/v3/keys/query",
            {"device_keys": {user.user_id: []}},
            token=user.token,
        )
        self.assertEqual(resp.code, 200, resp)
        devices: dict[str, Any] = resp.json["device_keys"][user.user_id]
        return devices

    async def otk_rows(self, user: TestUser) -> list[tuple[str, str, str]]:
        """(algorithm, key id, key JSON) of the stored one-time keys of a device."""

        def txn(conn: Connection) -> list[tuple[str, str, str]]:
            c = one_time_keys.c
            rows = conn.execute(
                select(c.algorithm, c.key_id, c.key_json)
                .where(c.user_id == user.user_id, c.device_id == user.device_id)
                .order_by(c.id)
            )
            return [(a, k, j) for a, k, j in rows]

        result: list[tuple[str, str, str]] = await self.db.run_read("otks", txn)
        return result

    async def fallback_rows(self, user: TestUser) -> list[tuple[str, str, bool]]:
        """(algorithm, key id, used) of the stored fallback keys of a device."""

        def txn(conn: Connection) -> list[tuple[str, str, bool]]:
            c = fallback_keys.c
            rows = conn.execute(
                select(c.algorithm, c.key_id, c.used).where(
                    c.user_id == user.user_id, c.device_id == user.device_id
                )
            )
            return [(a, k, bool(u)) for a, k, u in rows]

        result: list[tuple[str, str, bool]] = await self.db.run_read("fbks", txn)
        return result

    async def device_key_ts(self, user: TestUser) -> int | None:
        """``ts_added_ms`` of the stored device keys, or None."""

        def txn(conn: Connection) -> int | None:
            c = device_keys.c
            value = conn.execute(
                select(c.ts_added_ms).where(
                    c.user_id == user.user_id, c.device_id == user.device_id
                )
            ).scalar()
            return None if value is None else int(value)

        result: int | None = await self.db.run_read("dk_ts", txn)
        return result

    async def claim(self, claimer: TestUser, target: TestUser) -> dict[str, Any]:
        """Claim one ``signed_curve25519`` key of ``target``'s device."""
        resp = await self.client.post(
            "/_matrix/client/v3/keys/claim",
            {"one_time_keys": {target.user_id: {target.device_id: ALG}}},
            token=claimer.token,
        )
        self.assertEqual(resp.code, 200, resp)
        keys: dict[str, Any] = (
            resp.json["one_time_keys"].get(target.user_id, {}).get(target.device_id, {})
        )
        return keys

    def assert_error(
        self, resp: Response, errcode: str | None = "M_BAD_JSON", code: int = 400
    ) -> None:
        """``resp`` is a Matrix error with this status (and errcode, if given)."""
        self.assertEqual(resp.code, code, resp)
        self.assertIsInstance(resp.json, dict, resp)
        self.assertIsInstance(resp.json.get("error"), str, resp)
        if errcode is not None:
            self.assertEqual(resp.json.get("errcode"), errcode, resp)

    # --- who may upload ------------------------------------------------------

    async def test_token_without_device_is_rejected(self) -> None:
        """A valid access token that has no device gets 400 and stores nothing."""
        alice = await self.user_with_device("alice", "ADEV")
        token = new_token()
        now = self.service.clock.time_msec()

        def txn(conn: Connection) -> None:
            conn.execute(
                host_access_tokens.insert().values(
                    token_hash=hash_token(token),
                    user_id=alice.user_id,
                    device_id=None,
                    created_ts=now,
                )
            )

        await self.db.run("deviceless_token", txn)
        whoami = await self.client.get("/_matrix/client/v3/account/whoami", token=token)
        self.assertEqual(whoami.code, 200, whoami)
        self.assertNotIn("device_id", whoami.json)

        deviceless = TestUser(alice.user_id, alice.device_id, token)
        for body in (
            {},
            {"one_time_keys": {f"{ALG}:AAAA": signed_key(alice)}},
            {"fallback_keys": {f"{ALG}:FB": signed_key(alice, fallback=True)}},
            {"device_keys": alice.device_keys()},
        ):
            resp = await self.upload(deviceless, body)
            self.assert_error(resp, errcode=None)
        self.assertEqual(await self.query_devices(alice), {})
        self.assertEqual(await self.otk_rows(alice), [])
        self.assertEqual(await self.fallback_rows(alice), [])

    # --- device_keys validation ----------------------------------------------

    async def test_device_keys_missing_required_field_is_rejected(self) -> None:
        """device_keys without user_id/device_id/algorithms/keys/signatures -> 400."""
        alice = await self.user_with_device("alice", "ADEV")
        for field in ("user_id", "device_id", "algorithms", "keys", "signatures"):
            dk = alice.device_keys()
            del dk[field]
            resp = await self.upload(alice, {"device_keys": dk})
            self.assert_error(resp)
            self.assertIn(field, resp.json["error"], field)
        self.assertEqual(await self.query_devices(alice), {})

    async def test_device_keys_wrong_json_type_is_rejected(self) -> None:
        """Each DeviceKeys field of the wrong JSON type gives 400 M_BAD_JSON."""
        alice = await self.user_with_device("alice", "ADEV")
        bad_values: list[tuple[str, Any]] = [
            ("user_id", 42),
            ("user_id", [alice.user_id]),
            ("device_id", None),
            ("device_id", {"id": alice.device_id}),
            ("algorithms", "m.olm.v1.curve25519-aes-sha2"),
            ("algorithms", ["m.olm.v1.curve25519-aes-sha2", 7]),
            ("algorithms", {"a": "b"}),
            ("keys", ["ed25519:ADEV"]),
            ("keys", {"ed25519:ADEV": 12345}),
            ("keys", {"ed25519:ADEV": {"k": "v"}}),
            ("signatures", "sig"),
            ("signatures", {alice.user_id: "sig"}),
            ("signatures", {alice.user_id: {"ed25519:ADEV": 1}}),
            ("signatures", [{"ed25519:ADEV": "sig"}]),
        ]
        for field, value in bad_values:
            dk = alice.device_keys()
            dk[field] = value
            resp = await self.upload(alice, {"device_keys": dk})
            self.assert_error(resp)
        self.assertEqual(await self.query_devices(alice), {})

    async def test_device_keys_null_is_rejected(self) -> None:
        """``"device_keys": null`` gets 400, not treated as absent."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.upload(
            alice,
            {"device_keys": None, "one_time_keys": {f"{ALG}:AAAA": signed_key(alice)}},
        )
        self.assert_error(resp, errcode=None)
        self.assertEqual(await self.otk_rows(alice), [])

    async def test_device_keys_list_is_rejected(self) -> None:
        """device_keys given as a JSON list gets 400 M_BAD_JSON."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.upload(alice, {"device_keys": [alice.device_keys()]})
        self.assert_error(resp)
        self.assertEqual(await self.query_devices(alice), {})

    async def test_foreign_user_id_is_rejected(self) -> None:
        """device_keys.user_id naming another user gets 400 M_BAD_JSON."""
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "ADEV")
        # Bob's genuinely signed keys, for a device id alice also has.
        resp = await self.upload(alice, {"device_keys": bob.device_keys()})
        self.assert_error(resp)
        self.assertEqual(await self.query_devices(alice), {})
        self.assertEqual(await self.query_devices(bob), {})

    async def test_foreign_device_id_is_rejected(self) -> None:
        """device_keys.device_id naming another device gets 400 M_BAD_JSON."""
        alice = await self.user_with_device("alice", "ADEV")
        other_token, other_device = await self.login(alice.user_id, "OTHER")
        other = TestUser(alice.user_id, other_device, other_token)
        resp = await self.upload(alice, {"device_keys": other.device_keys()})
        self.assert_error(resp)
        self.assertEqual(await self.query_devices(alice), {})

    # --- storing device keys ---------------------------------------------------

    async def test_device_keys_stored_exactly_as_sent(self) -> None:
        """Query returns the uploaded object verbatim (unknown fields too) + unsigned."""
        alice = await self.user_with_device("alice", "ADEV")
        dk = make_device_keys(
            alice.user_id,
            alice.device_id,
            alice.device_key,
            extra_keys={"ed25519:extra": public_key(generate_signing_key("x"))},
        )
        dk["org.example.custom"] = {"nested": [1, "two", None, True, {"é": "ü"}]}
        dk = sign_json(dk, alice.user_id, alice.device_key)
        sent = copy.deepcopy(dk)
        resp = await self.upload(alice, {"device_keys": dk})
        self.assertEqual(resp.code, 200, resp)
        devices = await self.query_devices(alice)
        self.assertEqual(devices, {alice.device_id: {**sent, "unsigned": {}}})
        # The self-signature still verifies on what comes back.
        verify_signed_json(
            devices[alice.device_id], alice.user_id, get_verify_key(alice.device_key)
        )

    async def test_unverifiable_self_signature_is_accepted(self) -> None:
        """Fake, foreign-key and empty self-signatures are stored, not verified."""
        alice = await self.user_with_device("alice", "ADEV")
        genuine = alice.device_keys()
        impostor = generate_signing_key(alice.device_id)
        wrong_key = make_device_keys(
            alice.user_id, alice.device_id, alice.device_key
        )  # keys name alice.device_key ...
        del wrong_key["signatures"]
        wrong_key = sign_json(wrong_key, alice.user_id, impostor)  # ... not signer
        with self.assertRaises(SignatureVerifyException):
            verify_signed_json(
                wrong_key, alice.user_id, get_verify_key(alice.device_key)
            )
        fake = dict(genuine)
        fake["signatures"] = {alice.user_id: {"ed25519:ADEV": "self+signature"}}
        empty = dict(genuine)
        empty["signatures"] = {}
        for dk in (wrong_key, fake, empty):
            resp = await self.upload(alice, {"device_keys": dk})
            self.assertEqual(resp.code, 200, resp)
            devices = await self.query_devices(alice)
            self.assertEqual(devices, {alice.device_id: {**dk, "unsigned": {}}})

    async def test_reupload_of_different_keys_replaces_them(self) -> None:
        """Uploading other device keys for the same device replaces the old ones."""
        alice = await self.user_with_device("alice", "ADEV")
        first = alice.device_keys()
        resp = await self.upload(alice, {"device_keys": first})
        self.assertEqual(resp.code, 200, resp)
        alice.device_key = generate_signing_key(alice.device_id)
        second = alice.device_keys()
        self.assertNotEqual(first["keys"], second["keys"])
        resp = await self.upload(alice, {"device_keys": second})
        self.assertEqual(resp.code, 200, resp)
        devices = await self.query_devices(alice)
        self.assertEqual(devices, {alice.device_id: {**second, "unsigned": {}}})
        self.assertEqual(self.host.changed_users.count(alice.user_id), 2)

    async def test_identical_reupload_changes_nothing(self) -> None:
        """Re-sending identical device keys keeps the stored row and notifies no one."""
        alice = await self.user_with_device("alice", "ADEV")
        dk = alice.device_keys()
        self.patch(self.service.clock, "time_msec", lambda: 1_000_000)
        resp = await self.upload(alice, {"device_keys": dk})
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(await self.device_key_ts(alice), 1_000_000)
        self.assertEqual(self.host.changed_users, [alice.user_id])

        self.patch(self.service.clock, "time_msec", lambda: 2_000_000)
        # Same object, keys in another order: canonically identical.
        reordered = dict(reversed(list(copy.deepcopy(dk).items())))
        resp = await self.upload(alice, {"device_keys": reordered})
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json, {"one_time_key_counts": {ALG: 0}})
        self.assertEqual(await self.device_key_ts(alice), 1_000_000)
        self.assertEqual(self.host.changed_users, [alice.user_id])
        self.assertEqual(
            await self.query_devices(alice), {alice.device_id: {**dk, "unsigned": {}}}
        )

    # --- one-time keys -----------------------------------------------------------

    async def test_one_time_keys_string_and_object_are_counted(self) -> None:
        """A legacy string OTK and a signed key object are both stored and counted."""
        alice = await self.user_with_device("alice", "ADEV")
        legacy = public_key(generate_signing_key("l"))
        resp = await self.upload(
            alice,
            {
                "one_time_keys": {
                    "my_algorithm:my_id_1": legacy,
                    f"{ALG}:AAAAAQ": signed_key(alice),
                    f"{ALG}:AAAAAg": signed_key(alice),
                }
            },
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(
            resp.json, {"one_time_key_counts": {"my_algorithm": 1, ALG: 2}}
        )
        rows = {(a, k) for a, k, _ in await self.otk_rows(alice)}
        self.assertEqual(
            rows, {("my_algorithm", "my_id_1"), (ALG, "AAAAAQ"), (ALG, "AAAAAg")}
        )

    async def test_key_name_without_exactly_one_colon_is_rejected(self) -> None:
        """one_time_keys/fallback_keys names need exactly one ':' (else M_BAD_JSON)."""
        alice = await self.user_with_device("alice", "ADEV")
        for field in ("one_time_keys", "fallback_keys"):
            for name in (f"{ALG}AAAA", f"{ALG}:AA:AA", "a:b:c:d"):
                key = signed_key(alice, fallback=field == "fallback_keys")
                resp = await self.upload(alice, {field: {name: key}})
                self.assert_error(resp)
                self.assertIn(name, resp.json["error"])
        self.assertEqual(await self.otk_rows(alice), [])
        self.assertEqual(await self.fallback_rows(alice), [])

    async def test_malformed_key_object_is_rejected_and_named(self) -> None:
        """A key object with a bad ``key``, ``signatures`` or ``fallback`` is
        M_BAD_JSON naming the field; nothing of the request is stored."""
        alice = await self.user_with_device("alice", "ADEV")
        good = signed_key(alice)
        sigs = good["signatures"]
        bad_shapes = [
            ({"signatures": sigs}, ".key"),
            ({"key": 5, "signatures": sigs}, ".key"),
            ({"key": "k", "signatures": []}, ".signatures"),
            ({"key": "k", "signatures": {alice.user_id: "s"}}, ".signatures"),
            ({"key": "k", "signatures": {alice.user_id: {"ed25519:X": 1}}}, ".sig"),
            ({"key": "k", "fallback": "yes"}, ".fallback"),
        ]
        for field in ("one_time_keys", "fallback_keys"):
            for shape, named in bad_shapes:
                body = {field: {f"{ALG}:GOOD": good, f"{ALG}:BAD": shape}}
                resp = await self.upload(alice, body)
                self.assert_error(resp)
                self.assertIn(f"{field}.{ALG}:BAD{named}", resp.json["error"])
        self.assertEqual(await self.otk_rows(alice), [])
        self.assertEqual(await self.fallback_rows(alice), [])

        # The optional members may be absent, and a key may be a plain string.
        resp = await self.upload(
            alice,
            {"one_time_keys": {f"{ALG}:A": {"key": "k"}, "curve25519:B": "k2"}},
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(len(await self.otk_rows(alice)), 2)

    async def test_same_one_time_key_again_is_not_counted_twice(self) -> None:
        """Same id + same content (or only another signature) is 200 and counted once."""
        alice = await self.user_with_device("alice", "ADEV")
        key = signed_key(alice)
        legacy = public_key(generate_signing_key("l"))
        body = {"one_time_keys": {f"{ALG}:AAAA": key, "legacy:L1": legacy}}
        resp = await self.upload(alice, body)
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["one_time_key_counts"], {ALG: 1, "legacy": 1})

        resp = await self.upload(alice, copy.deepcopy(body))
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["one_time_key_counts"], {ALG: 1, "legacy": 1})

        resigned = {k: v for k, v in key.items() if k != "signatures"}
        resigned = sign_json(resigned, alice.user_id, generate_signing_key("other"))
        self.assertNotEqual(resigned["signatures"], key["signatures"])
        resp = await self.upload(alice, {"one_time_keys": {f"{ALG}:AAAA": resigned}})
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["one_time_key_counts"], {ALG: 1, "legacy": 1})
        self.assertEqual(len(await self.otk_rows(alice)), 2)

    async def test_same_one_time_key_id_with_other_content_rejects_whole_request(
        self,
    ) -> None:
        """A known OTK id with new content -> 400 naming it; nothing of the body is kept."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.upload(
            alice, {"one_time_keys": {f"{ALG}:AAAA": signed_key(alice)}}
        )
        self.assertEqual(resp.code, 200, resp)
        before = await self.otk_rows(alice)
        changed_before = list(self.host.changed_users)

        resp = await self.upload(
            alice,
            {
                "device_keys": alice.device_keys(),
                "one_time_keys": {
                    f"{ALG}:AAAB": signed_key(alice),  # new, valid
                    f"{ALG}:AAAA": signed_key(alice),  # known id, other key
                },
                "fallback_keys": {f"{ALG}:FFFF": signed_key(alice, fallback=True)},
            },
        )
        self.assert_error(resp, errcode=None)
        self.assertIn(f"{ALG}:AAAA", resp.json["error"])
        self.assertEqual(await self.otk_rows(alice), before)
        self.assertEqual(await self.fallback_rows(alice), [])
        self.assertEqual(await self.query_devices(alice), {})
        self.assertEqual(self.host.changed_users, changed_before)

        # A legacy string key with other content is refused the same way.
        resp = await self.upload(alice, {"one_time_keys": {"legacy:L": "AAAA"}})
        self.assertEqual(resp.code, 200, resp)
        resp = await self.upload(alice, {"one_time_keys": {"legacy:L": "BBBB"}})
        self.assert_error(resp, errcode=None)
        self.assertIn("legacy:L", resp.json["error"])

    async def test_concurrent_identical_uploads_all_succeed(self) -> None:
        """The same body sent many times at once (client retries) is 200 every time."""
        alice = await self.user_with_device("alice", "ADEV")
        body = {
            "device_keys": alice.device_keys(),
            "one_time_keys": {f"{ALG}:K{i}": signed_key(alice) for i in range(5)},
            "fallback_keys": {f"{ALG}:FB": signed_key(alice, fallback=True)},
        }
        responses: list[Response] = await defer.gatherResults(
            [defer.ensureDeferred(self.upload(alice, body)) for _ in range(12)]
        )
        for resp in responses:
            self.assertEqual(resp.code, 200, resp)
            self.assertEqual(resp.json, {"one_time_key_counts": {ALG: 5}})
        self.assertEqual(len(await self.otk_rows(alice)), 5)
        self.assertEqual(await self.fallback_rows(alice), [(ALG, "FB", False)])
        self.assertEqual(
            await self.query_devices(alice),
            {alice.device_id: {**body["device_keys"], "unsigned": {}}},
        )

    # --- fallback keys -------------------------------------------------------------

    async def test_two_fallback_keys_for_one_algorithm_are_rejected(self) -> None:
        """Two fallback keys of the same algorithm in one upload -> 400, none stored."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.upload(
            alice,
            {
                "fallback_keys": {
                    f"{ALG}:F1": signed_key(alice, fallback=True),
                    f"{ALG}:F2": signed_key(alice, fallback=True),
                }
            },
        )
        self.assert_error(resp, errcode=None)
        self.assertEqual(await self.fallback_rows(alice), [])

    async def test_new_fallback_key_replaces_old_and_is_unused(self) -> None:
        """A different fallback key replaces the (used) old one and starts unused."""
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        old = signed_key(alice, fallback=True)
        resp = await self.upload(alice, {"fallback_keys": {f"{ALG}:OLD": old}})
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(await self.claim(bob, alice), {f"{ALG}:OLD": old})
        self.assertEqual(await self.fallback_rows(alice), [(ALG, "OLD", True)])

        new = signed_key(alice, fallback=True)
        resp = await self.upload(alice, {"fallback_keys": {f"{ALG}:NEW": new}})
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(await self.fallback_rows(alice), [(ALG, "NEW", False)])
        self.assertEqual(await self.claim(bob, alice), {f"{ALG}:NEW": new})
        self.assertEqual(await self.fallback_rows(alice), [(ALG, "NEW", True)])

    async def test_identical_fallback_reupload_keeps_used_state(self) -> None:
        """Re-uploading the identical fallback key leaves it used and still claimable."""
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        fb = signed_key(alice, fallback=True)
        resp = await self.upload(alice, {"fallback_keys": {f"{ALG}:FB": fb}})
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(await self.fallback_rows(alice), [(ALG, "FB", False)])
        self.assertEqual(await self.claim(bob, alice), {f"{ALG}:FB": fb})
        self.assertEqual(await self.fallback_rows(alice), [(ALG, "FB", True)])

        resp = await self.upload(
            alice, {"fallback_keys": {f"{ALG}:FB": copy.deepcopy(fb)}}
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(await self.fallback_rows(alice), [(ALG, "FB", True)])
        self.assertEqual(await self.claim(bob, alice), {f"{ALG}:FB": fb})
        self.assertEqual(await self.fallback_rows(alice), [(ALG, "FB", True)])

    # --- response and prefixes -----------------------------------------------------

    async def test_one_time_key_counts_always_list_signed_curve25519(self) -> None:
        """one_time_key_counts is always there and has signed_curve25519 (0 if none)."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.upload(alice, {})
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json, {"one_time_key_counts": {ALG: 0}})

        resp = await self.upload(alice, {"device_keys": alice.device_keys()})
        self.assertEqual(resp.json, {"one_time_key_counts": {ALG: 0}})

        resp = await self.upload(alice, {"one_time_keys": {"other_alg:X1": "AAAA"}})
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json, {"one_time_key_counts": {"other_alg": 1, ALG: 0}})

        keys = {f"{ALG}:K{i}": signed_key(alice) for i in range(3)}
        resp = await self.upload(alice, {"one_time_keys": keys})
        self.assertEqual(resp.json, {"one_time_key_counts": {"other_alg": 1, ALG: 3}})

        # Fallback keys are not one-time keys.
        resp = await self.upload(
            alice, {"fallback_keys": {"fb_alg:F": signed_key(alice, fallback=True)}}
        )
        self.assertEqual(resp.json, {"one_time_key_counts": {"other_alg": 1, ALG: 3}})

    async def test_all_version_prefixes_are_served(self) -> None:
        """r0, v3 and unstable all accept uploads and share one store."""
        alice = await self.user_with_device("alice", "ADEV")
        dk = alice.device_keys()
        for n, version in enumerate(("r0", "v3", "unstable"), start=1):
            resp = await self.upload(
                alice,
                {
                    "device_keys": dk,
                    "one_time_keys": {f"{ALG}:{version}": signed_key(alice)},
                },
                version=version,
            )
            self.assertEqual(resp.code, 200, (version, resp))
            self.assertEqual(resp.json, {"one_time_key_counts": {ALG: n}}, version)
            bad = await self.upload(alice, {"device_keys": []}, version=version)
            self.assert_error(bad)
        self.assertEqual(
            await self.query_devices(alice), {alice.device_id: {**dk, "unsigned": {}}}
        )


class ClientUnsignedTest(HostTestCase):
    """The server owns ``unsigned`` on device keys."""

    async def test_client_unsigned_is_replaced(self) -> None:
        """An ``unsigned`` sent by the client is not kept: the server's is served."""
        alice = await self.user_with_device("alice", "ADEV")
        dk = {**alice.device_keys(), "unsigned": {"device_display_name": "spoofed"}}
        resp = await self.client.post(
            "/_matrix/client/v3/keys/upload", {"device_keys": dk}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        resp = await self.client.post(
            "/_matrix/client/v3/keys/query",
            {"device_keys": {alice.user_id: []}},
            token=alice.token,
        )
        device = resp.json["device_keys"][alice.user_id]["ADEV"]
        self.assertEqual(device, {**alice.device_keys(), "unsigned": {}})


class OneTimeKeyCapTest(HostTestCase):
    """A device keeps a bounded number of unclaimed one-time keys."""

    async def test_oldest_dropped_over_the_cap(self) -> None:
        """Over the cap, the oldest keys go; claims still start from the oldest kept."""
        from synapse_xsign_module.storage import device_keys as store

        self.patch(store, "MAX_UNCLAIMED_PER_ALGORITHM", 5)
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        for start in (0, 4):
            otks = {
                f"signed_curve25519:K{i}": {"key": f"k{i}"}
                for i in range(start, start + 4)
            }
            resp = await self.client.post(
                "/_matrix/client/v3/keys/upload",
                {"one_time_keys": otks},
                token=alice.token,
            )
            self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["one_time_key_counts"]["signed_curve25519"], 5)
        resp = await self.client.post(
            "/_matrix/client/v3/keys/claim",
            {"one_time_keys": {alice.user_id: {"ADEV": "signed_curve25519"}}},
            token=bob.token,
        )
        self.assertEqual(
            list(resp.json["one_time_keys"][alice.user_id]["ADEV"]),
            ["signed_curve25519:K3"],
        )

    async def test_claim_during_upload_does_not_cost_a_key(self) -> None:
        """A claim committed while an upload runs is seen before trimming: the
        upload deletes no key when the device is back under the cap."""
        if not self.db_url.startswith("postgresql"):
            raise unittest.SkipTest(
                "SQLite writers are serial: no claim can interleave"
            )
        from synapse_xsign_module.storage import device_keys as store

        self.patch(store, "MAX_UNCLAIMED_PER_ALGORITHM", 5)
        alice = await self.user_with_device("alice", "ADEV")
        alg = "signed_curve25519"
        first = {f"{alg}:K{i}": {"key": f"k{i}"} for i in range(5)}
        resp = await self.client.post(
            "/_matrix/client/v3/keys/upload",
            {"one_time_keys": first},
            token=alice.token,
        )
        self.assertEqual(resp.json["one_time_key_counts"][alg], 5)

        real_insert_many = store.insert_many

        def insert_then_claim(conn: Connection, *args: Any) -> None:
            real_insert_many(conn, *args)
            # Another transaction claims (and commits) one of the stored keys
            # while the upload's transaction is still open.
            with self.db.engine.begin() as other:
                claimed = store.claim_txn(other, [(alice.user_id, "ADEV", alg)])
            self.assertEqual(list(claimed[alice.user_id]["ADEV"]), [f"{alg}:K0"])

        self.patch(store, "insert_many", insert_then_claim)
        resp = await self.client.post(
            "/_matrix/client/v3/keys/upload",
            {"one_time_keys": {f"{alg}:K5": {"key": "k5"}}},
            token=alice.token,
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["one_time_key_counts"][alg], 5)
        with self.db.engine.connect() as conn:
            c = one_time_keys.c
            rows = conn.execute(
                select(c.key_id).where(c.user_id == alice.user_id).order_by(c.key_id)
            ).scalars()
            self.assertEqual(list(rows), ["K1", "K2", "K3", "K4", "K5"])


class UploadLockTest(HostTestCase):
    """On PostgreSQL an upload takes the user's lock shared and its device's
    exclusively: uploads of other devices of the user go on, uploads of the
    same device and the user's key changes wait."""

    def setUp(self) -> None:
        super().setUp()
        if not self.db_url.startswith("postgresql"):
            raise unittest.SkipTest("SQLite writers are serial anyway")

    async def two_devices(self) -> tuple[TestUser, TestUser]:
        alice = await self.user_with_device("alice", "ADEV")
        token, _ = await self.login(alice.user_id, "BDEV")
        return alice, TestUser(alice.user_id, "BDEV", token)

    def holding(self, lock: Any) -> Any:
        """An open transaction of another connection that holds ``lock``."""
        return hold_in_other_transaction(self, self.db.engine, lock)

    async def upload(self, user: TestUser) -> Any:
        return await self.client.post(
            "/_matrix/client/v3/keys/upload",
            {"device_keys": user.device_keys()},
            token=user.token,
        )

    async def waits_then_completes(self, user: TestUser, tx: Any) -> None:
        """The upload waits on an advisory lock until ``tx`` ends."""
        pending = defer.ensureDeferred(self.upload(user))
        resp = await result_once_released(self, self.db.engine, pending, tx)
        self.assertEqual(resp.code, 200, resp)

    async def test_other_devices_of_the_user_go_on(self) -> None:
        a, b = await self.two_devices()
        tx = self.holding(lambda c: lock_device(c, a.user_id, a.device_id))
        # Does not wait for ADEV's upload (which holds its locks until the end).
        resp = await defer.ensureDeferred(self.upload(b)).addTimeout(20, reactor)
        self.assertEqual(resp.code, 200, resp)
        await self.waits_then_completes(a, tx)

    async def test_upload_waits_for_a_key_change_of_the_user(self) -> None:
        a, _ = await self.two_devices()
        tx = self.holding(lambda c: lock_users(c, [a.user_id]))
        await self.waits_then_completes(a, tx)

    async def test_version_raised_last(self) -> None:
        """The user's version row, which uploads of all the user's devices
        raise, is locked by the last statement before the commit."""
        from synapse_xsign_module.storage import device_keys as store

        calls: list[str] = []
        for name in ("bump_txn", "insert_many", "upsert"):
            real = getattr(store, name)

            def record(*args: Any, _real: Any = real, _name: str = name) -> Any:
                calls.append(_name)
                return _real(*args)

            self.patch(store, name, record)
        a, _ = await self.two_devices()
        resp = await self.client.post(
            "/_matrix/client/v3/keys/upload",
            {"device_keys": a.device_keys(), "one_time_keys": {f"{ALG}:K1": "k"}},
            token=a.token,
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(calls, ["upsert", "insert_many", "bump_txn"])

    async def test_key_change_waits_for_an_upload(self) -> None:
        """A transaction taking the user's lock (a signature store, a new
        cross-signing key) waits while an upload of any device runs."""
        a, _ = await self.two_devices()
        tx = self.holding(lambda c: lock_device(c, a.user_id, "BDEV"))

        def key_change(conn: Connection) -> None:
            lock_users(conn, [a.user_id])

        pending = self.db.run("key change", key_change)
        await result_once_released(self, self.db.engine, pending, tx)
