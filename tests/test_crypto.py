"""Signature checks over canonical JSON, against signedjson's own."""

from __future__ import annotations

import copy
from typing import Any

from signedjson.key import get_verify_key
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from unpaddedbase64 import encode_base64

from twisted.trial import unittest

from synapse_xsign_module.handlers.crypto import (
    has_valid_signature,
    signed_bytes,
    stored_content,
    verify_signature,
)
from synapse_xsign_module.handlers.validation import is_signatures
from synapse_xsign_module.jsonutil import (
    canonical_json,
    equal_apart_from_signatures,
    strip_signatures,
)
from tests.utils import new_signing_key, public_key

USER = "@alice:test.local"


def signed_object() -> tuple[dict[str, Any], Any]:
    key = new_signing_key()
    obj: dict[str, Any] = {
        "user_id": USER,
        "device_id": "DEV",
        "keys": {"ed25519:DEV": "x", "curve25519:DEV": "y"},
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "extra": {"text": "caf\u00e9 \U0001f511", "n": [1, -2, 3]},
        "unsigned": {"device_display_name": "not signed"},
    }
    return sign_json(obj, USER, key), key


class VerifyTest(unittest.TestCase):
    """verify_signature agrees with signedjson.verify_signed_json."""

    def test_valid_signature(self) -> None:
        obj, key = signed_object()
        key_id = f"ed25519:{key.version}"
        verify_signed_json(obj, USER, get_verify_key(key))  # signedjson agrees
        sig = obj["signatures"][USER][key_id]
        self.assertTrue(verify_signature(signed_bytes(obj), sig, public_key(key)))
        self.assertTrue(has_valid_signature(obj, USER, key_id, public_key(key)))

    def test_unsigned_and_other_signatures_are_not_covered(self) -> None:
        obj, key = signed_object()
        key_id = f"ed25519:{key.version}"
        obj["unsigned"] = {"changed": True}
        obj["signatures"]["@bob:test.local"] = {"ed25519:B": "zz"}
        self.assertTrue(has_valid_signature(obj, USER, key_id, public_key(key)))

    def test_changed_content_fails(self) -> None:
        obj, key = signed_object()
        key_id = f"ed25519:{key.version}"
        tampered = copy.deepcopy(obj)
        tampered["extra"]["n"][0] = 9
        with self.assertRaises(SignatureVerifyException):
            verify_signed_json(tampered, USER, get_verify_key(key))
        self.assertFalse(has_valid_signature(tampered, USER, key_id, public_key(key)))

    def test_other_key_fails(self) -> None:
        obj, key = signed_object()
        sig = obj["signatures"][USER][f"ed25519:{key.version}"]
        other = public_key(new_signing_key())
        self.assertFalse(verify_signature(signed_bytes(obj), sig, other))

    def test_malformed_signature_or_key_is_false_not_an_error(self) -> None:
        obj, key = signed_object()
        message = signed_bytes(obj)
        sig = obj["signatures"][USER][f"ed25519:{key.version}"]
        for bad_sig in ("", "!!!", sig[:-4], sig + "AAAA", "A" * 86):
            self.assertFalse(verify_signature(message, bad_sig, public_key(key)))
        for bad_key in ("", "not base64!", public_key(key)[:-2], "A" * 44):
            self.assertFalse(verify_signature(message, sig, bad_key))

    def test_missing_signature(self) -> None:
        obj, key = signed_object()
        self.assertFalse(
            has_valid_signature(obj, USER, "ed25519:nope", public_key(key))
        )
        del obj["signatures"]
        self.assertFalse(
            has_valid_signature(obj, USER, f"ed25519:{key.version}", public_key(key))
        )


