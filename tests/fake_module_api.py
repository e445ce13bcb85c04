"""A hand-written stand-in for Synapse's ``ModuleApi`` (no Synapse, no Mock).

It has only the members the module uses, behaving as Synapse's do:

- ``register_web_resource`` stores resources by path;
- ``get_user_by_req`` reads the access token (``Authorization: Bearer`` or
  ``?access_token=``) and looks it up in :attr:`FakeModuleApi.tokens`, raising
  :class:`FakeSynapseError` 401 ``M_MISSING_TOKEN`` / ``M_UNKNOWN_TOKEN`` like
  Synapse's ``MissingClientTokenError`` / ``InvalidClientTokenError``, and 403
  ``M_GUEST_ACCESS_FORBIDDEN`` for a guest when guests are not allowed;
- ``check_user_exists``, ``is_user_admin``, ``defer_to_threadpool`` and
  ``run_as_background_process``;
- ``_store.get_devices_by_user``: the devices of the tokens' requesters;
- ``_device_handler.notify_device_update`` / ``notify_user_signature_update``,
  recording the notifications;
- ``_auth_handler.validate_user_via_ui_auth``, raising
  :class:`InteractiveAuthIncompleteError` (not a SynapseError, as in Synapse)
  unless the body's ``auth`` holds the password ``secret``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, TypeVar

import attr

from twisted.internet import defer, reactor, threads
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource

T = TypeVar("T")

#: The password the fake's user-interactive auth accepts.
UIA_PASSWORD = "secret"


class FakeSynapseError(Exception):
    """Like Synapse's ``SynapseError``: an HTTP status, an errcode and a message."""

    def __init__(self, code: int, msg: str, errcode: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.errcode = errcode


class InteractiveAuthIncompleteError(Exception):
    """Like Synapse's: the client must complete UIA; ``result`` is the 401 body."""

    def __init__(self, session_id: str, result: dict[str, Any]) -> None:
        super().__init__("Interactive auth not yet complete")
        self.session_id = session_id
        self.result = result


@attr.s(frozen=True, auto_attribs=True)
class FakeUserID:
    """Like Synapse's ``UserID``."""

    localpart: str
    domain: str

    def to_string(self) -> str:
        """The full user id."""
        return f"@{self.localpart}:{self.domain}"


@attr.s(frozen=True, auto_attribs=True)
class FakeRequester:
    """What ``get_user_by_req`` returns."""

    user: FakeUserID
    device_id: str | None = None
    is_guest: bool = False
    app_service_id: str | None = None

    @property
    def user_id(self) -> str:
        """The full user id."""
        return self.user.to_string()


def make_requester(
    user_id: str,
    device_id: str | None = None,
    is_guest: bool = False,
    app_service_id: str | None = None,
) -> FakeRequester:
    """A requester for a full user id."""
    localpart, _, domain = user_id[1:].partition(":")
    return FakeRequester(
        FakeUserID(localpart, domain), device_id, is_guest, app_service_id
    )


@attr.s(auto_attribs=True)
class UIACall:
    """One call of ``validate_user_via_ui_auth``, as recorded by the fake."""

    requester: Any
    body: dict[str, Any]
    description: str
    can_skip_ui_auth: bool
    passed: bool


class FakeAuthHandler:
    """Synapse's ``AuthHandler``, reduced to ``validate_user_via_ui_auth``."""

    def __init__(self) -> None:
        self.calls: list[UIACall] = []
        self._sessions = itertools.count(1)
        #: When set, raised by the next call instead of running UIA.
        self.fail_with: Exception | None = None

    async def validate_user_via_ui_auth(
        self,
        requester: Any,
        request: Any,
        request_body: dict[str, Any],
        description: str,
        can_skip_ui_auth: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Pass when ``auth`` holds the password ``secret``; raise otherwise."""
        auth = request_body.get("auth")
        passed = isinstance(auth, dict) and auth.get("password") == UIA_PASSWORD
        self.calls.append(
            UIACall(requester, request_body, description, can_skip_ui_auth, passed)
        )
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        if not passed:
            session = f"session{next(self._sessions)}"
            raise InteractiveAuthIncompleteError(
                session,
                {
                    "flows": [{"stages": ["m.login.password"]}],
                    "params": {},
                    "session": session,
                },
            )
        return {"type": "m.login.password"}, {}


class FakeDeviceHandler:
    """Synapse's ``DeviceHandler``, reduced to the stream notifications."""

    def __init__(self) -> None:
        #: (user id, device ids) per ``notify_device_update`` call.
        self.device_updates: list[tuple[str, list[str]]] = []
        #: (signer, user ids) per ``notify_user_signature_update`` call.
        self.signature_updates: list[tuple[str, list[str]]] = []

    async def notify_device_update(self, user_id: str, device_ids: list[str]) -> None:
        """Record a device-list change."""
        self.device_updates.append((user_id, list(device_ids)))

    async def notify_user_signature_update(
        self, from_user_id: str, user_ids: list[str]
    ) -> None:
        """Record a user-signature change."""
        self.signature_updates.append((from_user_id, list(user_ids)))


class FakeStore:
    """Synapse's data store, reduced to ``get_devices_by_user``."""

    def __init__(self) -> None:
        #: user id -> device id -> display name (or None).
        self.devices: dict[str, dict[str, str | None]] = {}

    async def get_devices_by_user(self, user_id: str) -> dict[str, dict[str, Any]]:
        """The user's devices, as Synapse returns them."""
        return {
            device_id: {
                "user_id": user_id,
                "device_id": device_id,
                "display_name": name,
            }
            for device_id, name in self.devices.get(user_id, {}).items()
        }


class FakeModuleApi:
    """The members of Synapse's ``ModuleApi`` that the module uses.

    Args:
        server_name: the homeserver's name.
        with_auth_handler: give it ``_auth_handler`` (a Synapse that has it).
        with_device_handler: give it ``_device_handler``.
    """

    def __init__(
        self,
        server_name: str,
        with_auth_handler: bool = True,
        with_device_handler: bool = True,
    ) -> None:
        self.server_name = server_name
        self.resources: dict[str, Resource] = {}
        #: access token -> requester.
        self.tokens: dict[str, Any] = {}
        self.admins: set[str] = set()
        #: How many functions ran through ``defer_to_threadpool``.
        self.threadpool_calls = 0
        #: Descriptions of the background processes started.
        self.background: list[str] = []
        self._store = FakeStore()
        if with_auth_handler:
            self._auth_handler = FakeAuthHandler()
        if with_device_handler:
            self._device_handler = FakeDeviceHandler()

    def register_web_resource(self, path: str, resource: Resource) -> None:
        """Store the resource; a duplicate path is ignored, as Synapse does."""
        self.resources.setdefault(path, resource)

    def add_token(self, token: str, requester: Any) -> None:
        """Make ``token`` authenticate as ``requester`` (and its device exist)."""
        self.tokens[token] = requester
        if requester.device_id is not None:
            devices = self._store.devices.setdefault(requester.user_id, {})
            devices.setdefault(requester.device_id, None)

    async def get_user_by_req(
        self, req: Any, allow_guest: bool = False, allow_expired: bool = False
    ) -> Any:
        """The requester of the request's access token.

        Raises:
            FakeSynapseError: 401 ``M_MISSING_TOKEN`` / ``M_UNKNOWN_TOKEN``, 403
                ``M_GUEST_ACCESS_FORBIDDEN``.
        """
        token: str | None = None
        header = req.getHeader(b"authorization")
        if header is not None:
            scheme, _, value = header.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        elif req.args and req.args.get(b"access_token"):
            token = req.args[b"access_token"][0].decode("ascii")
        if token is None:
            raise FakeSynapseError(401, "Missing access token", "M_MISSING_TOKEN")
        requester = self.tokens.get(token)
        if requester is None:
            raise FakeSynapseError(401, "Unrecognised access token", "M_UNKNOWN_TOKEN")
        if requester.is_guest and not allow_guest:
            raise FakeSynapseError(
                403, "Guest access not allowed", "M_GUEST_ACCESS_FORBIDDEN"
            )
        return requester

    async def check_user_exists(self, user_id: str) -> str | None:
        """The user id if some token of the fake belongs to it, else None."""
        known = {r.user.to_string() for r in self.tokens.values()}
        return user_id if user_id in known else None

    async def is_user_admin(self, user_id: str) -> bool:
        """Whether the user is in :attr:`admins`."""
        return user_id in self.admins

    def run_as_background_process(
        self, desc: str, func: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> defer.Deferred[Any]:
        """Start ``func`` now, without waiting for it."""
        self.background.append(desc)
        return defer.ensureDeferred(func(*args, **kwargs))

    async def defer_to_threadpool(
        self, threadpool: ThreadPool, f: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        """Run ``f`` in ``threadpool``."""
        self.threadpool_calls += 1
        result: T = await threads.deferToThreadPool(
            reactor,  # type: ignore[arg-type]
            threadpool,
            f,
            *args,
            **kwargs,
        )
        return result
