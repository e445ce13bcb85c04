"""Errors that become Matrix error responses, and the configuration error.

Every failure the module reports to a client is a :class:`MatrixError`: an HTTP
status, a Matrix ``errcode`` and a human-readable message. The HTTP layer turns
it into ``{"errcode": ..., "error": ...}`` plus any extra fields.
"""

from __future__ import annotations

from typing import Any


class Codes:
    """The Matrix error codes the module uses."""

    UNKNOWN = "M_UNKNOWN"
    UNRECOGNIZED = "M_UNRECOGNIZED"
    FORBIDDEN = "M_FORBIDDEN"
    BAD_JSON = "M_BAD_JSON"
    NOT_JSON = "M_NOT_JSON"
    NOT_FOUND = "M_NOT_FOUND"
    MISSING_TOKEN = "M_MISSING_TOKEN"
    UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"
    MISSING_PARAM = "M_MISSING_PARAM"
    INVALID_PARAM = "M_INVALID_PARAM"
    INVALID_SIGNATURE = "M_INVALID_SIGNATURE"
    TOO_LARGE = "M_TOO_LARGE"
    GUEST_ACCESS_FORBIDDEN = "M_GUEST_ACCESS_FORBIDDEN"
    USER_DEACTIVATED = "M_USER_DEACTIVATED"
    LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"


class ConfigError(Exception):
    """The module's configuration is invalid.

    Args:
        key: dotted path of the offending option, e.g. ``database.url``.
        message: what is wrong with it.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class MatrixError(Exception):
    """An error reported to the client as a Matrix error body.

    Args:
        code: the HTTP status code.
        errcode: the Matrix error code (``M_...``).
        msg: the human-readable ``error`` text.
        extra: additional top-level fields for the body.
    """

    def __init__(
        self,
        code: int,
        errcode: str,
        msg: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code} {errcode}: {msg}")
        self.code = code
        self.errcode = errcode
        self.msg = msg
        self.extra = extra or {}

    def to_dict(self) -> dict[str, Any]:
        """The JSON body for this error."""
        body: dict[str, Any] = dict(self.extra)
        body["errcode"] = self.errcode
        body["error"] = self.msg
        return body


def bad_json(msg: str) -> MatrixError:
    """400 ``M_BAD_JSON``: valid JSON of the wrong shape."""
    return MatrixError(400, Codes.BAD_JSON, msg)


def invalid_param(msg: str) -> MatrixError:
    """400 ``M_INVALID_PARAM``."""
    return MatrixError(400, Codes.INVALID_PARAM, msg)


def forbidden(msg: str) -> MatrixError:
    """403 ``M_FORBIDDEN``."""
    return MatrixError(403, Codes.FORBIDDEN, msg)


def not_found(msg: str) -> MatrixError:
    """404 ``M_NOT_FOUND``."""
    return MatrixError(404, Codes.NOT_FOUND, msg)


class InteractiveAuthIncomplete(Exception):
    """User-interactive auth is not finished; the client gets 401 and ``body``.

    Args:
        body: the UIA response (``flows``, ``params``, ``session`` and, after a
            failed stage, ``errcode``/``error``/``completed``).
    """

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__("user-interactive auth incomplete")
        self.body = body
