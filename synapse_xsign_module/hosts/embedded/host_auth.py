"""Reading the access token from a request."""

from __future__ import annotations

from twisted.web.server import Request

from synapse_xsign_module.errors import Codes, MatrixError


def get_access_token(request: Request) -> str | None:
    """The access token of a request: ``Authorization: Bearer`` or ``?access_token``.

    Raises:
        MatrixError: 401 ``M_MISSING_TOKEN`` for a malformed Authorization header.
    """
    raw = request.getHeader(b"authorization")
    if raw is not None:
        scheme, _, token = raw.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise MatrixError(
                401,
                Codes.MISSING_TOKEN,
                "Invalid Authorization header: expected Bearer",
            )
        return token.strip()
    args = request.args or {}
    values = args.get(b"access_token")
    if values:
        first: bytes = values[0]
        return first.decode("utf-8", "replace")
    return None
