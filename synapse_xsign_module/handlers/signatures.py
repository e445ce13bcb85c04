"""``/keys/signatures/upload``: signatures that make cross-signing trust flow.

Accepted, by the caller's own keys only:

- the caller's self-signing key over one of the caller's devices
  (``{me: {DEVICE_ID: device keys}}``);
- one of the caller's devices over the caller's master key
  (``{me: {MASTER_PUB: master key}}``, signed ``ed25519:DEVICE_ID``);
- the caller's user-signing key over another user's master key
  (``{other: {THEIR_MASTER_PUB: their master key}}``).

Each item either fails (reported in ``failures``) or has its new signatures
stored; the items that pass are stored in one transaction.
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple

from synapse_xsign_module.clock import Clock
from synapse_xsign_module.errors import Codes, bad_json
from synapse_xsign_module.handlers.crypto import (
    signed_bytes,
    stored_content,
)
from synapse_xsign_module.handlers.validation import (
    is_signatures,
    require_signatures,
    server_of,
)
from synapse_xsign_module.handlers.verification import SignatureVerifier
from synapse_xsign_module.host import Host, Requester
from synapse_xsign_module.http.base import JsonDict
from synapse_xsign_module.jsonutil import equal_apart_from_signatures, signed_digest
from synapse_xsign_module.storage.cross_signing import (
    MASTER,
    SELF_SIGNING,
    USER_SIGNING,
    CurrentKeys,
    StoredKey,
)
from synapse_xsign_module.storage.device_keys import SignableDevice
from synapse_xsign_module.storage.signatures import (
    Basis,
    PendingSignature,
    SignatureStore,
)

logger = logging.getLogger(__name__)


class ItemFailure(Exception):
    """One item of the upload failed."""

    def __init__(self, errcode: str, error: str) -> None:
        super().__init__(error)
        self.errcode = errcode
        self.error = error


class _Check(NamedTuple):
    """A signature to verify, and what to store when it holds.

    Attributes:
        item: (target user, key id) of the upload item.
        message: the bytes the signature covers.
        public_key: the signing key (unpadded base64).
        pending: the row to store; its ``signature`` is the one to verify.
        recheck: when the uploaded object was found equal to the stored key as
            parsed JSON only (``message`` being the stored key's bytes), the
            object and what it stands for: if the signature fails, its own
            bytes tell whether it differs from the stored key after all.
    """

    item: tuple[str, str]
    message: bytes
    public_key: str
    pending: PendingSignature
    recheck: tuple[dict[str, Any], str] | None = None


class _SelfSigning(NamedTuple):
    """The uploader's self-signing key, as its signatures are checked and stored.

    Attributes:
        public_key: the public key (unpadded base64).
        key_id: ``ed25519:<public key>``, the signatures' key id.
        basis: what its signatures are checked against.
    """

    public_key: str
    key_id: str
    basis: Basis


class _OwnKeys(NamedTuple):
    """The uploader's keys, looked up once per upload rather than per item.

    Attributes:
        user_id: the uploader.
        master: the current master key, if any.
        self_signing: the current self-signing key, if any.
        devices: the uploader's devices the upload mentions (device id -> its
            stored keys), those that have keys.
    """

    user_id: str
    master: StoredKey | None
    self_signing: _SelfSigning | None
    devices: dict[str, SignableDevice]

    @classmethod
    def of(
        cls, me: str, cross: CurrentKeys, devices: dict[str, SignableDevice]
    ) -> _OwnKeys:
        """The uploader ``me``'s keys from an upload's context."""
        mine = cross.get(me, {})
        ssk = mine.get(SELF_SIGNING)
        self_signing = None
        if ssk is not None:
            self_signing = _SelfSigning(
                ssk.public_key,
                f"ed25519:{ssk.public_key}",
                Basis(me, SELF_SIGNING, ssk.public_key, ssk.key_json),
            )
        return cls(me, mine.get(MASTER), self_signing, devices)


def _mentioned_devices(me: str, own_items: dict[str, Any]) -> list[str]:
    """Device ids an upload's own items may involve: every item's key id (a
    device it may sign), and the devices signing an item presented as a master
    key.

    Only an object whose ``usage`` holds ``master`` can match the stored master
    key (whose usage always does), so only its signers are ever looked up:
    the signatures of the other items (500 for a self-signing key signing 500
    devices) are not walked.
    """
    ids = set(own_items)
    for obj in own_items.values():
        usage = obj.get("usage")
        if not isinstance(usage, list) or MASTER not in usage:
            continue
        sigs = obj.get("signatures")
        mine = sigs.get(me) if isinstance(sigs, dict) else None
        if isinstance(mine, dict):
            ids.update(k.partition(":")[2] for k in mine if isinstance(k, str))
    ids.discard("")
    return sorted(ids)


def _device_ed25519(device_json: str, device_id: str) -> str | None:
    keys = json.loads(device_json).get("keys")
    if isinstance(keys, dict):
        value = keys.get(f"ed25519:{device_id}")
        if isinstance(value, str):
            return value
    return None


def _mismatch(what: str) -> str:
    """The error for an object that differs from the stored ``what``."""
    return (
        f"The signed object does not match the stored {what} (apart from "
        "'signatures' and 'unsigned')"
    )


def _same_content(
    obj: dict[str, Any], stored_json: str, what: str, own: bytes | None = None
) -> tuple[bytes, tuple[dict[str, Any], str] | None]:
    """The signed bytes of the stored key, which ``obj`` must match.

    Comparing parsed objects is much cheaper than making ``obj``'s canonical
    JSON, and the signature is then checked over the stored key's bytes, so
    what is stored is exactly what was verified. Parsed equality is looser than
    equal bytes (``1 == 1.0 == True``): such an object's own bytes are made
    only if its signature fails, to report the mismatch rather than a bad
    signature (see :attr:`_Check.recheck`).

    Args:
        obj: the uploaded object.
        stored_json: the stored key's JSON text.
        what: the key, as the mismatch error names it.
        own: ``signed_bytes(obj)`` if the caller has made them already.

    Returns:
        The bytes the signature must cover, and what to recheck on failure.
    """
    stored_obj, message = stored_content(stored_json)
    if equal_apart_from_signatures(obj, stored_obj):
        return message, (obj, what)
    if (own if own is not None else signed_bytes(obj)) != message:
        raise ItemFailure(Codes.INVALID_PARAM, _mismatch(what))
    return message, None


def _same_device_content(
    obj: dict[str, Any], device: SignableDevice, device_id: str
) -> tuple[bytes, tuple[dict[str, Any], str] | None]:
    """:func:`_same_content` for a device's keys, without parsing the stored
    JSON when it need not be: if the uploaded object's signed bytes have the
    stored keys' :attr:`~SignableDevice.signed_hash`, they are the stored
    keys' signed bytes. Otherwise (a different object, or a row without the
    hash) the stored keys are compared as :func:`_same_content` does."""
    own = None
    if device.signed_hash is not None:
        own = signed_bytes(obj)
        if signed_digest(own) == device.signed_hash:
            return own, None
    return _same_content(obj, device.key_json, f"keys of device {device_id}", own)


class SignatureHandler:
    """Uploads of detached signatures.

    Args:
        host: the homeserver host.
        store: signature storage.
        clock: the clock.
        verifier: where signatures are checked; one with threads only is made
            if omitted.
    """

    def __init__(
        self,
        host: Host,
        store: SignatureStore,
        clock: Clock,
        verifier: SignatureVerifier | None = None,
    ) -> None:
        self._host = host
        self._store = store
        self._clock = clock
        self._verifier = verifier or SignatureVerifier(host)
        #: Uploads being handled now (this one included).
        self._in_flight = 0

    @property
    def verifier(self) -> SignatureVerifier:
        """The signature verifier (started and stopped by the service)."""
        return self._verifier

    async def upload(self, requester: Requester, body: JsonDict) -> JsonDict:
        """Handle ``POST /keys/signatures/upload``.

        Args:
            requester: the caller.
            body: user id -> key id -> the complete signed object.

        Returns:
            ``{"failures": {user: {key id: {"errcode", "error"}}}}``.
        """
        self._in_flight += 1
        try:
            return await self._upload(requester, body)
        finally:
            self._in_flight -= 1

    async def _upload(self, requester: Requester, body: JsonDict) -> JsonDict:
        for user_id, items in body.items():
            if not isinstance(items, dict):
                raise bad_json(f"'{user_id}' must map key ids to signed objects")
            for key_id, obj in items.items():
                if not isinstance(obj, dict):
                    raise bad_json(f"'{user_id}.{key_id}' must be a signed JSON object")
                sigs = obj.get("signatures", {})
                if not is_signatures(sigs):  # the name is made only for the error
                    require_signatures(sigs, f"{user_id}.{key_id}.signatures")

        me = requester.user_id
        others = [u for u in body if u != me and server_of(u) == self._host.server_name]
        own_items = body.get(me) or {}
        context = await self._store.load_context(
            me, others, _mentioned_devices(me, own_items)
        )
        cross, already_stored = context.cross, context.stored
        own = _OwnKeys.of(me, cross, context.devices)

        failures: dict[str, dict[str, JsonDict]] = {}
        checks: list[_Check] = []

        def fail(user_id: str, key_id: str, errcode: str, error: str) -> None:
            failures.setdefault(user_id, {})[key_id] = {
                "errcode": errcode,
                "error": error,
            }

        for target_user, items in body.items():
            for key_id, obj in items.items():
                try:
                    if target_user == me:
                        checks.extend(self._own_item(own, key_id, obj))
                    else:
                        checks.extend(
                            self._other_item(me, target_user, key_id, obj, cross)
                        )
                except ItemFailure as e:
                    fail(target_user, key_id, e.errcode, e.error)

        # A signature identical to the one stored for the same signing key over
        # the same (unchanged) key was verified when it was stored: rows go
        # when either key changes. It is neither verified nor written again.
        checks = [
            c
            for c in checks
            if already_stored.get(
                (
                    c.pending.target_user_id,
                    c.pending.target_key_id,
                    c.pending.signer_key_id,
                )
            )
            != c.pending.signature
        ]
        bad_items = await self._verify(checks)
        mismatched = {
            c.item: c.recheck[1]
            for c in checks
            if c.item in bad_items
            and c.recheck is not None
            and signed_bytes(c.recheck[0]) != c.message
        }
        for target_user, key_id in sorted(bad_items):
            what = mismatched.get((target_user, key_id))
            if what is not None:
                fail(target_user, key_id, Codes.INVALID_PARAM, _mismatch(what))
            else:
                fail(target_user, key_id, Codes.INVALID_SIGNATURE, "Invalid signature")
        pending = [c for c in checks if c.item not in bad_items]
        stale = await self._store.store(
            [c.pending for c in pending], self._clock.time_msec(), context.versions
        )
        for i in stale:
            user_id, key_id = pending[i].item
            fail(user_id, key_id, Codes.UNKNOWN, "The key changed during the upload")
        stale_set = set(stale)
        stored = [c for i, c in enumerate(pending) if i not in stale_set]
        self._notify(me, stored)
        return {"failures": failures}

    def _notify(self, me: str, stored: list[_Check]) -> None:
        """Announce new signatures as Synapse does."""
        own = sorted(
            {c.pending.target_key_id for c in stored if c.pending.target_user_id == me}
        )
        if own:
            self._host.notify_device_update(me, own)
        others = sorted({c.pending.target_user_id for c in stored} - {me})
        if others:
            # Signatures by a user-signing key are seen by the signer alone.
            self._host.notify_user_signature_update(me, others)

    def _own_item(
        self, own: _OwnKeys, key_id: str, obj: dict[str, Any]
    ) -> list[_Check]:
        me, ssk = own.user_id, own.self_signing
        if own.master is not None and key_id == own.master.public_key:
            return self._device_over_master(
                me, key_id, obj, own.master.key_json, own.devices
            )
        device = own.devices.get(key_id)
        if device is not None:
            if ssk is None:
                raise ItemFailure(
                    Codes.NOT_FOUND, f"No self-signing key found for {me}"
                )
            message, recheck = _same_device_content(obj, device, key_id)
            sig = obj.get("signatures", {}).get(me, {}).get(ssk.key_id)
            if not isinstance(sig, str):
                raise ItemFailure(
                    Codes.INVALID_SIGNATURE,
                    f"No signature by your self-signing key {ssk.key_id}",
                )
            return [
                _Check(
                    (me, key_id),
                    message,
                    ssk.public_key,
                    PendingSignature(
                        me,
                        ssk.key_id,
                        me,
                        key_id,
                        sig,
                        ssk.basis,
                        Basis(me, "device", key_id, device.key_json),
                    ),
                    recheck,
                )
            ]
        if own.master is None:
            raise ItemFailure(
                Codes.NOT_FOUND,
                f"Unknown device {key_id} (and no master key found for {me})",
            )
        raise ItemFailure(
            Codes.NOT_FOUND,
            f"Unknown device or key {key_id}: neither one of your devices with keys "
            "nor your current master key",
        )

    def _device_over_master(
        self,
        me: str,
        key_id: str,
        obj: dict[str, Any],
        master_json: str,
        my_devices: dict[str, SignableDevice],
    ) -> list[_Check]:
        message, recheck = _same_content(obj, master_json, "master key")
        sigs = obj.get("signatures", {}).get(me, {})
        stored_sigs = json.loads(master_json).get("signatures", {}).get(me, {})
        checks = []
        for sig_key_id, sig in sigs.items():
            algorithm, _, device_id = sig_key_id.partition(":")
            if algorithm != "ed25519" or device_id not in my_devices:
                continue  # not by a key the caller holds: not stored
            if stored_sigs.get(sig_key_id) == sig:
                continue  # part of the uploaded master itself
            device_json = my_devices[device_id].key_json
            pub = _device_ed25519(device_json, device_id)
            if pub is None:
                raise ItemFailure(
                    Codes.NOT_FOUND, f"Device {device_id} has no ed25519 key"
                )
            checks.append(
                _Check(
                    (me, key_id),
                    message,
                    pub,
                    PendingSignature(
                        me,
                        sig_key_id,
                        me,
                        key_id,
                        sig,
                        Basis(me, "device", device_id, device_json),
                        Basis(me, MASTER, key_id, master_json),
                    ),
                    recheck,
                )
            )
        if not checks:
            raise ItemFailure(
                Codes.INVALID_SIGNATURE,
                "No signature by one of your devices on your master key",
            )
        return checks

    def _other_item(
        self,
        me: str,
        target_user: str,
        key_id: str,
        obj: dict[str, Any],
        cross: CurrentKeys,
    ) -> list[_Check]:
        usk = cross.get(me, {}).get(USER_SIGNING)
        if usk is None:
            raise ItemFailure(Codes.NOT_FOUND, f"No user-signing key found for {me}")
        server = server_of(target_user)
        if server is None:
            raise ItemFailure(Codes.INVALID_PARAM, f"{target_user} is not a user id")
        if server != self._host.server_name:
            raise ItemFailure(
                Codes.NOT_FOUND,
                f"The master key of {target_user} is not known here (no federation)",
            )
        master = cross.get(target_user, {}).get(MASTER)
        if master is None:
            raise ItemFailure(Codes.NOT_FOUND, f"No master key found for {target_user}")
        if key_id != master.public_key:
            raise ItemFailure(
                Codes.NOT_FOUND,
                f"Unknown key {key_id}: only the current master key of "
                f"{target_user} can be signed",
            )
        message, recheck = _same_content(
            obj, master.key_json, f"master key of {target_user}"
        )
        signer_key_id = f"ed25519:{usk.public_key}"
        sig = obj.get("signatures", {}).get(me, {}).get(signer_key_id)
        if not isinstance(sig, str):
            raise ItemFailure(
                Codes.INVALID_SIGNATURE,
                f"No signature by your user-signing key {signer_key_id}",
            )
        return [
            _Check(
                (target_user, key_id),
                message,
                usk.public_key,
                PendingSignature(
                    me,
                    signer_key_id,
                    target_user,
                    key_id,
                    sig,
                    Basis(me, USER_SIGNING, usk.public_key, usk.key_json),
                    Basis(target_user, MASTER, key_id, master.key_json),
                ),
                recheck,
            )
        ]

    def _alone(self) -> bool:
        """Whether this upload is all the work of this process now: then its
        signatures are checked in threads here (nothing else wants the GIL),
        else large batches go to the verification processes.

        Both counts must say so. The host's count of requests in progress sees
        requests whose bodies are still arriving (when several uploads arrive
        at once, the first one parsed is not the only one); the handler's own
        count sees uploads still being handled after their client has gone.
        """
        in_progress = self._host.requests_in_progress()
        return self._in_flight <= 1 and (in_progress is None or in_progress <= 1)

    async def _verify(self, checks: list[_Check]) -> set[tuple[str, str]]:
        """The items with at least one invalid signature (checked off the
        reactor, see :class:`SignatureVerifier`)."""
        bad = await self._verifier.invalid(
            [(c.message, c.pending.signature, c.public_key) for c in checks],
            alone=self._alone(),
        )
        return {checks[i].item for i in bad}
