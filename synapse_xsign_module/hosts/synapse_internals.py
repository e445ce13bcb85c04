"""Every use of Synapse internals, in one place.

Synapse's public ``ModuleApi`` has no helper for user-interactive auth, none to
tell Synapse's device-list stream that keys changed, and none to read the
listener configuration. What the module needs of those goes through this file,
and only this file. :func:`check_synapse_internals` runs at startup and fails
with a clear message when the running Synapse lacks something used here.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from synapse_xsign_module.errors import InteractiveAuthIncomplete, MatrixError

logger = logging.getLogger(__name__)

#: The oldest Synapse this adapter has been checked against.
MIN_SYNAPSE_VERSION = (1, 140)

#: Listener resources whose Twisted leaf at /_matrix/client shadows module paths.
SHADOWING_RESOURCES = frozenset({"client", "media"})


class SynapseTooOld(RuntimeError):
    """The running Synapse lacks an internal the module relies on."""


def _parse_version(text: str) -> tuple[int, ...] | None:
    match = re.match(r"^(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def synapse_version() -> str | None:
    """The version of the installed Synapse, or None outside Synapse."""
    try:
        import synapse
    except ImportError:
        return None
    return str(getattr(synapse, "__version__", "") or "") or None


def check_synapse_internals(api: Any, version: str | None = None) -> None:
    """Fail at startup, with a clear message, if something used here is missing.

    Args:
        api: Synapse's ModuleApi.
        version: the Synapse version (read from the ``synapse`` package if
            omitted; None when Synapse is not installed, e.g. unit tests).

    Raises:
        SynapseTooOld: the running Synapse is older than supported, or lacks
            an internal this module uses.
    """
    version = version if version is not None else synapse_version()
    if version is not None:
        parsed = _parse_version(version)
        if parsed is not None and parsed < MIN_SYNAPSE_VERSION:
            wanted = ".".join(map(str, MIN_SYNAPSE_VERSION))
            raise SynapseTooOld(
                f"synapse-xsign needs Synapse {wanted} or newer; this is {version}"
            )
    missing = []
    auth = getattr(api, "_auth_handler", None)
    if auth is None or not hasattr(auth, "validate_user_via_ui_auth"):
        missing.append(
            "AuthHandler.validate_user_via_ui_auth (ModuleApi._auth_handler)"
        )
    device = getattr(api, "_device_handler", None)
    for name in ("notify_device_update", "notify_user_signature_update"):
        if device is None or not hasattr(device, name):
            missing.append(f"DeviceHandler.{name} (ModuleApi._device_handler)")
    if missing:
        raise SynapseTooOld(
            "synapse-xsign uses Synapse internals that this Synapse "
            f"({version or 'unknown version'}) does not provide: " + "; ".join(missing)
        )


def request_runner() -> Any:
    """Synapse's ``run_in_background``: starts a request handler so that the
    request's log context is restored when the handler first waits.

    Falls back to ``ensureDeferred`` where Synapse is not installed (tests with
    a fake ModuleApi).
    """
    try:
        from synapse.logging.context import run_in_background
    except ImportError:
        from synapse_xsign_module.http.base import start_request

        return start_request
    return run_in_background


def as_matrix_error(exc: BaseException) -> MatrixError | None:
    """Convert a Synapse ``SynapseError`` (duck-typed) into a MatrixError."""
    code = getattr(exc, "code", None)
    errcode = getattr(exc, "errcode", None)
    if isinstance(code, int) and isinstance(errcode, str):
        msg = getattr(exc, "msg", None) or str(exc)
        extra: dict[str, Any] = {}
        error_dict = getattr(exc, "error_dict", None)
        if callable(error_dict):
            try:
                full = error_dict(None)
            except Exception:  # an older signature: keep code/errcode/msg
                full = {}
            if isinstance(full, dict):
                # e.g. soft_logout, retry_after_ms: clients act on them.
                extra = {k: v for k, v in full.items() if k not in ("errcode", "error")}
        return MatrixError(code, errcode, str(msg), extra)
    return None


async def validate_user_via_ui_auth(
    api: Any, raw_requester: Any, request: Any, body: dict[str, Any], description: str
) -> None:
    """Run Synapse's own user-interactive auth for a request.

    The server's configured flows (password, SSO, password providers) apply.

    Raises:
        InteractiveAuthIncomplete: Synapse wants another stage (401 body).
        MatrixError: Synapse refused the auth (e.g. 403 for another user).
    """
    handler = api._auth_handler
    try:
        await handler.validate_user_via_ui_auth(
            raw_requester, request, body, description, can_skip_ui_auth=False
        )
    except Exception as e:
        if type(e).__name__ == "InteractiveAuthIncompleteError":
            raise InteractiveAuthIncomplete(dict(e.result)) from None  # type: ignore[attr-defined]
        converted = as_matrix_error(e)
        if converted is not None:
            raise converted from None
        raise


def _in_background(api: Any, desc: str, func: Any, *args: Any) -> None:
    async def run() -> None:
        try:
            await func(*args)
        except Exception:
            logger.exception("Could not notify Synapse (%s) of %r", desc, args)

    runner = getattr(api, "run_as_background_process", None)
    if runner is not None:
        runner(desc, run)
    else:  # pragma: no cover - every supported Synapse has it
        from twisted.internet import defer

        defer.ensureDeferred(run())


def notify_device_update(api: Any, user_id: str, device_ids: list[str]) -> None:
    """Poke Synapse's device-list stream for a user's (pseudo-)devices.

    Users sharing a room with ``user_id`` (and the user) then see them in
    ``/sync`` ``device_lists.changed``.
    """
    if not device_ids:
        return
    _in_background(
        api,
        "xsign_notify_device_update",
        api._device_handler.notify_device_update,
        user_id,
        list(device_ids),
    )


def notify_user_signature_update(
    api: Any, from_user_id: str, user_ids: list[str]
) -> None:
    """Poke Synapse's user-signature stream: the signer sees ``user_ids`` changed."""
    if not user_ids:
        return
    _in_background(
        api,
        "xsign_notify_user_signature_update",
        api._device_handler.notify_user_signature_update,
        from_user_id,
        list(user_ids),
    )


