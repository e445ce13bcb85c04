"""The JSON resource base every endpoint is built on.

A :class:`JsonResource` is a Twisted leaf resource with a table of routes
(method + regular expression over the path below its mount point). It turns
every outcome into a JSON response with CORS headers: the handler's result,
a :class:`~synapse_xsign_module.errors.MatrixError`, a UIA challenge, or a 500
for anything unexpected (logged with its traceback, never leaked).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from json.encoder import encode_basestring
from typing import Any
from urllib.parse import unquote

import attr

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from synapse_xsign_module.errors import (
    Codes,
    InteractiveAuthIncomplete,
    MatrixError,
    bad_json,
)
from synapse_xsign_module.jsonutil import compact_json
from synapse_xsign_module.metrics import HTTP_DURATION, HTTP_REQUESTS

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]
Handler = Callable[..., Awaitable[tuple[int, JsonDict]]]
#: Starts the async handling of a request: ``runner(fn, request)`` calls
#: ``fn(request)`` and returns a Deferred. Inside Synapse the host swaps in
#: Synapse's log-context-aware ``run_in_background``.
RequestRunner = Callable[[Callable[[Request], Awaitable[None]], Request], Any]


def start_request(fn: Callable[[Request], Awaitable[None]], request: Request) -> Any:
    """The default :data:`RequestRunner`: a plain ``ensureDeferred``."""
    return defer.ensureDeferred(fn(request))  # type: ignore[arg-type]


CORS_HEADERS = {
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Allow-Methods": b"GET, HEAD, POST, PUT, DELETE, OPTIONS",
    b"Access-Control-Allow-Headers": b"X-Requested-With, Content-Type, Authorization",
    b"Access-Control-Expose-Headers": b"Retry-After",
}


def safe_uri(request: Request) -> str:
    """The request URI for logs, with any ``access_token`` redacted."""
    uri = request.uri.decode("utf-8", "replace")
    if "access_token=" not in uri:
        return uri
    base, _, query = uri.partition("?")
    parts = [
        "access_token=<redacted>" if p.startswith("access_token=") else p
        for p in query.split("&")
    ]
    return base + "?" + "&".join(parts)


def set_cors_headers(request: Request) -> None:
    """Add the CORS headers browser clients need (spec: "Web Browser Clients")."""
    for name, value in CORS_HEADERS.items():
        request.setHeader(name, value)


class RawJson(str):
    """A JSON value that is already encoded (e.g. canonical JSON from storage).

    Inside a :class:`JsonWithRaw` body it is written out as it is, so that a
    stored key is not decoded and encoded again just to be sent.
    """


class JsonWithRaw(dict[str, Any]):
    """A response body whose leaves may be :class:`RawJson`."""


def _encode_with_raw(value: Any, out: list[str]) -> None:
    """Append the JSON text of ``value`` to ``out``, :class:`RawJson` as it is.

    Object keys are strings (as in every body the module builds).
    """
    if isinstance(value, RawJson):
        out.append(value)
    elif isinstance(value, dict) and value:
        sep = "{"
        for key, item in value.items():
            out.append(sep)
            out.append(encode_basestring(key))
            out.append(":")
            if isinstance(item, RawJson):
                out.append(item)
            elif isinstance(item, dict):
                _encode_with_raw(item, out)
            else:
                out.append(compact_json(item))
            sep = ","
        out.append("}")
    else:
        out.append(compact_json(value))


def encode_json(body: Any) -> bytes:
    """Compact UTF-8 JSON, the encoding of every response."""
    if isinstance(body, JsonWithRaw):
        parts: list[str] = []
        _encode_with_raw(body, parts)
        return "".join(parts).encode("utf-8")
    return compact_json(body).encode("utf-8")


def respond(request: Request, code: int, body: JsonDict) -> None:
    """Write a JSON response, unless the client has already gone away.

    Args:
        request: the request to answer.
        code: HTTP status.
        body: a JSON object.
    """
    if request.finished or getattr(request, "_disconnected", False):
        return
    try:
        payload = encode_json(body)
    except (UnicodeEncodeError, ValueError):
        # Never leave a request unanswered: ASCII escapes encode anything.
        payload = json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode()
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(payload)).encode("ascii"))
    request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
    set_cors_headers(request)
    if request.method != b"HEAD":
        request.write(payload)
    request.finish()


def respond_error(request: Request, error: MatrixError) -> None:
    """Write a Matrix error body with its status."""
    respond(request, error.code, error.to_dict())


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: Integers outside this range have no canonical JSON form (spec appendix).
MAX_SAFE_INT = 2**53 - 1
#: Deepest nesting accepted; clients' JSON parsers stop at 128 (serde).
MAX_DEPTH = 64
#: Characters no stored string may hold: NUL (PostgreSQL text cannot store it)
#: and lone surrogates (not encodable as UTF-8).
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
# Escapes in JSON text that can produce what _BAD_CHARS finds.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


class _Unacceptable(ValueError):
    """Valid JSON the module will not take (reported as M_BAD_JSON)."""


def _parse_int(text: str) -> int:
    value = int(text)
    if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        raise _Unacceptable(f"integer {text[:40]} is outside the canonical JSON range")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise _Unacceptable(f"number {text[:40]} is not finite")
    return value


def check_json_value(value: Any, strings: bool = True, depth: bool = True) -> None:
    """Refuse what parses but cannot be stored, signed or served safely.

    Args:
        value: the parsed JSON value.
        strings: check strings and keys for NUL and lone surrogates.
        depth: check the nesting depth.

    Raises:
        MatrixError: 400 ``M_BAD_JSON`` for nesting deeper than
            :data:`MAX_DEPTH`, or a string (or key) holding NUL or a lone
            surrogate.
    """
    if not strings:
        if depth and _too_deep(value):
            raise bad_json(f"JSON nested deeper than {MAX_DEPTH} levels")
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if depth and level > MAX_DEPTH:
            raise bad_json(f"JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key, item in node.items():
                if strings and _BAD_CHARS.search(key):
                    raise bad_json("JSON strings must not hold NUL or lone surrogates")
                if isinstance(item, (dict, list)):
                    stack.append((item, level + 1))
                elif strings and isinstance(item, str) and _BAD_CHARS.search(item):
                    raise bad_json("JSON strings must not hold NUL or lone surrogates")
        elif isinstance(node, list):
            for item in node:
                if isinstance(item, (dict, list)):
                    stack.append((item, level + 1))
                elif strings and isinstance(item, str) and _BAD_CHARS.search(item):
                    raise bad_json("JSON strings must not hold NUL or lone surrogates")


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests containers deeper than :data:`MAX_DEPTH` (the
    value itself is level 1).

    Level by level, looking only at containers: about a third of the cost of
    the general walk of :func:`check_json_value`, which visits every item
    (about 0.3 ms for a 500-device signature upload).
    """
    level: list[Any] = [value] if type(value) in (dict, list) else []
    depth = 1
    while level:
        if depth > MAX_DEPTH:
            return True
        inner: list[Any] = []
        for node in level:
            for item in node.values() if type(node) is dict else node:
                if type(item) is dict or type(item) is list:
                    inner.append(item)
        level = inner
        depth += 1
    return False


