"""POST /keys/signatures/upload and how /keys/query serves the signatures."""

from __future__ import annotations

import copy
import multiprocessing
from typing import Any

from signedjson.key import generate_signing_key
from signedjson.sign import sign_json
from sqlalchemy import event, func, select

from twisted.internet import defer, reactor
from twisted.trial import unittest

from synapse_xsign_module.handlers import signatures as handler_signatures
from synapse_xsign_module.storage import signatures as storage_signatures
from synapse_xsign_module.storage.schema import device_keys, signatures
from synapse_xsign_module.storage.util import lock_device, lock_users
from tests.test_cross_signing import CrossSigningTestBase
from tests.utils import (
    TestUser,
    expected_signed_hash,
    hold_in_other_transaction,
    make_device_keys,
    public_key,
    result_once_released,
)

SIG_UPLOAD = "/_matrix/client/v3/keys/signatures/upload"
KEYS_UPLOAD = "/_matrix/client/v3/keys/upload"


def without_unsigned(obj: dict[str, Any]) -> dict[str, Any]:
    """A key object as a client would sign it (no ``unsigned``)."""
    return {k: v for k, v in obj.items() if k != "unsigned"}


def sig_of(obj: dict[str, Any], user_id: str, key_id: str) -> str | None:
    """The signature by ``user_id``'s ``key_id`` in ``obj``, if any."""
    value = obj.get("signatures", {}).get(user_id, {}).get(key_id)
    return value if isinstance(value, str) else None


class SignatureTestBase(CrossSigningTestBase):
    """Users with device keys and cross-signing keys."""

    async def ready_user(self, name: str) -> TestUser:
        """A user with uploaded device keys and a full cross-signing identity."""
        user = await self.user_with_device(name, f"{name.upper()}DEV")
        resp = await self.client.post(
            KEYS_UPLOAD, {"device_keys": user.device_keys()}, token=user.token
        )
        self.assertEqual(resp.code, 200, resp)
        await self.bootstrap(user)
        return user

    async def sign_upload(self, user: TestUser, body: dict[str, Any]) -> dict[str, Any]:
        """Upload signatures; asserts 200 and returns the failures map."""
        resp = await self.client.post(SIG_UPLOAD, body, token=user.token)
        self.assertEqual(resp.code, 200, resp)
        failures: dict[str, Any] = resp.json["failures"]
        return failures

    def ssk_signed_device(
        self, user: TestUser, device: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The user's device keys signed by the user's SSK."""
        return sign_json(
            copy.deepcopy(device or user.device_keys()), user.user_id, user.self_signing
        )

    def master_obj(self, user: TestUser) -> dict[str, Any]:
        """The user's master key object as uploaded."""
        from tests.utils import cross_signing_key

        return cross_signing_key(user.user_id, "master", user.master)

    async def sign_device_and_master(self, user: TestUser) -> dict[str, Any]:
        """The SSK signs the device and the device signs the master key.

        Returns:
            The master key object carrying the device's signature.
        """
        await self.sign_upload(
            user, {user.user_id: {user.device_id: self.ssk_signed_device(user)}}
        )
        master = sign_json(self.master_obj(user), user.user_id, user.device_key)
        await self.sign_upload(user, {user.user_id: {public_key(user.master): master}})
        self.assertEqual(self.signature_rows(), 2)
        return master

    async def usk_sign_master(self, signer: TestUser, target: TestUser) -> str:
        """``signer``'s user-signing key signs ``target``'s master key; asserts
        it was stored and returns the signing key's id."""
        master = sign_json(self.master_obj(target), signer.user_id, signer.user_signing)
        failures = await self.sign_upload(
            signer, {target.user_id: {public_key(target.master): master}}
        )
        self.assertEqual(failures, {})
        return f"ed25519:{public_key(signer.user_signing)}"

    def record_calls(self, owner: Any, name: str) -> list[tuple[Any, ...]]:
        """The arguments of every call of ``owner.<name>`` from now on (the
        real one still runs), as they happen."""
        calls: list[tuple[Any, ...]] = []
        real = getattr(owner, name)

        def recording(*args: Any) -> Any:
            calls.append(args)
            return real(*args)

        self.patch(owner, name, recording)
        return calls

    async def assert_reported_different(
        self, user: TestUser, uploaded: dict[str, Any]
    ) -> None:
        """The user's device keys ``uploaded``, signed by the SSK over their own
        bytes, are refused as not matching the stored keys; nothing stored."""
        failures = await self.sign_upload(
            user,
            {user.user_id: {user.device_id: self.ssk_signed_device(user, uploaded)}},
        )
        failure = failures[user.user_id][user.device_id]
        self.assertEqual(failure["errcode"], "M_INVALID_PARAM")
        self.assertIn("does not match", failure["error"])
        self.assertEqual(self.signature_rows(), 0)

    def signature_rows(self) -> int:
        """How many signatures are stored."""
        with self.db.engine.connect() as conn:
            return int(
                conn.execute(select(func.count()).select_from(signatures)).scalar_one()
            )


class AcceptedKindsTest(SignatureTestBase):
    """The three accepted kinds of signature, and who sees each."""

    async def test_ssk_over_own_device(self) -> None:
        """An SSK signature on one's device is stored and visible to everyone."""
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        signed = self.ssk_signed_device(alice)
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: signed}}
        )
        self.assertEqual(failures, {})
        ssk_id = f"ed25519:{public_key(alice.self_signing)}"
        for viewer in (alice, bob):
            result = await self.query(viewer, alice.user_id)
            device = result["device_keys"][alice.user_id][alice.device_id]
            self.assertEqual(
                sig_of(device, alice.user_id, ssk_id),
                sig_of(signed, alice.user_id, ssk_id),
            )
            # The device's own signature is still there.
            self.assertEqual(
                sig_of(device, alice.user_id, f"ed25519:{alice.device_id}"),
                sig_of(signed, alice.user_id, f"ed25519:{alice.device_id}"),
            )

    async def test_device_over_own_master(self) -> None:
        """A device's signature on its user's master key is visible to everyone."""
        alice = await self.ready_user("alice")
        carol = await self.ready_user("carol")
        master = sign_json(self.master_obj(alice), alice.user_id, alice.device_key)
        pub = public_key(alice.master)
        failures = await self.sign_upload(alice, {alice.user_id: {pub: master}})
        self.assertEqual(failures, {})
        key_id = f"ed25519:{alice.device_id}"
        for viewer in (alice, carol):
            result = await self.query(viewer, alice.user_id)
            got = result["master_keys"][alice.user_id]
            self.assertEqual(
                sig_of(got, alice.user_id, key_id),
                sig_of(master, alice.user_id, key_id),
            )

    async def test_only_devices_an_upload_may_involve_are_read(self) -> None:
        """An upload reads the devices it signs, and the signers of an object
        presented as a master key; not every key id in every signature."""
        alice = await self.ready_user("alice")
        reads = self.record_calls(storage_signatures, "send_signable_devices")
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: self.ssk_signed_device(alice)}}
        )
        self.assertEqual(failures, {})
        self.assertEqual(
            [args[1:] for args in reads], [(alice.user_id, [alice.device_id])]
        )
        reads.clear()
        master = sign_json(self.master_obj(alice), alice.user_id, alice.device_key)
        pub = public_key(alice.master)
        self.assertEqual(
            await self.sign_upload(alice, {alice.user_id: {pub: master}}), {}
        )
        self.assertEqual(
            [args[1:] for args in reads],
            [(alice.user_id, sorted([pub, alice.device_id]))],
        )

    async def test_master_without_its_usage_does_not_match(self) -> None:
        """An object under the master key's id whose usage lacks "master" is
        not the stored master key, whoever signs it."""
        alice = await self.ready_user("alice")
        pub = public_key(alice.master)
        for usage in ([], ["self_signing"], "master", None):
            obj = {**self.master_obj(alice), "usage": usage}
            if usage is None:
                del obj["usage"]
            signed = sign_json(obj, alice.user_id, alice.device_key)
            failures = await self.sign_upload(alice, {alice.user_id: {pub: signed}})
            failure = failures[alice.user_id][pub]
            self.assertEqual(failure["errcode"], "M_INVALID_PARAM", usage)
            self.assertIn("does not match the stored master key", failure["error"])
        self.assertEqual(self.signature_rows(), 0)

    async def test_usk_over_other_master_visible_to_signer_only(self) -> None:
        """Alice's USK signature on Bob's master is seen by Alice, not Bob or Carol."""
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        carol = await self.ready_user("carol")
        bob_master = sign_json(self.master_obj(bob), alice.user_id, alice.user_signing)
        failures = await self.sign_upload(
            alice, {bob.user_id: {public_key(bob.master): bob_master}}
        )
        self.assertEqual(failures, {})
        usk_id = f"ed25519:{public_key(alice.user_signing)}"
        seen = (await self.query(alice, bob.user_id))["master_keys"][bob.user_id]
        self.assertEqual(
            sig_of(seen, alice.user_id, usk_id),
            sig_of(bob_master, alice.user_id, usk_id),
        )
        for viewer in (bob, carol):
            result = await self.query(viewer, bob.user_id, alice.user_id)
            self.assertIsNone(
                sig_of(result["master_keys"][bob.user_id], alice.user_id, usk_id)
            )
            self.assertNotIn(
                alice.user_id, result["master_keys"][bob.user_id].get("signatures", {})
            )
            self.assertEqual(result["user_signing_keys"].get(alice.user_id), None)