async def get_devices(
    api: Any, user_ids: list[str]
) -> dict[str, dict[str, str | None]]:
    """Synapse's (non-hidden) devices of some users, with display names."""
    store = api._store
    out: dict[str, dict[str, str | None]] = {}
    for user_id in user_ids:
        devices = await store.get_devices_by_user(user_id)
        out[user_id] = {d: info.get("display_name") for d, info in devices.items()}
    return out


def listener_resources(api: Any) -> list[list[str]] | None:
    """Resource names of each HTTP listener of this Synapse process.

    Returns:
        One list of names per HTTP listener, or None if unknown.
    """
    hs = getattr(api, "_hs", None)
    config = getattr(hs, "config", None)
    if config is None:
        return None
    worker_app = getattr(getattr(config, "worker", None), "worker_app", None)
    if worker_app:
        listeners = getattr(config.worker, "worker_listeners", None)
    else:
        listeners = getattr(getattr(config, "server", None), "listeners", None)
    if listeners is None:
        return None
    out = []
    for listener in listeners:
        if getattr(listener, "type", None) != "http":
            continue
        options = getattr(listener, "http_options", None)
        names: list[str] = []
        for resource in getattr(options, "resources", None) or []:
            names.extend(getattr(resource, "names", []) or [])
        out.append(names)
    return out


def key_paths_shadowed(api: Any) -> bool | None:
    """Whether every HTTP listener hides the module's ``/_matrix/client`` paths.

    A listener with the ``client`` or ``media`` resource answers every
    ``/_matrix/client`` request itself, so module paths there are never reached.

    Returns:
        True when no listener can reach the key paths, False when one can,
        None when the listener configuration cannot be read.
    """
    listeners = listener_resources(api)
    if listeners is None:
        return None
    if not listeners:
        return True
    return all(SHADOWING_RESOURCES & set(names) for names in listeners)
