"""The module itself, independent of its host: stores, handlers and routes."""

from __future__ import annotations

import logging
from typing import Any

from synapse_xsign_module.clock import Clock
from synapse_xsign_module.config import XSignConfig
from synapse_xsign_module.handlers.admin import AdminHandler
from synapse_xsign_module.handlers.cross_signing import CrossSigningHandler
from synapse_xsign_module.handlers.device_keys import DeviceKeysHandler
from synapse_xsign_module.handlers.query_cache import UserKeysCache
from synapse_xsign_module.handlers.signatures import SignatureHandler
from synapse_xsign_module.handlers.verification import SignatureVerifier
from synapse_xsign_module.host import Host
from synapse_xsign_module.http.admin import ADMIN_PREFIX, build_admin_resource
from synapse_xsign_module.http.base import JsonResource
from synapse_xsign_module.http.keys import register_key_resources
from synapse_xsign_module.storage import migrate
from synapse_xsign_module.storage.admin import AdminStore
from synapse_xsign_module.storage.cross_signing import CrossSigningStore
from synapse_xsign_module.storage.database import Database
from synapse_xsign_module.storage.device_keys import DeviceKeyStore
from synapse_xsign_module.storage.query import QueryStore
from synapse_xsign_module.storage.signatures import SignatureStore

logger = logging.getLogger(__name__)


class XSignService:
    """Builds the module's layers for a host and mounts its endpoints.

    Args:
        config: the parsed configuration.
        host: the homeserver host.
        reactor: the reactor.
        db: an existing Database (tests); built from the config if omitted.
        verification_processes: worker processes for large signature batches
            (the host resolves the configured value, see
            :meth:`XSignConfig.verification_processes_for`).
    """

    def __init__(
        self,
        config: XSignConfig,
        host: Host,
        reactor: Any,
        db: Database | None = None,
        verification_processes: int = 0,
    ) -> None:
        self.config = config
        self.host = host
        self.reactor = reactor
        self.clock = Clock(reactor)
        self.db = db or Database(
            config.database, reactor, runner=host.run_in_threadpool
        )
        self.device_key_store = DeviceKeyStore(self.db)
        self.cross_signing_store = CrossSigningStore(
            self.db, share_reads=host.shares_reads
        )
        self.signature_store = SignatureStore(self.db)
        self.query_store = QueryStore(self.db)
        self.key_query_cache = UserKeysCache(config.key_query_cache_mb * 1024 * 1024)
        self.device_keys = DeviceKeysHandler(
            host,
            self.device_key_store,
            self.query_store,
            self.clock,
            self.key_query_cache,
        )
        self.cross_signing = CrossSigningHandler(
            host, self.cross_signing_store, self.clock
        )
        self.signatures = SignatureHandler(
            host,
            self.signature_store,
            self.clock,
            SignatureVerifier(host, verification_processes),
        )
        self.schema_version: str | None = None
        self.admin = AdminHandler(
            host,
            config,
            AdminStore(self.db),
            self.cross_signing_store,
            self.clock,
            lambda: self.schema_version,
            self.db.engine_name,
        )
        self.admin_resource: JsonResource | None = None
        self._started = False

    def migrate(self) -> str:
        """Apply pending migrations (synchronously, at startup).

        Returns:
            The schema revision afterwards.
        """
        self.schema_version = migrate.upgrade(self.db.engine)
        return self.schema_version

    def start(self) -> None:
        """Migrate, start the thread pools and stop them at reactor shutdown."""
        if self._started:
            return
        self.migrate()
        self.db.start()
        self.signatures.verifier.pool.start()
        self.reactor.addSystemEventTrigger(
            "during", "shutdown", self.signatures.verifier.stop
        )
        self._started = True
        logger.info(
            "synapse-xsign ready: database %s (%s), schema %s",
            self.db.describe(),
            self.db.engine_name,
            self.schema_version,
        )

    def stop(self) -> None:
        """Stop the thread pools (tests; the reactor does it on shutdown)."""
        self.signatures.verifier.stop()
        self.db.close()
        self._started = False

    def mount(self) -> list[str]:
        """Register every endpoint with the host; returns the paths."""
        paths = register_key_resources(self.host, self)
        self.admin_resource = build_admin_resource(self)
        self.host.register_resource(ADMIN_PREFIX, self.admin_resource)
        paths.append(ADMIN_PREFIX)
        return paths
