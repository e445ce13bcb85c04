"""The Synapse host: the module loaded from ``modules:`` in ``homeserver.yaml``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import threads
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import Request

from synapse_xsign_module.config import XSignConfig, parse_config
from synapse_xsign_module.errors import (
    ConfigError,
    InteractiveAuthIncomplete,
    bad_json,
    forbidden,
)
from synapse_xsign_module.host import HostDevices, Requester
from synapse_xsign_module.hosts import synapse_internals
from synapse_xsign_module.http.base import JsonDict, JsonResource
from synapse_xsign_module.jsonutil import body_hash
from synapse_xsign_module.service import XSignService
from synapse_xsign_module.storage.uia_bindings import BindingMismatch, UIABindingStore

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SynapseHost:
    """The Host interface over Synapse's ``ModuleApi``.

    Args:
        api: Synapse's ModuleApi (or a fake with the same members).
        reactor: the reactor.
    """

    def __init__(self, api: Any, reactor: Any) -> None:
        self._api = api
        self._reactor = reactor
        #: Set by XSignModule once the module's database exists.
        self.uia_bindings: UIABindingStore | None = None

    @property
    def server_name(self) -> str:
        """Synapse's server name."""
        return str(self._api.server_name)

    @property
    def shares_reads(self) -> bool:
        """No: every database call runs in its request's log context."""
        return False

    def requests_in_progress(self) -> int | None:
        """Not known: Synapse serves its other endpoints on the same reactor."""
        return None

    def register_resource(self, path: str, resource: Resource) -> None:
        """Register through ``ModuleApi.register_web_resource``."""
        if isinstance(resource, JsonResource):
            resource.request_runner = synapse_internals.request_runner()
        self._api.register_web_resource(path, resource)

    async def authenticate(
        self, request: Request, allow_guest: bool = True
    ) -> Requester:
        """Authenticate with Synapse's ``get_user_by_req``."""
        try:
            raw = await self._api.get_user_by_req(request, allow_guest=allow_guest)
        except Exception as e:
            converted = synapse_internals.as_matrix_error(e)
            if converted is not None:
                raise converted from None
            raise
        user = getattr(raw, "user", None)
        user_id = raw.user_id if hasattr(raw, "user_id") else user.to_string()  # type: ignore[union-attr]
        appservice_id = getattr(raw, "app_service_id", None)
        if appservice_id is None and getattr(raw, "app_service", None) is not None:
            appservice_id = raw.app_service.id
        return Requester(
            user_id=str(user_id),
            device_id=raw.device_id,
            is_guest=bool(raw.is_guest),
            appservice_id=appservice_id,
            raw=raw,
        )

    async def is_admin(self, user_id: str) -> bool:
        """``ModuleApi.is_user_admin``."""
        return bool(await self._api.is_user_admin(user_id))

    async def user_exists(self, user_id: str) -> bool:
        """``ModuleApi.check_user_exists``."""
        return await self._api.check_user_exists(user_id) is not None

    async def user_interactive_auth(
        self, request: Request, requester: Requester, body: JsonDict, description: str
    ) -> None:
        """Synapse's own UIA, its sessions bound to one request body, used once.

        Synapse checks only a session's endpoint and keeps a completed session
        for 48 hours; the module records the body each session started with
        and lets a completed session authorise that body once.
        """
        if self.uia_bindings is None:
            raise RuntimeError("the Synapse host was not given its UIA binding store")
        bindings = self.uia_bindings
        digest = body_hash(body)
        uri = request.path.decode("utf-8", "replace")
        now = int(self._reactor.seconds() * 1000)
        auth = body.get("auth")
        session = auth.get("session") if isinstance(auth, dict) else None
        if session is not None and not isinstance(session, str):
            raise bad_json("'auth.session' must be a string")
        try:
            if session is not None:
                await bindings.bind(session, requester.user_id, uri, digest, now)
            try:
                await synapse_internals.validate_user_via_ui_auth(
                    self._api, requester.raw, request, body, description
                )
            except InteractiveAuthIncomplete as e:
                started = e.body.get("session")
                if isinstance(started, str) and started != session:
                    await bindings.bind(started, requester.user_id, uri, digest, now)
                raise
            if session is not None:
                await bindings.use(session, requester.user_id, uri, digest, now)
        except BindingMismatch:
            raise forbidden(
                "This authentication session belongs to another request or was "
                "already used; start a new one"
            ) from None

    async def get_device_ids(self, user_id: str) -> set[str] | None:
        """The user's devices in Synapse."""
        devices = await synapse_internals.get_devices(self._api, [user_id])
        return set(devices.get(user_id, {}))

    async def get_devices(self, user_devices: dict[str, list[str]]) -> HostDevices:
        """Synapse's devices of these users: names, and which still exist."""
        devices = await synapse_internals.get_devices(self._api, list(user_devices))
        names = {
            u: {d: n for d, n in devs.items() if n is not None}
            for u, devs in devices.items()
        }
        return HostDevices(names, {u: set(devs) for u, devs in devices.items()})

    async def run_in_threadpool(self, pool: ThreadPool, fn: Callable[[], T]) -> T:
        """``ModuleApi.defer_to_threadpool`` where Synapse has it (log contexts)."""
        runner = getattr(self._api, "defer_to_threadpool", None)
        if runner is not None:
            result: T = await runner(pool, fn)
            return result
        out: T = await threads.deferToThreadPool(self._reactor, pool, fn)
        return out

    def notify_device_update(self, user_id: str, device_ids: list[str]) -> None:
        """Poke Synapse's device-list stream (``/sync`` ``device_lists``)."""
        synapse_internals.notify_device_update(self._api, user_id, device_ids)

    def notify_user_signature_update(
        self, from_user_id: str, user_ids: list[str]
    ) -> None:
        """Poke Synapse's user-signature stream (the signer's ``/sync``)."""
        synapse_internals.notify_user_signature_update(
            self._api, from_user_id, user_ids
        )


class XSignModule:
    """The module class named in ``homeserver.yaml``::

        modules:
          - module: synapse_xsign_module.XSignModule
            config: {...}

    Args:
        config: the parsed configuration (from :meth:`parse_config`).
        api: Synapse's ModuleApi.
        reactor: the reactor (tests); Synapse's global reactor by default.
    """

    def __init__(self, config: XSignConfig, api: Any, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        synapse_internals.check_synapse_internals(api)
        self.host = SynapseHost(api, reactor)
        self.service = XSignService(
            config,
            self.host,
            reactor,
            verification_processes=config.verification_processes_for(embedded=False),
        )
        self.host.uia_bindings = UIABindingStore(self.service.db)
        self.service.start()
        self.paths = self.service.mount()
        logger.info("synapse-xsign registered %d paths", len(self.paths))
        shadowed = synapse_internals.key_paths_shadowed(api)
        self.service.admin.status["key_paths_shadowed"] = shadowed
        if shadowed:
            logger.warning(
                "synapse-xsign: every HTTP listener of this process has the 'client' "
                "or 'media' resource, so Synapse answers /_matrix/client/*/keys/* "
                "itself and this module's key endpoints are never reached. Add a "
                "listener without 'client' (resources: []) and route the key paths "
                "to it in the reverse proxy (README: 'Running inside Synapse')."
            )

    @staticmethod
    def parse_config(config: dict[str, Any]) -> XSignConfig:
        """Parse the ``config:`` block; errors name the offending key."""
        try:
            return parse_config(config)
        except ConfigError as e:
            try:
                from synapse.module_api.errors import ConfigError as SynapseConfigError
            except ImportError:
                raise e from None
            raise SynapseConfigError(e.message, (e.key,)) from None
