"""The narrow interface the module needs from the homeserver that hosts it.

Two implementations exist: the Synapse host (``hosts/synapse.py``), over
Synapse's ``ModuleApi``, and the embedded host (``hosts/embedded/``), a small
standalone server with its own accounts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attr

from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import Request

from synapse_xsign_module.http.base import JsonDict

T = TypeVar("T")


@attr.s(frozen=True, auto_attribs=True, slots=True)
class Requester:
    """Who made a request.

    Attributes:
        user_id: the authenticated user.
        device_id: the device the access token belongs to, if any.
        is_guest: a guest account.
        appservice_id: the application service that made the request, if any.
        raw: the host's own requester object (the Synapse host hands it back
            to Synapse for user-interactive auth).
    """

    user_id: str
    device_id: str | None = None
    is_guest: bool = False
    appservice_id: str | None = None
    raw: Any = attr.ib(default=None, eq=False, repr=False)


@attr.s(frozen=True, auto_attribs=True, slots=True)
class HostDevices:
    """What the host knows of some devices.

    Attributes:
        names: user -> device -> display name, for devices that have one.
        existing: user -> the device ids that still exist, when the host keeps
            devices apart from the module (Synapse: a device deleted there must
            not be served); None when the module is told of every deletion.
    """

    names: dict[str, dict[str, str]]
    existing: dict[str, set[str]] | None = None


class Host(Protocol):
    """What the module asks of its host."""

    @property
    def server_name(self) -> str:
        """The server name of local users."""

    @property
    def shares_reads(self) -> bool:
        """Whether concurrent requests may share one database read.

        A shared read answers every request from the completion of one
        database call; Synapse's log contexts follow each request through
        its own calls, so inside Synapse each request reads on its own.
        """

    def requests_in_progress(self) -> int | None:
        """How many HTTP requests this process is receiving or handling now,
        this one included, if the host can tell (the embedded host counts
        its own from the request line on); None if it cannot."""

    def register_resource(self, path: str, resource: Resource) -> None:
        """Serve ``resource`` at ``path`` (an exact, absolute path)."""

    async def authenticate(
        self, request: Request, allow_guest: bool = True
    ) -> Requester:
        """Authenticate the request's access token.

        Raises:
            MatrixError: 401 ``M_MISSING_TOKEN`` / ``M_UNKNOWN_TOKEN``; 403
                ``M_GUEST_ACCESS_FORBIDDEN`` for a guest where not allowed.
        """

    async def is_admin(self, user_id: str) -> bool:
        """Whether ``user_id`` is a server admin."""

    async def user_exists(self, user_id: str) -> bool:
        """Whether ``user_id`` is a known local account."""

    async def user_interactive_auth(
        self,
        request: Request,
        requester: Requester,
        body: JsonDict,
        description: str,
    ) -> None:
        """Run user-interactive auth for this request; return when it is done.

        Raises:
            InteractiveAuthIncomplete: the client must complete a stage (401).
            MatrixError: the auth failed for good (e.g. 403 for another user).
        """

    async def get_device_ids(self, user_id: str) -> set[str] | None:
        """The user's device ids as the host knows them, or None if unknown."""

    async def get_devices(self, user_devices: dict[str, list[str]]) -> HostDevices:
        """What the host knows of the given devices (names, existence)."""

    async def run_in_threadpool(self, pool: ThreadPool, fn: Callable[[], T]) -> T:
        """Run ``fn`` in ``pool`` and return its result."""

    def notify_device_update(self, user_id: str, device_ids: list[str]) -> None:
        """Tell the homeserver's device-list stream that keys changed.

        ``device_ids`` are device ids, or cross-signing public keys for a
        master / self-signing key change (as Synapse does). Fire and forget.
        """

    def notify_user_signature_update(
        self, from_user_id: str, user_ids: list[str]
    ) -> None:
        """Tell the homeserver that ``from_user_id`` signed these users' keys.

        Only the signer is told (a user-signing key is private). Fire and forget.
        """