class SignedBytesTest(unittest.TestCase):
    """The bytes a signature covers."""

    def test_stored_and_uploaded_forms_agree(self) -> None:
        """A stored key and an upload of it with more signatures give the same bytes."""
        obj, _ = signed_object()
        stored = canonical_json({k: v for k, v in obj.items() if k != "unsigned"})
        uploaded = copy.deepcopy(obj)
        uploaded["signatures"].setdefault(USER, {})["ed25519:SSK"] = "sig"
        self.assertEqual(stored_content(stored)[1], signed_bytes(uploaded))

    def test_number_forms_differ(self) -> None:
        """1 and 1.0 are different content (compared as canonical JSON)."""
        a = signed_bytes({"n": 1})
        b = signed_bytes({"n": 1.0})
        self.assertNotEqual(a, b)


class EqualApartFromSignaturesTest(unittest.TestCase):
    """equal_apart_from_signatures agrees with comparing stripped copies."""

    def test_cases(self) -> None:
        """Signatures and unsigned are ignored; every other key counts."""
        obj, _ = signed_object()
        stripped = strip_signatures(obj)
        cases: list[tuple[dict[str, Any], bool]] = [
            (obj, True),
            (strip_signatures(obj), True),
            ({**obj, "signatures": {}}, True),
            ({k: v for k, v in obj.items() if k != "unsigned"}, True),
            ({**obj, "extra": {"text": "changed"}}, False),
            ({**obj, "more": 1}, False),
            ({k: v for k, v in obj.items() if k != "device_id"}, False),
            ({**obj, "device_id": None}, False),
            # Two keys fewer and two more, so that only the count matches.
            (
                {
                    **{k: v for k, v in obj.items() if k not in ("keys", "extra")},
                    "a": 1,
                    "b": 2,
                },
                False,
            ),
        ]
        for case, expected in cases:
            self.assertEqual(
                equal_apart_from_signatures(case, stripped), expected, case
            )
            self.assertEqual(strip_signatures(case) == stripped, expected, case)

    def test_missing_key_is_not_a_none_value(self) -> None:
        """A key absent from the object differs from one stored as null."""
        self.assertFalse(equal_apart_from_signatures({"b": 1}, {"a": None}))
        self.assertTrue(equal_apart_from_signatures({"a": None}, {"a": None}))


class IsSignaturesTest(unittest.TestCase):
    """The signatures-map shape check."""

    def test_shapes(self) -> None:
        """Only user -> key id -> string maps pass."""
        self.assertTrue(is_signatures({}))
        self.assertTrue(is_signatures({"@a:x": {}}))
        self.assertTrue(is_signatures({"@a:x": {"ed25519:K": "sig"}, "@b:x": {}}))
        for bad in (
            [],
            "sig",
            None,
            {"@a:x": "sig"},
            {"@a:x": ["sig"]},
            {"@a:x": {"ed25519:K": 1}},
            {"@a:x": {"ed25519:K": "sig"}, "@b:x": {"ed25519:L": None}},
        ):
            self.assertFalse(is_signatures(bad), bad)


class SodiumPathTest(unittest.TestCase):
    """The direct libsodium call and PyNaCl's VerifyKey.verify agree."""

    def cases(self) -> list[tuple[bytes, str, str, bool]]:
        """(message, signature, public key, valid?) over short and long messages."""
        out = []
        for size in (0, 100, 5000, 70000):
            key = new_signing_key()
            message = bytes(range(256)) * (size // 256) + b"m" * (size % 256)
            sig = key.sign(message).signature
            good, pub = encode_base64(sig), public_key(key)
            flipped = encode_base64(bytes([sig[0] ^ 1]) + sig[1:])
            out += [
                (message, good, pub, True),
                (message + b"x", good, pub, False),
                (message, flipped, pub, False),
                (message, good, public_key(new_signing_key()), False),
            ]
        return out

    def test_fast_path_and_fallback_agree(self) -> None:
        from synapse_xsign_module.handlers import crypto

        self.assertIsNotNone(crypto._sodium_lib)
        cases = self.cases()
        fast = [verify_signature(m, s, p) for m, s, p, _ in cases]
        self.patch(crypto, "_sodium_lib", None)
        slow = [verify_signature(m, s, p) for m, s, p, _ in cases]
        self.assertEqual(fast, [valid for *_, valid in cases])
        self.assertEqual(slow, fast)
