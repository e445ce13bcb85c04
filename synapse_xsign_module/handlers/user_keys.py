"""One user's keys rendered as ``/keys/query`` serves them.

Stored keys are canonical JSON and are sent as they are; the detached
signatures the user made over their own keys are merged in once, when the
entry is built.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from json.encoder import encode_basestring

import attr

from synapse_xsign_module.http.base import JsonDict
from synapse_xsign_module.jsonutil import compact_json
from synapse_xsign_module.storage.cross_signing import (
    MASTER,
    SELF_SIGNING,
    USER_SIGNING,
    StoredKey,
)
from synapse_xsign_module.storage.query import KeySnapshot
from synapse_xsign_module.storage.signatures import VisibleSignatures

#: (signer user id, signer key id, signature)
Signature = tuple[str, str, str]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class UserKeys:
    """One user's keys, rendered.

    Attributes:
        version: the key version they were read at (None: not versioned).
        devices: device id -> ``"device id":{...`` (the device's key JSON with
            the user's own signatures merged, its closing brace left off for
            ``unsigned`` to follow).
        master: the current master key.
        master_signatures: the user's own detached signatures over it, sorted.
        master_json: the master key's JSON with those signatures.
        self_signing_json: the self-signing key's JSON.
        user_signing_json: the user-signing key's JSON (for its owner only).
        size: about how many bytes the entry holds.
    """

    version: int | None
    devices: dict[str, str]
    master: StoredKey | None
    master_signatures: tuple[Signature, ...]
    master_json: str | None
    self_signing_json: str | None
    user_signing_json: str | None
    size: int

    def only_devices(self, device_ids: list[str]) -> UserKeys:
        """The same keys with only some of the devices (those that exist)."""
        devices = self.devices
        return attr.evolve(
            self, devices={d: devices[d] for d in device_ids if d in devices}
        )

    def with_master_signatures(self, sigs: tuple[Signature, ...]) -> UserKeys:
        """The same keys with other detached signatures over the master key."""
        assert self.master is not None
        return attr.evolve(
            self,
            master_signatures=sigs,
            master_json=_signed_json(self.master.key_json, sigs),
        )


def build_user_keys(snap: KeySnapshot, user_id: str) -> UserKeys:
    """Render the keys a snapshot read for one user."""
    devices: dict[str, str] = {}
    size = 0
    for device_id, key_json in snap.device_keys.get(user_id, {}).items():
        extra = snap.own_signatures.get((user_id, device_id))
        if extra:
            key_json = with_signatures(key_json, tuple(sorted(extra)))
        fragment = f"{encode_basestring(device_id)}:{key_json[:-1]}"
        devices[device_id] = fragment
        size += len(fragment) + len(device_id)
    keys = snap.cross_signing.get(user_id, {})
    master = keys.get(MASTER)
    master_sigs: tuple[Signature, ...] = ()
    master_json = None
    if master is not None:
        master_sigs = tuple(
            sorted(snap.own_signatures.get((user_id, master.public_key), ()))
        )
        master_json = _signed_json(master.key_json, master_sigs)
        size += len(master.key_json) + len(master_json)
    ssk = keys.get(SELF_SIGNING)
    usk = keys.get(USER_SIGNING)
    for key in (ssk, usk):
        if key is not None:
            size += len(key.key_json)
    return UserKeys(
        version=snap.versions.get(user_id),
        devices=devices,
        master=master,
        master_signatures=master_sigs,
        master_json=master_json,
        self_signing_json=ssk.key_json if ssk is not None else None,
        user_signing_json=usk.key_json if usk is not None else None,
        size=size + ENTRY_OVERHEAD,
    )


#: Bytes counted for an entry besides its text (objects, dict slots).
ENTRY_OVERHEAD = 600


#: Keys rendered with their detached signatures, remembered by content.
RENDER_CACHE_SIZE = 8192


@functools.lru_cache(maxsize=RENDER_CACHE_SIZE)
def with_signatures(key_json: str, extra: tuple[tuple[str, str, str], ...]) -> str:
    """A stored key's JSON with detached signatures merged into ``signatures``.

    A pure function of its arguments, so it is remembered: the same key with the
    same signatures is queried again and again, and is then neither decoded nor
    encoded. Nothing needs invalidating (a changed key or signature is a
    different argument).

    Args:
        key_json: the key as stored (a JSON object).
        extra: (signer user id, signer key id, signature) triples, sorted.

    Returns:
        Compact JSON of the merged object.
    """
    obj = json.loads(key_json)
    _merge_signatures(obj, extra)
    return compact_json(obj)


def _merge_signatures(obj: JsonDict, extra: tuple[tuple[str, str, str], ...]) -> None:
    """Add detached signatures to a key object's ``signatures``."""
    sigs = obj.get("signatures")
    if not isinstance(sigs, dict):
        sigs = {}
        obj["signatures"] = sigs
    grouped: dict[str, dict[str, str]] = defaultdict(dict)
    for signer, key_id, sig in extra:
        grouped[signer][key_id] = sig
    for signer, entries in grouped.items():
        existing = sigs.get(signer)
        if not isinstance(existing, dict):
            existing = {}
            sigs[signer] = existing
        existing.update(entries)


def with_requester_signatures(
    keys: UserKeys, user_id: str, made_by_requester: VisibleSignatures
) -> UserKeys:
    """A user's keys as the requester sees them: with the signatures the
    requester made over the master key (with their user-signing key)."""
    if keys.master is None:
        return keys
    extra = made_by_requester.get((user_id, keys.master.public_key))
    if not extra:
        return keys
    return keys.with_master_signatures(
        tuple(sorted(keys.master_signatures + tuple(extra)))
    )


def without_deleted_devices(
    keys: UserKeys, user_id: str, existing: set[str]
) -> UserKeys:
    """A user's keys without the master key's signatures by devices the host
    deleted (``existing``: the user's devices that still exist)."""
    if keys.master is None:
        return keys
    sigs = tuple(
        sig
        for sig in keys.master_signatures
        if sig[0] != user_id
        or not sig[1].startswith("ed25519:")
        or sig[1][len("ed25519:") :] in existing
    )
    if len(sigs) == len(keys.master_signatures):
        return keys
    return keys.with_master_signatures(sigs)


def _signed_json(key_json: str, sigs: tuple[Signature, ...]) -> str:
    """A stored key's JSON with detached signatures (if any) merged in."""
    return with_signatures(key_json, sigs) if sigs else key_json
