"""The embedded host's web site: request size limit and access log."""

from __future__ import annotations

import logging
import tempfile
import time
from io import BytesIO
from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from synapse_xsign_module.http.base import safe_uri

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("synapse_xsign_module.access")

#: Request bodies up to this size are buffered in memory, larger ones in a
#: temporary file.
MEMORY_BODY = 1024 * 1024


class XSignRequest(Request):
    """A request that stops buffering its body past the configured limit.

    The JSON layer then answers 413 ``M_TOO_LARGE`` without the rest of the body
    ever being held in memory.
    """

    max_body: int = 8 * 1024 * 1024

    def __init__(self, channel: HTTPChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)  # type: ignore[no-untyped-call]
        # Every body here is JSON: never parse a POST body as HTML form data
        # (Twisted would first parse its Content-Type with the email package,
        # a cost on every POST).
        self._parsePOSTFormSubmission = False
        self.xsign_body_too_large = False
        self._body_seen = 0
        self._start = time.monotonic()
        site = getattr(channel, "site", None)
        if isinstance(site, XSignSite):
            site.request_started(self)

    def gotLength(self, length: int | None) -> None:
        """Flag a declared length over the limit before any body arrives, and
        choose where the body is buffered.

        Twisted writes a body of 100 kB or more (or of unknown length) to a
        temporary file, then it is read back whole to be parsed. A body
        declared at up to :data:`MEMORY_BODY` is kept in memory instead (a
        500-device signature upload is 300 kB); a longer or chunked one moves
        to a file once past that size, so slow senders of large bodies do not
        hold many megabytes of memory each.
        """
        if length is not None and length > self.max_body:
            self.xsign_body_too_large = True
            self.content = BytesIO()  # stays empty: nothing is buffered
        elif length is not None and length <= MEMORY_BODY:
            self.content = BytesIO()
        else:
            self.content = tempfile.SpooledTemporaryFile(max_size=MEMORY_BODY)

    def handleContentChunk(self, data: bytes) -> None:
        """Buffer body data only while under the limit."""
        self._body_seen += len(data)
        if self.xsign_body_too_large or self._body_seen > self.max_body:
            self.xsign_body_too_large = True
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def client_address(self, trust_forwarded: bool) -> str:
        """The client's address, from ``X-Forwarded-For`` when trusted."""
        if trust_forwarded:
            forwarded = self.getHeader(b"x-forwarded-for")
            if forwarded:
                return forwarded.decode("latin-1").split(",")[0].strip()
        peer = self.getClientAddress()  # type: ignore[no-untyped-call]
        return str(getattr(peer, "host", peer))


class XSignSite(Site):
    """A Site with the module's request class and a one-line access log.

    Args:
        root: the resource tree.
        max_body: the request body limit in bytes.
        x_forwarded: trust ``X-Forwarded-For`` for the logged client address.
        access_log: log one line per request.
    """

    def __init__(
        self, root: Resource, max_body: int, x_forwarded: bool, access_log: bool
    ) -> None:
        limit = max_body

        class _Request(XSignRequest):
            max_body = limit

        super().__init__(root, requestFactory=_Request)  # type: ignore[no-untyped-call]
        self._x_forwarded = x_forwarded
        self._access_log = access_log
        self.noisy = False
        #: Requests received from their request line on, not yet answered
        #: (or whose connection is not yet lost).
        self.in_progress = 0

    def request_started(self, request: Request) -> None:
        """Count a request in progress until it is finished or its connection
        is lost."""
        self.in_progress += 1
        request.notifyFinish().addBoth(self._request_ended)

    def _request_ended(self, _: object) -> None:
        self.in_progress -= 1

    def log(self, request: Any) -> None:
        """Write the access-log line (tokens in the query string are masked)."""
        if not self._access_log or not isinstance(request, XSignRequest):
            return
        uri = safe_uri(request)
        access_logger.info(
            "%s - %s %s %d %dB %.3fs",
            request.client_address(self._x_forwarded),
            request.method.decode("ascii", "replace"),
            uri,
            request.code,
            request.sentLength,
            time.monotonic() - request._start,
        )
