"""Checking what ``/keys/query`` returns against what the bench uploaded.

Every object must equal (apart from ``signatures`` and ``unsigned``) the one the
bench sent, and EVERY signature on it must verify, with signedjson, under the
public key the bench made for that key id (a signature by a key the bench never
made is a failure). Signatures the cell must have produced are required, and
user-signing-key signatures must be visible to their signer alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attr
from signedjson.sign import SignatureVerifyException, verify_signed_json

from bench.keys import MASTER, SELF_SIGNING, USER_SIGNING, KeyBook, strip, verify_key

JsonDict = dict[str, Any]

#: Problems kept per cell (the count is kept in full).
MAX_PROBLEMS = 20


@attr.s(auto_attribs=True)
class Expect:
    """What a query answer must hold besides valid signatures.

    Attributes:
        devices: user -> devices that must be present with keys.
        allowed: when given, user -> the only devices that may have keys (those
            whose upload was sent).
        cross_signing: users whose master key and SSK must be present.
        own_usk: whether the requester's own USK must be present (when queried).
        signatures: (user, target, signer, signer key id) that must be present;
            target is a device id or ``master``.
    """

    devices: dict[str, set[str]] = attr.Factory(dict)
    allowed: dict[str, set[str]] | None = None
    cross_signing: set[str] = attr.Factory(set)
    own_usk: bool = False
    signatures: set[tuple[str, str, str, str]] = attr.Factory(set)


class Problems:
    """Collected verification failures (the first few texts, and a count)."""

    def __init__(self) -> None:
        self.count = 0
        self.texts: list[str] = []
        self.signatures_checked = 0

    def add(self, text: str) -> None:
        """Record one failure."""
        self.count += 1
        if len(self.texts) < MAX_PROBLEMS:
            self.texts.append(text)

    def extend(self, other: Problems) -> None:
        """Merge another collection."""
        self.count += other.count
        self.signatures_checked += other.signatures_checked
        for t in other.texts:
            if len(self.texts) < MAX_PROBLEMS:
                self.texts.append(t)


def _signatures(obj: JsonDict) -> Iterable[tuple[str, str, Any]]:
    sigs = obj.get("signatures")
    if not isinstance(sigs, dict):
        return []
    out = []
    for signer, entries in sigs.items():
        if isinstance(entries, dict):
            for key_id, sig in entries.items():
                out.append((signer, key_id, sig))
    return out


class Verifier:
    """Checks query answers against a :class:`KeyBook`.

    Args:
        book: every key the bench made and every object it sent.
    """

    def __init__(self, book: KeyBook) -> None:
        self.book = book

    def check_signatures(
        self, obj: JsonDict, where: str, requester: str, problems: Problems
    ) -> set[tuple[str, str]]:
        """Verify every signature on ``obj``; returns the (signer, key id) valid."""
        valid: set[tuple[str, str]] = set()
        for signer, key_id, sig in _signatures(obj):
            public = self.book.signing_keys.get((signer, key_id))
            if public is None:
                problems.add(
                    f"{where}: signature by {signer} {key_id}, a key never made"
                )
                continue
            owner = self.book.usk_owner.get(public)
            if owner is not None and owner != requester:
                problems.add(
                    f"{where}: {owner}'s user-signing signature visible to {requester}"
                )
            if not isinstance(sig, str):
                problems.add(f"{where}: signature {signer} {key_id} is not a string")
                continue
            problems.signatures_checked += 1
            try:
                verify_signed_json(obj, signer, verify_key(key_id, public))
            except (SignatureVerifyException, ValueError, TypeError) as e:
                problems.add(f"{where}: bad signature by {signer} {key_id}: {e}")
                continue
            valid.add((signer, key_id))
        return valid

    def check_query(
        self, answer: JsonDict, requester: str, users: list[str], expect: Expect
    ) -> Problems:
        """Check one ``/keys/query`` answer for ``users`` made by ``requester``."""
        p = Problems()
        book = self.book
        for field in ("device_keys", "master_keys", "self_signing_keys"):
            if not isinstance(answer.get(field), dict):
                p.add(f"answer has no '{field}' object")
                return p
        got_sigs: set[tuple[str, str, str, str]] = set()
        for user_id in users:
            devices = answer["device_keys"].get(user_id)
            if not isinstance(devices, dict):
                p.add(f"{user_id}: missing from device_keys")
                devices = {}
            want = expect.devices.get(user_id, set())
            missing = want - set(devices)
            if missing:
                p.add(f"{user_id}: devices missing: {sorted(missing)[:5]}")
            for device_id, obj in devices.items():
                where = f"{user_id}/{device_id}"
                sent = book.devices.get((user_id, device_id))
                if sent is None:
                    p.add(f"{where}: device keys the bench never uploaded")
                    continue
                if expect.allowed is not None and device_id not in expect.allowed.get(
                    user_id, ()
                ):
                    p.add(f"{where}: has keys but the bench never sent them")
                if not isinstance(obj, dict) or strip(obj) != strip(sent):
                    p.add(f"{where}: differs from the device keys uploaded")
                    continue
                valid = self.check_signatures(obj, where, requester, p)
                if (user_id, f"ed25519:{device_id}") not in valid:
                    p.add(f"{where}: no valid self-signature")
                got_sigs.update((user_id, device_id, s, k) for s, k in valid)

            identity = book.identities.get(user_id)
            roles = [(MASTER, "master_keys"), (SELF_SIGNING, "self_signing_keys")]
            if user_id == requester:
                roles.append((USER_SIGNING, "user_signing_keys"))
            for role, field in roles:
                obj = (answer.get(field) or {}).get(user_id)
                required = user_id in expect.cross_signing and (
                    role != USER_SIGNING or expect.own_usk
                )
                if obj is None:
                    if required:
                        p.add(f"{user_id}: {role} key missing")
                    continue
                where = f"{user_id} {role} key"
                if identity is None:
                    p.add(f"{where}: a key the bench never uploaded")
                    continue
                if not isinstance(obj, dict) or strip(obj) != strip(
                    identity.objects[role]
                ):
                    p.add(f"{where}: differs from the key uploaded")
                    continue
                valid = self.check_signatures(obj, where, requester, p)
                if role != MASTER:
                    master_id = f"ed25519:{identity.master_pub}"
                    if (user_id, master_id) not in valid:
                        p.add(f"{where}: no valid signature by the master key")
                else:
                    got_sigs.update((user_id, MASTER, s, k) for s, k in valid)
            if user_id != requester and (answer.get("user_signing_keys") or {}).get(
                user_id
            ):
                p.add(f"{user_id}: user-signing key shown to {requester}")

        queried = set(users)
        for need in expect.signatures:
            if need[0] not in queried or need in got_sigs:
                continue
            user_id, target, signer, key_id = need
            p.add(
                f"{user_id}/{target}: expected signature by {signer} {key_id} missing"
            )
        return p
