"""The embedded host: a standalone homeserver front for the module."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import threads
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import Request

from synapse_xsign_module.config import XSignConfig
from synapse_xsign_module.errors import Codes, MatrixError
from synapse_xsign_module.host import HostDevices, Requester
from synapse_xsign_module.hosts.embedded.accounts import AccountStore
from synapse_xsign_module.hosts.embedded.host_auth import get_access_token
from synapse_xsign_module.hosts.embedded.site import XSignSite
from synapse_xsign_module.hosts.embedded.token_cache import TokenCache
from synapse_xsign_module.hosts.embedded.uia import UIASessions
from synapse_xsign_module.http.base import JsonDict, UnrecognizedResource, put_resource
from synapse_xsign_module.service import XSignService
from synapse_xsign_module.storage.database import Database

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EmbeddedHost:
    """Hosts the module in its own Twisted web server, with its own accounts.

    Args:
        config: the module configuration.
        reactor: the reactor.
        db: an existing Database (tests); built from the config if omitted.
    """

    def __init__(
        self,
        config: XSignConfig,
        reactor: Any,
        db: Database | None = None,
        workers: int = 1,
    ) -> None:
        self._config = config
        self._reactor = reactor
        self.root = UnrecognizedResource()
        self.service = XSignService(
            config,
            self,
            reactor,
            db=db,
            verification_processes=config.verification_processes_for(
                embedded=True, workers=workers
            ),
        )
        self.accounts = AccountStore(
            self.service.db,
            TokenCache(self.service.clock, config.embedded.token_cache_ms),
        )
        self.uia = UIASessions(
            self.service.db,
            self.accounts,
            config.uia,
            self.service.clock,
            config.embedded.server_name,
        )
        self.changed_users: list[str] = []
        #: The web site serving this host, once it serves (see ``cli``).
        self.site: XSignSite | None = None

    @property
    def shares_reads(self) -> bool:
        """Yes: concurrent requests may share one database read."""
        return True

    @property
    def server_name(self) -> str:
        """The server name of local users."""
        return self._config.embedded.server_name

    def requests_in_progress(self) -> int | None:
        """The site's requests in progress; None until a site serves."""
        return self.site.in_progress if self.site is not None else None

    def mount(self) -> None:
        """Mount the module's endpoints and the host's own, in that order."""
        from synapse_xsign_module.hosts.embedded.resources import mount_host_resources

        self.service.mount()
        mount_host_resources(self)

    def register_resource(self, path: str, resource: Resource) -> None:
        """Serve ``resource`` at ``path``."""
        put_resource(self.root, path, resource)

    async def authenticate(
        self, request: Request, allow_guest: bool = True
    ) -> Requester:
        """Authenticate by access token (hashed lookup)."""
        token = get_access_token(request)
        if token is None:
            raise MatrixError(401, Codes.MISSING_TOKEN, "Missing access token")
        info = await self.accounts.get_token(token)
        if info is None:
            raise MatrixError(401, Codes.UNKNOWN_TOKEN, "Unknown access token")
        return Requester(info.user_id, info.device_id)

    async def is_admin(self, user_id: str) -> bool:
        """Whether the account has the admin flag (and is active)."""
        user = await self.accounts.get_user(user_id)
        return user is not None and user.is_admin and not user.deactivated

    async def user_exists(self, user_id: str) -> bool:
        """Whether the account exists (deactivated accounts included)."""
        return await self.accounts.get_user(user_id) is not None

    async def user_interactive_auth(
        self, request: Request, requester: Requester, body: JsonDict, description: str
    ) -> None:
        """UIA with database-backed sessions (password, optionally dummy)."""
        await self.uia.authenticate(request, requester, body)

    async def get_device_ids(self, user_id: str) -> set[str] | None:
        """The user's devices."""
        return set(await self.accounts.device_ids(user_id))

    async def get_devices(self, user_devices: dict[str, list[str]]) -> HostDevices:
        """Display names set at login (logout removes keys itself)."""
        if not user_devices:
            return HostDevices({})
        return HostDevices(dict(await self.accounts.display_names(user_devices)))

    async def run_in_threadpool(self, pool: ThreadPool, fn: Callable[[], T]) -> T:
        """Run ``fn`` in ``pool``."""
        result: T = await threads.deferToThreadPool(self._reactor, pool, fn)
        return result

    def notify_device_update(self, user_id: str, device_ids: list[str]) -> None:
        """No device-list stream here; remembered for tests and logged."""
        self._remember(user_id)
        logger.debug("Device keys changed for %s: %s", user_id, device_ids)

    def notify_user_signature_update(
        self, from_user_id: str, user_ids: list[str]
    ) -> None:
        """No device-list stream here; remembered for tests and logged."""
        self._remember(from_user_id)
        logger.debug("%s signed the keys of %s", from_user_id, user_ids)

    def _remember(self, user_id: str) -> None:
        self.changed_users.append(user_id)
        del self.changed_users[:-1000]
