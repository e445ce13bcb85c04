"""``/keys/device_signing/upload``: publishing cross-signing keys.

Order of decisions (spec v1.19 and its digest, sections 4 and 15):

1. Guests are refused.
2. Each key present must be a JSON object of the right shape (``M_BAD_JSON``).
3. If every key present equals the stored key of its role, answer 200 at once:
   the idempotent retry needs no UIA, whatever ``auth`` says.
4. The keys are validated (``M_INVALID_PARAM``, ``M_MISSING_PARAM``,
   ``M_INVALID_SIGNATURE``) and checked against the user's device ids
   (403 "Key ID in use").
5. UIA is required when a master key exists, unless the caller is an
   application service or an admin opened a replacement window.
6. The keys are stored in one transaction that re-checks the state the
   decision was based on.
"""

from __future__ import annotations

import logging
from typing import Any

from synapse_xsign_module.clock import Clock
from synapse_xsign_module.errors import (
    Codes,
    MatrixError,
    bad_json,
    forbidden,
    invalid_param,
)
from synapse_xsign_module.handlers.crypto import (
    has_valid_signature,
    is_ed25519_public_key,
)
from synapse_xsign_module.handlers.validation import (
    require_dict,
    require_signatures,
    require_str,
    require_str_list,
    require_str_map,
)
from synapse_xsign_module.host import Host, Requester
from synapse_xsign_module.http.base import JsonDict
from synapse_xsign_module.jsonutil import canonical_json
from synapse_xsign_module.storage.cross_signing import (
    KEY_TYPES,
    MASTER,
    USER_SIGNING,
    CrossSigningStore,
    IdentityChanged,
    KeyIdInUse,
    NewKey,
    StoredKey,
)

logger = logging.getLogger(__name__)

#: Body field for each key type.
FIELDS = {
    "master": "master_key",
    "self_signing": "self_signing_key",
    "user_signing": "user_signing_key",
}

UIA_DESCRIPTION = "reset the cross-signing keys of your account"


def check_key_shape(obj: Any, field: str) -> dict[str, Any]:
    """JSON types of a CrossSigningKey; wrong types are 400 ``M_BAD_JSON``."""
    key = require_dict(obj, field)
    require_str(key.get("user_id"), f"{field}.user_id")
    require_str_list(key.get("usage"), f"{field}.usage")
    require_str_map(key.get("keys"), f"{field}.keys")
    if "signatures" in key:
        require_signatures(key["signatures"], f"{field}.signatures")
    return key


def check_key_rules(key: dict[str, Any], key_type: str, user_id: str) -> str:
    """The rules of a CrossSigningKey; returns its public key.

    Raises:
        MatrixError: 400 ``M_INVALID_PARAM`` naming the key and the rule.
    """
    field = FIELDS[key_type]
    if key["user_id"] != user_id:
        raise invalid_param(f"{field}: user_id must be the uploading user ({user_id})")
    if key_type not in key["usage"]:
        raise invalid_param(f"{field}: usage must contain '{key_type}'")
    keys = key["keys"]
    if len(keys) != 1:
        raise invalid_param(f"{field}: keys must hold exactly one key")
    ((key_id, value),) = keys.items()
    algorithm, _, version = key_id.partition(":")
    if algorithm != "ed25519":
        raise invalid_param(f"{field}: the key id must be 'ed25519:<public key>'")
    if version != value:
        raise invalid_param(
            f"{field}: the key id must be 'ed25519:' followed by the key itself"
        )
    if not is_ed25519_public_key(value):
        raise invalid_param(
            f"{field}: the key must be a 32-byte ed25519 public key in unpadded base64"
        )
    return str(value)


def _key_id_in_use() -> MatrixError:
    return forbidden("Key ID in use: a public key equals one of your device IDs")