class FailureKindsTest(SignatureTestBase):
    """Each kind of failure is reported per item; the rest is stored."""

    async def test_mixed_batch(self) -> None:
        """One request with good and bad items stores the good ones only."""
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        good_device = self.ssk_signed_device(alice)
        bad_sig = copy.deepcopy(good_device)
        ssk_id = f"ed25519:{public_key(alice.self_signing)}"
        bad_sig["signatures"][alice.user_id][ssk_id] = sign_json(
            {"other": 1}, alice.user_id, alice.self_signing
        )["signatures"][alice.user_id][ssk_id]
        mismatched = sign_json(
            {**self.master_obj(bob), "extra": True}, alice.user_id, alice.user_signing
        )
        body = {
            alice.user_id: {
                alice.device_id: good_device,
                "NOSUCHDEVICE": self.ssk_signed_device(
                    alice,
                    make_device_keys(
                        alice.user_id,
                        "NOSUCHDEVICE",
                        generate_signing_key("NOSUCHDEVICE"),
                    ),
                ),
            },
            bob.user_id: {public_key(bob.master): mismatched},
            "@nobody:test.local": {"AAAA": {"a": 1}},
        }
        failures = await self.sign_upload(alice, body)
        self.assertEqual(
            failures[alice.user_id]["NOSUCHDEVICE"]["errcode"], "M_NOT_FOUND"
        )
        self.assertIn("NOSUCHDEVICE", failures[alice.user_id]["NOSUCHDEVICE"]["error"])
        self.assertNotIn(alice.device_id, failures.get(alice.user_id, {}))
        self.assertIn(
            "does not match", failures[bob.user_id][public_key(bob.master)]["error"]
        )
        self.assertEqual(
            failures["@nobody:test.local"]["AAAA"]["errcode"], "M_NOT_FOUND"
        )
        self.assertEqual(self.signature_rows(), 1)
        # Now the invalid signature on its own.
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: bad_sig}}
        )
        self.assertEqual(
            failures[alice.user_id][alice.device_id]["errcode"], "M_INVALID_SIGNATURE"
        )
        result = await self.query(alice, alice.user_id)
        device = result["device_keys"][alice.user_id][alice.device_id]
        self.assertEqual(
            sig_of(device, alice.user_id, ssk_id),
            sig_of(good_device, alice.user_id, ssk_id),
        )

    async def test_no_ssk(self) -> None:
        """Without an SSK, a device item fails M_NOT_FOUND naming the SSK."""
        alice = await self.user_with_device("alice", "ALICEDEV")
        await self.client.post(
            KEYS_UPLOAD, {"device_keys": alice.device_keys()}, token=alice.token
        )
        body = alice.make_cross_signing()
        del body["self_signing_key"]
        await self.upload(alice, body)
        signed = sign_json(alice.device_keys(), alice.user_id, alice.self_signing)
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: signed}}
        )
        item = failures[alice.user_id][alice.device_id]
        self.assertEqual(item["errcode"], "M_NOT_FOUND")
        self.assertIn("self-signing", item["error"])

    async def test_no_usk(self) -> None:
        """Without a USK, signing another user fails M_NOT_FOUND naming the USK."""
        alice = await self.user_with_device("alice")
        bob = await self.ready_user("bob")
        body = alice.make_cross_signing()
        del body["user_signing_key"]
        await self.upload(alice, body)
        signed = sign_json(self.master_obj(bob), alice.user_id, alice.user_signing)
        failures = await self.sign_upload(
            alice, {bob.user_id: {public_key(bob.master): signed}}
        )
        item = failures[bob.user_id][public_key(bob.master)]
        self.assertEqual(item["errcode"], "M_NOT_FOUND")
        self.assertIn("user-signing", item["error"])

    async def test_only_current_master_can_be_signed(self) -> None:
        """Signing another user's non-master key id is M_NOT_FOUND."""
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        signed = sign_json(self.master_obj(bob), alice.user_id, alice.user_signing)
        failures = await self.sign_upload(alice, {bob.user_id: {bob.device_id: signed}})
        self.assertEqual(failures[bob.user_id][bob.device_id]["errcode"], "M_NOT_FOUND")

    async def test_device_signature_missing_ssk_signature(self) -> None:
        """A device object without a signature by the SSK is M_INVALID_SIGNATURE."""
        alice = await self.ready_user("alice")
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: alice.device_keys()}}
        )
        self.assertEqual(
            failures[alice.user_id][alice.device_id]["errcode"], "M_INVALID_SIGNATURE"
        )
        self.assertEqual(self.signature_rows(), 0)

    async def test_master_signed_by_unknown_key_only(self) -> None:
        """A master object signed by no device of the caller fails, storing nothing."""
        alice = await self.ready_user("alice")
        master = sign_json(
            self.master_obj(alice), alice.user_id, generate_signing_key("OTHER")
        )
        failures = await self.sign_upload(
            alice, {alice.user_id: {public_key(alice.master): master}}
        )
        self.assertEqual(
            failures[alice.user_id][public_key(alice.master)]["errcode"],
            "M_INVALID_SIGNATURE",
        )
        self.assertEqual(self.signature_rows(), 0)

    async def test_foreign_signatures_not_stored(self) -> None:
        """Signatures in the object by keys the caller does not hold are not stored."""
        alice = await self.ready_user("alice")
        mallory_key = generate_signing_key("MAL")
        master = sign_json(self.master_obj(alice), alice.user_id, alice.device_key)
        master = sign_json(master, "@mallory:test.local", mallory_key)
        failures = await self.sign_upload(
            alice, {alice.user_id: {public_key(alice.master): master}}
        )
        self.assertEqual(failures, {})
        got = (await self.query(alice, alice.user_id))["master_keys"][alice.user_id]
        self.assertNotIn("@mallory:test.local", got.get("signatures", {}))
        self.assertEqual(self.signature_rows(), 1)

    async def test_bad_shape(self) -> None:
        """A body that is not user -> key id -> object is 400 M_BAD_JSON."""
        alice = await self.ready_user("alice")
        for body in (
            {alice.user_id: "x"},
            {alice.user_id: {"DEV": "x"}},
            {alice.user_id: []},
        ):
            resp = await self.client.post(SIG_UPLOAD, body, token=alice.token)
            self.assertEqual((resp.code, resp.json["errcode"]), (400, "M_BAD_JSON"))
        self.assertEqual(self.signature_rows(), 0)

    async def test_unauthenticated(self) -> None:
        """The endpoint needs an access token, under r0, v3 and unstable."""
        for version in ("r0", "v3", "unstable"):
            resp = await self.client.post(
                f"/_matrix/client/{version}/keys/signatures/upload", {}
            )
            self.assertEqual(
                (resp.code, resp.json["errcode"]), (401, "M_MISSING_TOKEN")
            )


