"""Every use of Synapse internals, in one place.

Synapse's public ``ModuleApi`` has no helper for user-interactive auth and none
to tell Synapse's device-list stream that keys changed. What the module needs of
those goes through this file, and only this file.
"""

from __future__ import annotations

import logging
from typing import Any

from synapse_xsign_module.errors import InteractiveAuthIncomplete, MatrixError

logger = logging.getLogger(__name__)


class SynapseTooOld(RuntimeError):
    """The running Synapse lacks an internal the module relies on."""


def _auth_handler(api: Any) -> Any:
    handler = getattr(api, "_auth_handler", None)
    if handler is None or not hasattr(handler, "validate_user_via_ui_auth"):
        raise SynapseTooOld(
            "synapse-xsign needs Synapse's AuthHandler.validate_user_via_ui_auth "
            "(ModuleApi._auth_handler); this Synapse does not provide it"
        )
    return handler


def check_synapse_internals(api: Any) -> None:
    """Fail at startup, with a clear message, if an internal is missing.

    Raises:
        SynapseTooOld: the running Synapse lacks what the module uses.
    """
    _auth_handler(api)


def as_matrix_error(exc: BaseException) -> MatrixError | None:
    """Convert a Synapse ``SynapseError`` (duck-typed) into a MatrixError."""
    code = getattr(exc, "code", None)
    errcode = getattr(exc, "errcode", None)
    if isinstance(code, int) and isinstance(errcode, str):
        msg = getattr(exc, "msg", None) or str(exc)
        return MatrixError(code, errcode, str(msg))
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
    handler = _auth_handler(api)
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