class CrossSigningHandler:
    """Uploads of master, self-signing and user-signing keys.

    Args:
        host: the homeserver host (UIA, device ids, notifications).
        store: cross-signing key storage.
        clock: the clock.
    """

    def __init__(
        self,
        host: Host,
        store: CrossSigningStore,
        clock: Clock,
    ) -> None:
        self._host = host
        self._store = store
        self._clock = clock

    async def upload(
        self, request: Any, requester: Requester, body: JsonDict
    ) -> JsonDict:
        """Handle ``POST /keys/device_signing/upload``.

        Args:
            request: the HTTP request (for UIA).
            requester: the caller.
            body: the request body.

        Returns:
            ``{}`` once the keys are stored (or were already).
        """
        if requester.is_guest:
            raise MatrixError(
                403, Codes.GUEST_ACCESS_FORBIDDEN, "Guest access not allowed"
            )
        user_id = requester.user_id
        auth = body.get("auth")
        if auth is not None and not isinstance(auth, dict):
            raise bad_json("'auth' must be a JSON object")
        sent: dict[str, dict[str, Any]] = {}
        for key_type in KEY_TYPES:
            value = body.get(FIELDS[key_type])
            if value is not None:
                sent[key_type] = check_key_shape(value, FIELDS[key_type])
        sent_json = {kt: canonical_json(k) for kt, k in sent.items()}

        uia_done = False
        for _attempt in range(5):
            current, grant_expiry = await self._store.get_state(user_id)
            if all(
                kt in current and current[kt].key_json == sent_json[kt] for kt in sent
            ):
                return {}  # nothing new: idempotent, no UIA

            new_keys = self._validate(user_id, sent, sent_json, current)
            await self._check_key_ids_free(requester, new_keys)

            now = self._clock.time_msec()
            needs_uia = (
                MASTER in current
                and requester.appservice_id is None
                and not (grant_expiry is not None and grant_expiry > now)
            )
            if needs_uia and not uia_done:
                await self._host.user_interactive_auth(
                    request, requester, body, UIA_DESCRIPTION
                )
                uia_done = True
            expected: dict[str, str | None] = {
                kt: (current[kt].key_json if kt in current else None)
                for kt in KEY_TYPES
            }
            try:
                await self._store.replace_keys(user_id, expected, new_keys, now)
            except KeyIdInUse:
                raise _key_id_in_use() from None
            except IdentityChanged:
                logger.info(
                    "Cross-signing keys of %s changed meanwhile; retrying", user_id
                )
                continue
            logger.info(
                "Stored cross-signing keys %s for %s", sorted(new_keys), user_id
            )
            self._notify(user_id, current, new_keys)
            return {}
        raise MatrixError(
            409, Codes.UNKNOWN, "Cross-signing keys are being changed concurrently"
        )

    def _notify(
        self, user_id: str, current: dict[str, StoredKey], new_keys: dict[str, NewKey]
    ) -> None:
        """Announce the change as Synapse does: master/SSK as pseudo devices."""
        changed = [
            kt
            for kt, key in new_keys.items()
            if kt not in current or current[kt].key_json != key.key_json
        ]
        public = [new_keys[kt].public_key for kt in changed if kt != USER_SIGNING]
        if public:
            self._host.notify_device_update(user_id, public)
        if USER_SIGNING in changed:
            # The USK is private: only its owner hears of it.
            self._host.notify_user_signature_update(user_id, [user_id])

    def _validate(
        self,
        user_id: str,
        sent: dict[str, dict[str, Any]],
        sent_json: dict[str, str],
        current: dict[str, StoredKey],
    ) -> dict[str, NewKey]:
        public: dict[str, str] = {}
        for kt in KEY_TYPES:
            if kt in sent:
                public[kt] = check_key_rules(sent[kt], kt, user_id)
        if MASTER in sent:
            master_pub: str | None = public[MASTER]
        else:
            master_pub = current[MASTER].public_key if MASTER in current else None
        for kt in ("self_signing", "user_signing"):
            if kt not in sent:
                continue
            if master_pub is None:
                raise MatrixError(
                    400, Codes.MISSING_PARAM, "No master signing key is available"
                )
            if not has_valid_signature(
                sent[kt], user_id, f"ed25519:{master_pub}", master_pub
            ):
                raise MatrixError(
                    400,
                    Codes.INVALID_SIGNATURE,
                    f"{FIELDS[kt]} must carry a valid signature by the master key "
                    f"ed25519:{master_pub}",
                )
        return {kt: NewKey(public[kt], sent_json[kt]) for kt in sent}

    async def _check_key_ids_free(
        self, requester: Requester, new_keys: dict[str, NewKey]
    ) -> None:
        """403 when a new public key equals one of the user's device ids.

        The host's devices are checked here, before any UIA; devices with keys
        stored here are checked again inside the write (see
        :func:`replace_keys_txn`), where no upload can slip in between.
        """
        pubs = {k.public_key for k in new_keys.values()}
        devices = set(await self._host.get_device_ids(requester.user_id) or ())
        if requester.device_id:
            devices.add(requester.device_id)
        if pubs & devices:
            raise _key_id_in_use()