def check_json_text(text: str, value: Any) -> None:
    """:func:`check_json_value`, doing only the checks the raw text calls for.

    The parsed strings can hold NUL or a surrogate only where the text has a
    ``\\u0000`` or ``\\uD800``-``\\uDFFF`` escape (raw ones cannot pass the UTF-8
    decoding or the parser); nesting can only exceed :data:`MAX_DEPTH` if the
    text has more than that many brackets.
    """
    check_json_value(
        value,
        strings=_SUSPECT_ESCAPE.search(text) is not None,
        depth=text.count("{") + text.count("[") > MAX_DEPTH,
    )


def read_json_body(request: Request, max_size: int) -> JsonDict:
    """Parse the request body as a JSON object within the size limit.

    Args:
        request: the request.
        max_size: largest body accepted, in bytes.

    Returns:
        The JSON object (an empty body counts as ``{}``).

    Raises:
        MatrixError: 413 ``M_TOO_LARGE`` over the limit, 400 ``M_NOT_JSON``
            for something that is not JSON, 400 ``M_BAD_JSON`` for JSON that
            is not an object.
    """
    check_body_size(request, max_size)
    content = request.content
    if content is None:
        return {}
    content.seek(0)
    raw = content.read(max_size + 1)
    if len(raw) > max_size:
        raise too_large(max_size)
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
        body = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except _Unacceptable as e:
        raise bad_json(str(e)) from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise MatrixError(400, Codes.NOT_JSON, "Content not JSON.") from None
    if not isinstance(body, dict):
        raise bad_json("Content must be a JSON object.")
    check_json_text(text, body)
    return body


def too_large(max_size: int) -> MatrixError:
    """The 413 error for a body over ``max_size`` bytes."""
    return MatrixError(
        413, Codes.TOO_LARGE, f"Request content is too large (>{max_size} bytes)"
    )


