"""Real key material made by the bench (ed25519 through signedjson / PyNaCl).

Every key the bench uploads is made here and recorded in a :class:`KeyBook`, so
the verifier knows which object was sent and which public key each signature
must verify with, independently of what the server answers.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from signedjson.key import (
    decode_verify_key_bytes,
    encode_verify_key_base64,
    generate_signing_key,
)
from signedjson.sign import sign_json
from unpaddedbase64 import decode_base64, encode_base64

JsonDict = dict[str, Any]

#: The one-time key algorithm of Olm.
OTK_ALGORITHM = "signed_curve25519"
ALGORITHMS = ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"]
MASTER = "master"
SELF_SIGNING = "self_signing"
USER_SIGNING = "user_signing"


def public_key(key: Any) -> str:
    """Unpadded base64 public key of a signedjson signing key."""
    return str(encode_verify_key_base64(key.verify_key))


def new_signing_key(version: str | None = None) -> Any:
    """An ed25519 signing key; its version is ``version`` or its own public key."""
    key = generate_signing_key(version or "tmp")
    if version is None:
        key.version = public_key(key)
    return key


def random_curve25519() -> str:
    """32 random bytes in unpadded base64 (a stand-in for a Curve25519 key)."""
    return str(encode_base64(os.urandom(32)))


def verify_key(key_id: str, public: str) -> Any:
    """A signedjson verify key named ``key_id`` for an unpadded base64 key."""
    return decode_verify_key_bytes(key_id, decode_base64(public))


def strip(obj: JsonDict) -> JsonDict:
    """The signed part of an object: without ``signatures`` and ``unsigned``."""
    return {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}


def add_signature(obj: JsonDict, user_id: str, key: Any) -> JsonDict:
    """A copy of ``obj`` with one more signature by ``key`` (signedjson)."""
    return sign_json(copy.deepcopy(obj), user_id, key)


def make_device_keys(user_id: str, device_id: str, device_key: Any) -> JsonDict:
    """A DeviceKeys object signed by the device's own ed25519 key."""
    obj: JsonDict = {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": list(ALGORITHMS),
        "keys": {
            f"ed25519:{device_id}": public_key(device_key),
            f"curve25519:{device_id}": random_curve25519(),
        },
    }
    return sign_json(obj, user_id, device_key)


def make_one_time_keys(
    user_id: str, device_id: str, device_key: Any, count: int, first_id: int
) -> JsonDict:
    """``count`` signed_curve25519 keys signed by the device, ids from ``first_id``.

    The canonical JSON of ``{"key": K}`` is written directly (K is base64, so
    nothing needs escaping); the verifier checks the result with signedjson.
    """
    out: JsonDict = {}
    key_id = f"ed25519:{device_id}"
    for i in range(first_id, first_id + count):
        k = random_curve25519()
        sig = encode_base64(device_key.sign(b'{"key":"' + k.encode() + b'"}').signature)
        out[f"{OTK_ALGORITHM}:AAAA{i:08d}"] = {
            "key": k,
            "signatures": {user_id: {key_id: sig}},
        }
    return out


def cross_signing_key(
    user_id: str, usage: str, key: Any, signed_by: Any = None
) -> JsonDict:
    """A CrossSigningKey object, signed by ``signed_by`` when given."""
    pub = public_key(key)
    obj: JsonDict = {
        "user_id": user_id,
        "usage": [usage],
        "keys": {f"ed25519:{pub}": pub},
    }
    if signed_by is not None:
        obj = sign_json(obj, user_id, signed_by)
    return obj


class Identity:
    """A user's cross-signing keys and the upload body that publishes them."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.master = new_signing_key()
        self.self_signing = new_signing_key()
        self.user_signing = new_signing_key()
        self.objects: dict[str, JsonDict] = {
            MASTER: cross_signing_key(user_id, MASTER, self.master),
            SELF_SIGNING: cross_signing_key(
                user_id, SELF_SIGNING, self.self_signing, self.master
            ),
            USER_SIGNING: cross_signing_key(
                user_id, USER_SIGNING, self.user_signing, self.master
            ),
        }

    @property
    def master_pub(self) -> str:
        """The master public key (also its key id's version)."""
        return public_key(self.master)

    @property
    def ssk_pub(self) -> str:
        """The self-signing public key."""
        return public_key(self.self_signing)

    @property
    def usk_pub(self) -> str:
        """The user-signing public key."""
        return public_key(self.user_signing)

    def replace_self_signing(self) -> JsonDict:
        """A new self-signing key, signed by the master key; returns the
        ``/keys/device_signing/upload`` body that publishes it."""
        self.self_signing = new_signing_key()
        self.objects[SELF_SIGNING] = cross_signing_key(
            self.user_id, SELF_SIGNING, self.self_signing, self.master
        )
        return {"self_signing_key": self.objects[SELF_SIGNING]}

    def upload_body(self) -> JsonDict:
        """The ``/keys/device_signing/upload`` body (no ``auth``)."""
        return {
            "master_key": self.objects[MASTER],
            "self_signing_key": self.objects[SELF_SIGNING],
            "user_signing_key": self.objects[USER_SIGNING],
        }


class KeyBook:
    """Every object the bench uploaded, and every public key it made.

    Attributes:
        devices: (user, device) -> the DeviceKeys object sent (self-signed).
        identities: user -> cross-signing identity sent.
        signing_keys: (user, key id) -> unpadded base64 public key.
        usk_owner: USK public key -> its owner (USK signatures are private).
        otks: (user, device, full key id) -> the one-time key object sent.
    """

    def __init__(self) -> None:
        self.devices: dict[tuple[str, str], JsonDict] = {}
        self.identities: dict[str, Identity] = {}
        self.signing_keys: dict[tuple[str, str], str] = {}
        self.usk_owner: dict[str, str] = {}
        self.otks: dict[tuple[str, str, str], JsonDict] = {}

    def add_device(self, user_id: str, device_id: str, obj: JsonDict) -> None:
        """Record the device keys about to be uploaded."""
        self.devices[(user_id, device_id)] = obj
        key_id = f"ed25519:{device_id}"
        self.signing_keys[(user_id, key_id)] = obj["keys"][key_id]

    def add_identity(self, identity: Identity) -> None:
        """Record cross-signing keys about to be uploaded."""
        self.identities[identity.user_id] = identity
        for role, obj in identity.objects.items():
            ((key_id, pub),) = obj["keys"].items()
            self.signing_keys[(identity.user_id, key_id)] = pub
            if role == USER_SIGNING:
                self.usk_owner[pub] = identity.user_id

    def add_otks(self, user_id: str, device_id: str, keys: JsonDict) -> None:
        """Record one-time keys about to be uploaded."""
        for full_id, obj in keys.items():
            self.otks[(user_id, device_id, full_id)] = obj