class LifecycleTest(SignatureTestBase):
    """Re-signing, rotations and device changes."""

    async def test_resigning_replaces(self) -> None:
        """Signing the same device again with the same key replaces the signature."""
        alice = await self.ready_user("alice")
        first = self.ssk_signed_device(alice)
        await self.sign_upload(alice, {alice.user_id: {alice.device_id: first}})
        # ed25519 signatures are deterministic, so the same key over the same
        # object cannot give a second valid signature: corrupt the stored one
        # and show that uploading again replaces it (it is not discarded).
        with self.db.engine.begin() as conn:
            conn.execute(signatures.update().values(signature="broken"))
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: first}}
        )
        self.assertEqual(failures, {})
        ssk_id = f"ed25519:{public_key(alice.self_signing)}"
        device = (await self.query(alice, alice.user_id))["device_keys"][alice.user_id][
            alice.device_id
        ]
        self.assertEqual(
            sig_of(device, alice.user_id, ssk_id), sig_of(first, alice.user_id, ssk_id)
        )
        self.assertEqual(self.signature_rows(), 1)

    async def test_identical_signature_is_not_verified_again(self) -> None:
        """Re-uploading the stored signature succeeds without another check; a
        different signature under the same key id is still checked."""
        from synapse_xsign_module.handlers import verification as handler_module

        alice = await self.ready_user("alice")
        checked = self.record_calls(handler_module, "verify_signature")
        signed = self.ssk_signed_device(alice)
        body = {alice.user_id: {alice.device_id: signed}}
        self.assertEqual(await self.sign_upload(alice, body), {})
        self.assertEqual(len(checked), 1)
        self.assertEqual(await self.sign_upload(alice, body), {})
        self.assertEqual(len(checked), 1)  # already stored: not checked again
        ssk_id = f"ed25519:{public_key(alice.self_signing)}"
        forged = copy.deepcopy(signed)
        forged["signatures"][alice.user_id][ssk_id] = "A" * 86
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: forged}}
        )
        self.assertEqual(len(checked), 2)
        self.assertEqual(
            failures[alice.user_id][alice.device_id]["errcode"], "M_INVALID_SIGNATURE"
        )
        device = (await self.query(alice, alice.user_id))["device_keys"][alice.user_id][
            alice.device_id
        ]
        self.assertEqual(
            sig_of(device, alice.user_id, ssk_id), sig_of(signed, alice.user_id, ssk_id)
        )

    async def test_ssk_rotation_hides_old_device_signatures(self) -> None:
        """After a new SSK, signatures by the old SSK are no longer served."""
        alice = await self.ready_user("alice")
        old_ssk_id = f"ed25519:{public_key(alice.self_signing)}"
        await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: self.ssk_signed_device(alice)}}
        )
        from tests.utils import cross_signing_key, new_signing_key

        alice.self_signing = new_signing_key()
        ssk = cross_signing_key(
            alice.user_id, "self_signing", alice.self_signing, alice.master
        )
        resp = await self.replace_with_uia(alice, {"self_signing_key": ssk})
        self.assertEqual(resp.code, 200, resp)
        device = (await self.query(alice, alice.user_id))["device_keys"][alice.user_id][
            alice.device_id
        ]
        self.assertIsNone(sig_of(device, alice.user_id, old_ssk_id))
        self.assertEqual(self.signature_rows(), 0)
        # The new SSK can sign it again.
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: self.ssk_signed_device(alice)}}
        )
        self.assertEqual(failures, {})

    async def test_master_replacement_hides_usk_signatures(self) -> None:
        """Signatures over a replaced master key are no longer served."""
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        old_master = self.master_obj(bob)
        signed = sign_json(old_master, alice.user_id, alice.user_signing)
        await self.sign_upload(alice, {bob.user_id: {public_key(bob.master): signed}})
        self.assertEqual(self.signature_rows(), 1)
        await self.replace_with_uia(bob, bob.make_cross_signing())
        seen = (await self.query(alice, bob.user_id))["master_keys"][bob.user_id]
        self.assertNotIn(alice.user_id, seen.get("signatures", {}))
        self.assertEqual(self.signature_rows(), 0)

    async def _device_with_number(self, user: TestUser) -> dict[str, Any]:
        """Re-uploads the user's device keys with an extra ``"level": 1``."""
        keys = {k: v for k, v in user.device_keys().items() if k != "signatures"}
        keys["level"] = 1
        keys = sign_json(keys, user.user_id, user.device_key)
        resp = await self.client.post(
            KEYS_UPLOAD, {"device_keys": keys}, token=user.token
        )
        self.assertEqual(resp.code, 200, resp)
        return keys

    async def test_loosely_equal_object_is_reported_as_different(self) -> None:
        """An object equal to the stored device keys only as parsed JSON
        (``true`` for ``1``), signed over its own bytes, is reported as not
        matching the stored keys, not as a bad signature."""
        alice = await self.ready_user("alice")
        stored = await self._device_with_number(alice)
        await self.assert_reported_different(
            alice, {**copy.deepcopy(stored), "level": True}
        )

    async def test_signature_is_checked_over_the_stored_bytes(self) -> None:
        """What is verified, and stored, is a signature over the stored key: one
        over the stored bytes holds even if the object sent spells a number
        differently, and the stored device keys are served unchanged with it."""
        alice = await self.ready_user("alice")
        stored = await self._device_with_number(alice)
        ssk_id = f"ed25519:{public_key(alice.self_signing)}"
        signature = sig_of(self.ssk_signed_device(alice, stored), alice.user_id, ssk_id)
        uploaded = {**copy.deepcopy(stored), "level": True}
        uploaded["signatures"][alice.user_id][ssk_id] = signature
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: uploaded}}
        )
        self.assertEqual(failures, {})
        served = (await self.query(alice, alice.user_id))["device_keys"][alice.user_id][
            alice.device_id
        ]
        self.assertEqual(served["level"], 1)
        self.assertIsNot(served["level"], True)
        self.assertEqual(sig_of(served, alice.user_id, ssk_id), signature)

    async def test_reupload_spelling_a_number_differently_drops_signatures(
        self,
    ) -> None:
        """Device keys re-uploaded with ``true`` where ``1`` was are other
        signed bytes: the SSK signature over the old bytes no longer holds and
        is dropped (Python's ``1 == True`` must not keep it)."""
        alice = await self.ready_user("alice")
        stored = await self._device_with_number(alice)
        failures = await self.sign_upload(
            alice,
            {alice.user_id: {alice.device_id: self.ssk_signed_device(alice, stored)}},
        )
        self.assertEqual(failures, {})
        self.assertEqual(self.signature_rows(), 1)
        keys = {k: v for k, v in stored.items() if k != "signatures"}
        keys["level"] = True
        resp = await self.client.post(
            KEYS_UPLOAD,
            {"device_keys": sign_json(keys, alice.user_id, alice.device_key)},
            token=alice.token,
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(self.signature_rows(), 0)
        served = (await self.query(alice, alice.user_id))["device_keys"][alice.user_id][
            alice.device_id
        ]
        self.assertIs(served["level"], True)
        self.assertEqual(
            list(served["signatures"][alice.user_id]), [f"ed25519:{alice.device_id}"]
        )

    async def test_device_reupload_drops_signatures(self) -> None:
        """New device keys for the same device drop the SSK signature on the old ones."""
        alice = await self.ready_user("alice")
        await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: self.ssk_signed_device(alice)}}
        )
        alice.device_key = generate_signing_key(alice.device_id)
        resp = await self.client.post(
            KEYS_UPLOAD, {"device_keys": alice.device_keys()}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        device = (await self.query(alice, alice.user_id))["device_keys"][alice.user_id][
            alice.device_id
        ]
        self.assertEqual(
            list(device["signatures"][alice.user_id]), [f"ed25519:{alice.device_id}"]
        )
        self.assertEqual(self.signature_rows(), 0)

    async def test_reupload_keeps_signatures_that_still_hold(self) -> None:
        """Only signatures that the new device keys invalidate are dropped."""
        alice = await self.ready_user("alice")
        master = await self.sign_device_and_master(alice)
        # Same signed content, one more signature entry: both signatures hold.
        dk = alice.device_keys()
        dk["signatures"][alice.user_id]["ed25519:EXTRA"] = "x"
        resp = await self.client.post(
            KEYS_UPLOAD, {"device_keys": dk}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(self.signature_rows(), 2)
        # Another algorithm, same ed25519 key: the SSK signature over the device
        # no longer holds, the device's own signature on the master key does.
        dk = alice.device_keys()
        dk["algorithms"] = [*dk["algorithms"], "m.new.algorithm"]
        dk = sign_json(
            {k: v for k, v in dk.items() if k != "signatures"},
            alice.user_id,
            alice.device_key,
        )
        resp = await self.client.post(
            KEYS_UPLOAD, {"device_keys": dk}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(self.signature_rows(), 1)
        got = (await self.query(alice, alice.user_id))["master_keys"][alice.user_id]
        key_id = f"ed25519:{alice.device_id}"
        self.assertEqual(
            sig_of(got, alice.user_id, key_id), sig_of(master, alice.user_id, key_id)
        )

    async def test_deleted_device_signatures_gone(self) -> None:
        """Logging out (deleting the device) removes signatures over and by it."""
        alice = await self.ready_user("alice")
        await self.sign_device_and_master(alice)
        resp = await self.client.post(
            "/_matrix/client/v3/logout", {}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(self.signature_rows(), 0)
        # The same device id logs in again: no old signature resurfaces.
        token, _ = await self.login(alice.user_id, alice.device_id)
        await self.client.post(
            KEYS_UPLOAD, {"device_keys": alice.device_keys()}, token=token
        )
        viewer = TestUser(alice.user_id, alice.device_id, token)
        result = await self.query(viewer, alice.user_id)
        device = result["device_keys"][alice.user_id][alice.device_id]
        self.assertEqual(
            list(device["signatures"][alice.user_id]), [f"ed25519:{alice.device_id}"]
        )
        self.assertNotIn("signatures", result["master_keys"][alice.user_id])


class LargeRequestTest(SignatureTestBase):
    """A request with many items is answered correctly in few statements."""

    async def test_device_read_returns_only_the_devices_asked_for(self) -> None:
        """Asking for many of a user's devices reads exactly those (both paths)."""
        alice = await self.ready_user("alice")
        from synapse_xsign_module.storage.device_keys import (
            MANY_DEVICES,
            get_device_keys_txn,
            send_signable_devices,
            upload_txn,
        )

        ids = [f"D{i:03d}" for i in range(3 * MANY_DEVICES)]
        with self.db.engine.begin() as conn:
            for device_id in ids:
                keys = make_device_keys(
                    alice.user_id, device_id, generate_signing_key(device_id)
                )
                upload_txn(conn, alice.user_id, device_id, keys, [], [], 0)
        for wanted in (ids[:3], ids[1 : 2 * MANY_DEVICES : 2] + ["NOSUCH"]):
            with self.db.engine.begin() as conn:
                got = get_device_keys_txn(
                    conn, {alice.user_id: wanted, "@nobody:test.local": ["X"]}
                )
            self.assertEqual(set(got), {alice.user_id})
            self.assertEqual(set(got[alice.user_id]), set(wanted) - {"NOSUCH"})
            with self.db.engine.begin() as conn:
                signable = send_signable_devices(conn, alice.user_id, wanted)()
            self.assertEqual(
                {d: s.key_json for d, s in signable.items()}, got[alice.user_id]
            )

    async def test_thousand_devices(self) -> None:
        """The SSK signs 1000 devices in one request; every signature is served."""
        alice = await self.ready_user("alice")
        from synapse_xsign_module.storage.device_keys import upload_txn

        devices = {}
        for i in range(1000):
            device_id = f"D{i:04d}"
            devices[device_id] = make_device_keys(
                alice.user_id, device_id, generate_signing_key(device_id)
            )
        with self.db.engine.begin() as conn:
            for device_id, keys in devices.items():
                upload_txn(conn, alice.user_id, device_id, keys, [], [], 0)
        body = {
            alice.user_id: {
                d: sign_json(copy.deepcopy(k), alice.user_id, alice.self_signing)
                for d, k in devices.items()
            }
        }
        statements: list[str] = []

        def count(*args: Any) -> None:
            statements.append(args[2])

        event.listen(self.db.engine, "before_cursor_execute", count)
        try:
            failures = await self.sign_upload(alice, body)
        finally:
            event.remove(self.db.engine, "before_cursor_execute", count)
        self.assertEqual(failures, {})
        self.assertLess(len(statements), 40, statements[:50])
        self.assertEqual(self.signature_rows(), 1000)
        result = await self.query(alice, alice.user_id)
        ssk_id = f"ed25519:{public_key(alice.self_signing)}"
        for device_id in devices:
            got = result["device_keys"][alice.user_id][device_id]
            self.assertEqual(
                sig_of(got, alice.user_id, ssk_id),
                sig_of(body[alice.user_id][device_id], alice.user_id, ssk_id),
            )


class VerificationProcessesTest(SignatureTestBase):
    """With ``verification_processes``, the large batches of uploads handled
    at the same time are checked in worker processes, with the same answer,
    signature by signature, as in threads; an upload handled alone is checked
    in threads."""

    config_overrides = {"verification_processes": 2}

    async def signed_devices(
        self, name: str, n: int, bad: set[int]
    ) -> tuple[TestUser, dict[str, Any]]:
        """A user with ``n`` devices and an upload body in which the SSK signs
        them all; those in ``bad`` get a signature over other content."""
        user = await self.ready_user(name)
        from synapse_xsign_module.storage.device_keys import upload_txn

        body: dict[str, Any] = {}
        with self.db.engine.begin() as conn:
            for i in range(n):
                device_id = f"D{i:04d}"
                keys = make_device_keys(
                    user.user_id, device_id, generate_signing_key(device_id)
                )
                upload_txn(conn, user.user_id, device_id, keys, [], [], 0)
                signed = sign_json(copy.deepcopy(keys), user.user_id, user.self_signing)
                if i in bad:
                    other = sign_json(
                        {**keys, "user_id": "@mallory:test.local"},
                        user.user_id,
                        user.self_signing,
                    )
                    signed["signatures"] = other["signatures"]
                body[device_id] = signed
        return user, {user.user_id: body}

    def assert_checked_in_processes(self) -> None:
        """The configured verification processes are running (with none
        configured, none are: the batch was checked in threads)."""
        self.assertEqual(
            len(multiprocessing.active_children()),
            self.config_overrides["verification_processes"],
        )

    def serve_with_requests_in_progress(self, n: int) -> None:
        """Give the host a site that counts ``n`` requests in progress."""
        from synapse_xsign_module.hosts.embedded.site import XSignSite

        site = XSignSite(self.host.root, 1_000_000, False, False)
        site.in_progress = n
        self.host.site = site

    def expected(self, user: TestUser, bad: set[int]) -> dict[str, Any]:
        invalid = {"errcode": "M_INVALID_SIGNATURE", "error": "Invalid signature"}
        return {user.user_id: {f"D{i:04d}": invalid for i in bad}} if bad else {}

    async def test_concurrent_uploads_checked_in_processes(self) -> None:
        alice, alice_body = await self.signed_devices("alice", 300, {0, 150, 299})
        bob, bob_body = await self.signed_devices("bob", 200, {99})
        got = await defer.gatherResults(
            [
                defer.ensureDeferred(self.sign_upload(alice, alice_body)),
                defer.ensureDeferred(self.sign_upload(bob, bob_body)),
            ]
        )
        self.assertEqual(got[0], self.expected(alice, {0, 150, 299}))
        self.assertEqual(got[1], self.expected(bob, {99}))
        self.assertEqual(self.signature_rows(), 300 - 3 + 200 - 1)
        self.assertEqual(len(multiprocessing.active_children()), 2)

    async def test_upload_alone_is_checked_in_threads(self) -> None:
        alice, body = await self.signed_devices("alice", 300, {7})
        self.assertEqual(await self.sign_upload(alice, body), self.expected(alice, {7}))
        self.assertEqual(self.signature_rows(), 299)
        self.assertEqual(multiprocessing.active_children(), [])

    async def test_upload_with_other_requests_arriving_goes_to_processes(
        self,
    ) -> None:
        """An upload handled alone while the host still receives other requests
        (their bodies not yet parsed) is not alone: processes check it."""
        alice, body = await self.signed_devices("alice", 300, {7})
        self.serve_with_requests_in_progress(3)  # this upload and two still arriving
        self.assertEqual(await self.sign_upload(alice, body), self.expected(alice, {7}))
        self.assert_checked_in_processes()

    async def test_uploads_handled_together_are_not_alone(self) -> None:
        """Two uploads being handled are not alone even where the host counts
        one request in progress (the other's client may have gone)."""
        self.serve_with_requests_in_progress(1)
        alice, alice_body = await self.signed_devices("alice", 300, set())
        bob, bob_body = await self.signed_devices("bob", 200, set())
        got = await defer.gatherResults(
            [
                defer.ensureDeferred(self.sign_upload(alice, alice_body)),
                defer.ensureDeferred(self.sign_upload(bob, bob_body)),
            ]
        )
        self.assertEqual(got, [{}, {}])
        self.assert_checked_in_processes()

    async def test_upload_alone_in_the_site_is_checked_in_threads(self) -> None:
        """The host's count includes the upload itself: one is alone."""
        alice, body = await self.signed_devices("alice", 300, {7})
        self.serve_with_requests_in_progress(1)
        self.assertEqual(await self.sign_upload(alice, body), self.expected(alice, {7}))
        self.assertEqual(multiprocessing.active_children(), [])


class ThreadsOnlyTest(VerificationProcessesTest):
    """``verification_processes: 0``: the same answers, and no process."""

    config_overrides = {"verification_processes": 0}

    async def test_concurrent_uploads_checked_in_processes(self) -> None:
        alice, alice_body = await self.signed_devices("alice", 300, {0, 299})
        bob, bob_body = await self.signed_devices("bob", 200, set())
        got = await defer.gatherResults(
            [
                defer.ensureDeferred(self.sign_upload(alice, alice_body)),
                defer.ensureDeferred(self.sign_upload(bob, bob_body)),
            ]
        )
        self.assertEqual(got, [self.expected(alice, {0, 299}), {}])
        self.assertEqual(self.signature_rows(), 498)
        self.assertEqual(multiprocessing.active_children(), [])


class KeyChangedDuringUploadTest(SignatureTestBase):
    """A key that changes between the verification and the store is reported,
    and its signature is not stored; unchanged keys are not read twice."""

    def change_before_store(self, change: Any) -> None:
        """Run ``change()`` (async) just before the next store transaction."""
        store = self.service.signature_store
        original = store.store

        def store_after_change(*args: Any) -> defer.Deferred[list[int]]:
            async def go() -> list[int]:
                await change()
                return await original(*args)

            return defer.ensureDeferred(go())

        self.patch(store, "store", store_after_change)

    async def test_own_device_changed_meanwhile(self) -> None:
        alice = await self.ready_user("alice")
        signed = self.ssk_signed_device(alice)

        async def new_device_keys() -> None:
            keys = make_device_keys(
                alice.user_id, alice.device_id, generate_signing_key("new")
            )
            resp = await self.client.post(
                KEYS_UPLOAD, {"device_keys": keys}, token=alice.token
            )
            self.assertEqual(resp.code, 200, resp)

        self.change_before_store(new_device_keys)
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: signed}}
        )
        self.assertEqual(
            failures,
            {
                alice.user_id: {
                    alice.device_id: {
                        "errcode": "M_UNKNOWN",
                        "error": "The key changed during the upload",
                    }
                }
            },
        )
        self.assertEqual(self.signature_rows(), 0)

    async def test_other_users_master_changed_meanwhile(self) -> None:
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        master = sign_json(self.master_obj(bob), alice.user_id, alice.user_signing)
        master_id = public_key(bob.master)

        async def bob_resets_identity() -> None:
            resp = await self.replace_with_uia(bob, bob.make_cross_signing())
            self.assertEqual(resp.code, 200, resp)

        self.change_before_store(bob_resets_identity)
        failures = await self.sign_upload(alice, {bob.user_id: {master_id: master}})
        self.assertEqual(failures[bob.user_id][master_id]["errcode"], "M_UNKNOWN")
        self.assertNotEqual(public_key(bob.master), master_id)
        self.assertEqual(self.signature_rows(), 0)

    async def test_unchanged_keys_are_read_once(self) -> None:
        """With every key version unchanged, the store reads no key again."""
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        reads = {
            name: self.record_calls(storage_signatures, name)
            for name in (
                "get_device_keys_txn",
                "send_signable_devices",
                "get_current_txn",
                "send_current",
            )
        }
        master = sign_json(self.master_obj(bob), alice.user_id, alice.user_signing)
        body = {
            alice.user_id: {alice.device_id: self.ssk_signed_device(alice)},
            bob.user_id: {public_key(bob.master): master},
        }
        self.assertEqual(await self.sign_upload(alice, body), {})
        self.assertEqual(self.signature_rows(), 2)
        # Once each, by the read the verification is based on.
        self.assertEqual(
            {name: len(calls) for name, calls in reads.items()},
            {
                "get_device_keys_txn": 0,
                "send_signable_devices": 1,
                "get_current_txn": 0,
                "send_current": 1,
            },
        )


class StoreLockTest(SignatureTestBase):
    """On PostgreSQL a store holds the lock of a user whose master key it
    signs in shared mode (other users' stores over that key go on, a change
    of the user's keys waits), and the locks of the signer and of a user
    whose device it relies on exclusively."""

    def setUp(self) -> None:
        super().setUp()
        if not self.db_url.startswith("postgresql"):
            raise unittest.SkipTest("SQLite writers are serial anyway")

    def holding(self, lock: Any) -> Any:
        return hold_in_other_transaction(self, self.db.engine, lock)

    async def test_stores_over_one_master_key_go_on_together(self) -> None:
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        # Another user's store over bob's master key, still open.
        tx = self.holding(lambda c: lock_users(c, [], shared=[bob.user_id]))
        stored = defer.ensureDeferred(self.usk_sign_master(alice, bob))
        await stored.addTimeout(20, reactor)
        self.assertEqual(self.signature_rows(), 1)
        # A change of bob's keys waits for it.
        change = self.db.run("change", lambda c: lock_users(c, [bob.user_id]))
        await result_once_released(self, self.db.engine, change, tx)

    async def test_a_user_named_in_both_modes_is_locked_exclusively(self) -> None:
        tx = self.holding(lambda c: lock_users(c, ["@a:x"], shared=["@a:x", "@b:x"]))
        # @b:x is shared: another reader goes on.
        reader_b = self.db.run("b", lambda c: lock_users(c, [], shared=["@b:x"]))
        await reader_b.addTimeout(20, reactor)
        reader = self.db.run("a", lambda c: lock_users(c, [], shared=["@a:x"]))
        await result_once_released(self, self.db.engine, reader, tx)

    async def test_store_waits_for_a_key_change_of_the_signed_user(self) -> None:
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        tx = self.holding(lambda c: lock_users(c, [bob.user_id]))
        stored = defer.ensureDeferred(self.usk_sign_master(alice, bob))
        await result_once_released(self, self.db.engine, stored, tx)
        self.assertEqual(self.signature_rows(), 1)

    async def test_store_waits_for_another_of_the_signers_stores(self) -> None:
        """The signer's lock is exclusive: two uploads by one user, which may
        write the same rows, run one after the other."""
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        tx = self.holding(lambda c: lock_users(c, [], shared=[alice.user_id]))
        stored = defer.ensureDeferred(self.usk_sign_master(alice, bob))
        await result_once_released(self, self.db.engine, stored, tx)
        self.assertEqual(self.signature_rows(), 1)

    async def test_store_over_a_device_waits_for_its_upload(self) -> None:
        """An upload of a device holds its user's lock only shared: a
        signature over that device waits for it."""
        alice = await self.ready_user("alice")
        tx = self.holding(lambda c: lock_device(c, alice.user_id, alice.device_id))
        body = {alice.user_id: {alice.device_id: self.ssk_signed_device(alice)}}
        stored = defer.ensureDeferred(self.sign_upload(alice, body))
        self.assertEqual(
            await result_once_released(self, self.db.engine, stored, tx), {}
        )
        self.assertEqual(self.signature_rows(), 1)


class ExclusiveUsersTest(unittest.TestCase):
    """Which users a signature store locks exclusively (no database)."""

    def test_exclusive_users(self) -> None:
        """Signers, and users with a device among the keys, are locked
        exclusively; a user whose master key another user signs is not."""
        from synapse_xsign_module.storage.signatures import (
            Basis,
            PendingSignature,
            _exclusive_users,
        )

        def sig(signer: Basis, target: Basis) -> PendingSignature:
            return PendingSignature(
                signer.user_id, "k", target.user_id, "t", "s", signer, target
            )

        usk = Basis("@a:x", "user_signing", "U", "{}")
        master = Basis("@b:x", "master", "M", "{}")
        device = Basis("@c:x", "device", "D", "{}")
        self.assertEqual(_exclusive_users([sig(usk, master)]), {"@a:x"})
        self.assertEqual(
            _exclusive_users([sig(usk, master), sig(usk, device)]), {"@a:x", "@c:x"}
        )


class SignedHashTest(SignatureTestBase):
    """Stored device keys keep the hash of what a signature over them covers,
    and an upload whose object has it is not compared by parsing the stored
    JSON; a row without the hash (written before it was kept) still works."""

    def stored_hash(self, user: TestUser) -> str | None:
        with self.db.engine.connect() as conn:
            value = conn.execute(
                select(device_keys.c.signed_hash).where(
                    device_keys.c.user_id == user.user_id,
                    device_keys.c.device_id == user.device_id,
                )
            ).scalar_one()
        return value if value is None else str(value)

    def forget_hash(self, user: TestUser) -> None:
        """Make the user's device row one an older version wrote."""
        with self.db.engine.begin() as conn:
            conn.execute(
                device_keys.update()
                .where(device_keys.c.user_id == user.user_id)
                .values(signed_hash=None)
            )

    def record_parsed_comparisons(self) -> list[tuple[Any, ...]]:
        """The stored keys compared by parsing their JSON (the calls of
        ``_same_content``), as it happens."""
        return self.record_calls(handler_signatures, "_same_content")

    async def test_upload_keeps_the_hash_of_the_signed_bytes(self) -> None:
        """The hash is that of the bytes signatures cover, and follows new keys."""
        alice = await self.ready_user("alice")
        first = self.stored_hash(alice)
        self.assertEqual(first, expected_signed_hash(alice.device_keys()))
        alice.device_key = generate_signing_key(alice.device_id)
        new_keys = alice.device_keys()
        resp = await self.client.post(
            KEYS_UPLOAD, {"device_keys": new_keys}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(self.stored_hash(alice), expected_signed_hash(new_keys))
        self.assertNotEqual(self.stored_hash(alice), first)

    async def test_matching_object_is_not_parsed_from_storage(self) -> None:
        """An upload of the stored object is matched by its hash: the stored JSON
        is not parsed, the signature is verified and served; a bad one is
        still refused."""
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        seen = self.record_parsed_comparisons()
        signed = self.ssk_signed_device(alice)
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: signed}}
        )
        self.assertEqual(failures, {})
        self.assertEqual(seen, [])
        ssk_id = f"ed25519:{public_key(alice.self_signing)}"
        served = (await self.query(alice, alice.user_id))["device_keys"][alice.user_id][
            alice.device_id
        ]
        self.assertEqual(
            sig_of(served, alice.user_id, ssk_id), sig_of(signed, alice.user_id, ssk_id)
        )
        # Bob's stored object carrying a signature over other bytes.
        forged = self.ssk_signed_device(bob)
        bob_ssk_id = f"ed25519:{public_key(bob.self_signing)}"
        forged["signatures"][bob.user_id][bob_ssk_id] = sig_of(
            signed, alice.user_id, ssk_id
        )
        failures = await self.sign_upload(bob, {bob.user_id: {bob.device_id: forged}})
        self.assertEqual(
            failures[bob.user_id][bob.device_id]["errcode"], "M_INVALID_SIGNATURE"
        )
        self.assertEqual(seen, [])
        self.assertEqual(self.signature_rows(), 1)

    async def test_different_object_makes_its_signed_bytes_once(self) -> None:
        """An object that differs from stored keys that have a hash is found
        different from the signed bytes made for the hash (not made again)."""
        alice = await self.ready_user("alice")
        made = self.record_calls(handler_signatures, "signed_bytes")
        await self.assert_reported_different(alice, {**alice.device_keys(), "extra": 1})
        self.assertEqual(len(made), 1)

    async def test_row_without_hash_is_compared_as_parsed_json(self) -> None:
        """A row an older version wrote (no hash) is compared as before."""
        alice = await self.ready_user("alice")
        self.forget_hash(alice)
        seen = self.record_parsed_comparisons()
        # A different object is still found different ...
        changed = {**alice.device_keys(), "extra": 1}
        failures = await self.sign_upload(
            alice,
            {alice.user_id: {alice.device_id: self.ssk_signed_device(alice, changed)}},
        )
        self.assertEqual(
            failures[alice.user_id][alice.device_id]["errcode"], "M_INVALID_PARAM"
        )
        # ... and the stored one is signed.
        failures = await self.sign_upload(
            alice, {alice.user_id: {alice.device_id: self.ssk_signed_device(alice)}}
        )
        self.assertEqual(failures, {})
        self.assertEqual(
            [args[2] for args in seen], [f"keys of device {alice.device_id}"] * 2
        )
        self.assertEqual(self.signature_rows(), 1)
        self.assertIsNone(self.stored_hash(alice))