def check_body_size(request: Request, max_size: int) -> None:
    """Refuse a body that is, or says it is, larger than ``max_size``.

    The embedded host's request class stops buffering at the limit and flags the
    request; behind Synapse the declared ``Content-Length`` is checked.
    """
    if getattr(request, "xsign_body_too_large", False):
        raise too_large(max_size)
    length = request.getHeader(b"content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise MatrixError(400, Codes.UNKNOWN, "Invalid Content-Length") from None
        if declared > max_size:
            raise too_large(max_size)


@attr.s(frozen=True, auto_attribs=True, slots=True)
class Route:
    """One route of a :class:`JsonResource`.

    Attributes:
        method: HTTP method, e.g. ``POST``.
        pattern: compiled regex matched against the path below the mount point
            (no leading slash); named groups become handler keyword arguments.
        handler: ``async (request, **groups) -> (status, body)``.
    """

    method: str
    pattern: re.Pattern[str]
    handler: Handler


class JsonResource(Resource):
    """A leaf resource that routes to async handlers and speaks Matrix JSON.

    Subclasses (or owners) add routes with :meth:`add_route`.
    """

    isLeaf = True

    def __init__(self, name: str = "other") -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        #: The endpoint's name in metrics (e.g. ``keys/query``).
        self.name = name
        self._routes: list[Route] = []
        #: How requests are started; see :data:`RequestRunner`.
        self.request_runner: RequestRunner = start_request

    def add_route(self, method: str, pattern: str, handler: Handler) -> None:
        """Add a route.

        Args:
            method: HTTP method.
            pattern: regex over the path below the mount point, anchored at both
                ends automatically.
            handler: the async handler.
        """
        self._routes.append(Route(method, re.compile(f"^{pattern}$"), handler))

    def render(self, request: Request) -> int:
        """Dispatch a request; always answers asynchronously with JSON."""
        request.render_deferred = self.request_runner(  # type: ignore[attr-defined]
            self._dispatch, request
        )
        return NOT_DONE_YET

    async def _dispatch(self, request: Request) -> None:
        start = time.monotonic()
        try:
            await self._dispatch_inner(request)
        finally:
            method = request.method.decode("ascii", "replace")
            HTTP_REQUESTS.labels(self.name, method, str(request.code)).inc()
            HTTP_DURATION.labels(self.name).observe(time.monotonic() - start)

    async def _dispatch_inner(self, request: Request) -> None:
        try:
            method = request.method.decode("ascii")
            if method == "OPTIONS":
                respond(request, 200, {})
                return
            path = "/".join(
                seg.decode("utf-8", "replace") for seg in request.postpath or []
            )
            path = path.rstrip("/") if path != "/" else ""
            lookup = "GET" if method == "HEAD" else method
            matched_path = False
            for route in self._routes:
                m = route.pattern.match(path)
                if m is None:
                    continue
                matched_path = True
                if route.method != lookup:
                    continue
                params = {k: unquote(v) for k, v in m.groupdict().items()}
                code, body = await route.handler(request, **params)
                respond(request, code, body)
                return
            if matched_path:
                raise MatrixError(405, Codes.UNRECOGNIZED, "Unrecognized request")
            raise MatrixError(404, Codes.UNRECOGNIZED, "Unrecognized request")
        except MatrixError as e:
            if e.code >= 500:
                logger.error("%s %s failed: %s", request.method, safe_uri(request), e)
            respond_error(request, e)
        except InteractiveAuthIncomplete as e:
            respond(request, 401, e.body)
        except defer.CancelledError:
            logger.info("Request %s cancelled", safe_uri(request))
        except Exception:
            logger.error(
                "Unhandled error serving %s %r:\n%s",
                request.method,
                safe_uri(request),
                Failure().getTraceback(),
            )
            respond(
                request,
                500,
                {"errcode": Codes.UNKNOWN, "error": "Internal server error"},
            )


class NotFoundResource(Resource):
    """A leaf that answers every request with JSON 404 ``M_UNRECOGNIZED``.

    A CORS preflight gets an empty 200 instead, as browsers need.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render(self, request: Request) -> bytes:
        """404 ``M_UNRECOGNIZED`` (or an empty 200 for OPTIONS)."""
        if request.method == b"OPTIONS":
            respond(request, 200, {})
        else:
            respond_error(
                request, MatrixError(404, Codes.UNRECOGNIZED, "Unrecognized request")
            )
        return NOT_DONE_YET  # type: ignore[return-value]


class UnrecognizedResource(NotFoundResource):
    """An intermediate path node: known children, and JSON 404 for the rest.

    Used for the intermediate segments of the embedded host's tree (as Synapse
    does), so that unknown paths get ``M_UNRECOGNIZED`` and not Twisted's HTML.
    Unknown children are a separate leaf, so that an unknown segment never lets
    a later segment reach a sibling (``keys/x/upload`` is not ``keys/upload``).
    """

    isLeaf = False

    def getChild(self, path: bytes, request: Request) -> Resource:
        """Every unknown child is a JSON 404 leaf."""
        return NotFoundResource()


def put_resource(root: Resource, path: str, resource: Resource) -> None:
    """Attach ``resource`` at ``path`` under ``root``, making missing nodes.

    Args:
        root: the tree's root.
        path: an absolute path such as ``/_matrix/client/v3/keys/upload``.
        resource: the resource to serve there.
    """
    segments = [s.encode("utf-8") for s in path.strip("/").split("/")]
    node = root
    for seg in segments[:-1]:
        child = node.children.get(seg)
        if child is None:
            child = UnrecognizedResource()
            node.putChild(seg, child)  # type: ignore[arg-type]
        node = child
    node.putChild(segments[-1], resource)  # type: ignore[arg-type]
