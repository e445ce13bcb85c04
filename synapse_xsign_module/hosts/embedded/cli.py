"""The ``synapse-xsign`` command: run the embedded host, migrate, add users."""

from __future__ import annotations

import argparse
import gc
import getpass
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import yaml
from sqlalchemy.exc import OperationalError

from synapse_xsign_module import __version__
from synapse_xsign_module.config import XSignConfig, parse_config
from synapse_xsign_module.errors import ConfigError
from synapse_xsign_module.handlers.validation import server_of
from synapse_xsign_module.hosts.embedded.accounts import upsert_user_txn
from synapse_xsign_module.hosts.embedded.passwords import hash_password
from synapse_xsign_module.storage import migrate
from synapse_xsign_module.storage.database import Database

logger = logging.getLogger("synapse_xsign_module")


def load_config(path: str) -> XSignConfig:
    """Read and parse a YAML config file holding the module's mapping.

    Raises:
        ConfigError: unreadable file, bad YAML, or an invalid option.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML: {e}") from None
    return parse_config(raw)


def _setup_logging(level: str, worker: str | None = None) -> None:
    prefix = f"[{worker}] " if worker else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_run(config: XSignConfig, listen_fd: int | None = None, workers: int = 1) -> int:
    """Start the embedded host and serve until SIGTERM/SIGINT.

    Args:
        config: the configuration.
        listen_fd: an inherited listening socket (a worker of ``--workers``);
            otherwise the configured address and port are bound.
        workers: the server processes of ``--workers`` (they share the
            cores, see :meth:`XSignConfig.verification_processes_for`).
    """
    import socket

    from twisted.internet import reactor

    from synapse_xsign_module.hosts.embedded.host import EmbeddedHost
    from synapse_xsign_module.hosts.embedded.site import XSignSite

    r: Any = reactor
    host = EmbeddedHost(config, r, workers=workers)
    try:
        host.service.start()
    except OperationalError as e:
        logger.error(
            "Cannot use the database %s: %s", host.service.db.describe(), e.orig
        )
        return 1
    host.mount()
    host.service.signatures.verifier.warm_up()
    emb = config.embedded
    tune_gc(emb.gc_thresholds)
    site = XSignSite(
        host.root, config.max_request_body_size, emb.x_forwarded, emb.access_log
    )
    host.site = site
    if listen_fd is not None:
        probe = socket.socket(fileno=os.dup(listen_fd))  # detects the family
        family = probe.family
        probe.close()
        port = r.adoptStreamPort(listen_fd, family, site)
    else:
        port = r.listenTCP(emb.port, site, interface=emb.bind_address)
    address = port.getHost()
    logger.info(
        "synapse-xsign %s listening on http://%s:%d for server %s",
        __version__,
        address.host,
        address.port,
        emb.server_name,
    )
    if emb.metrics_port is not None and listen_fd is None:
        from prometheus_client.twisted import MetricsResource

        from twisted.web.resource import Resource
        from twisted.web.server import Site

        root = Resource()
        root.putChild(b"metrics", MetricsResource())  # type: ignore[no-untyped-call,arg-type]
        metrics = r.listenTCP(
            emb.metrics_port, Site(root), interface=emb.metrics_bind_address
        )
        logger.info(
            "Prometheus metrics on http://%s:%d/metrics",
            metrics.getHost().host,
            metrics.getHost().port,
        )
    r.addSystemEventTrigger("before", "shutdown", logger.info, "Shutting down")
    r.run()
    return 0


def tune_gc(thresholds: tuple[int, int, int] | None) -> None:
    """Set the collector's thresholds, and leave what startup made (modules,
    tables, compiled statements) out of every later collection.

    A large request body parses into tens of thousands of objects; with
    Python's default thresholds each one set off collections that walked the
    whole heap again, about a tenth of a ``signatures/upload``'s time.
    """
    gc.collect()
    gc.freeze()
    if thresholds is not None:
        gc.set_threshold(*thresholds)
        logger.info("Garbage collector thresholds: %s", thresholds)


def _offline_db(config: XSignConfig) -> Database:
    return Database(config.database, reactor=None)


def cmd_migrate(config: XSignConfig) -> int:
    """Apply the schema migrations and print the revision."""
    db = _offline_db(config)
    try:
        revision = migrate.upgrade(db.engine)
        print(f"schema at revision {revision} ({db.describe()})")
    finally:
        db.close()
    return 0


def cmd_register_user(config: XSignConfig, args: argparse.Namespace) -> int:
    """Create or update an account of the embedded host."""
    user = args.user
    user_id = user if user.startswith("@") else f"@{user}:{config.embedded.server_name}"
    if server_of(user_id) != config.embedded.server_name:
        print(
            f"error: {user_id} is not a user id on {config.embedded.server_name}",
            file=sys.stderr,
        )
        return 2
    password = args.password
    if password is None:
        password = getpass.getpass(f"Password for {user_id}: ")
    if not password:
        print("error: the password must not be empty", file=sys.stderr)
        return 2
    db = _offline_db(config)
    try:
        migrate.upgrade(db.engine)
        _, created = db.run_in_thread(
            "register_user",
            True,
            upsert_user_txn,
            user_id,
            int(time.time() * 1000),
            hash_password(password),
            args.admin,
            None,
        )
    finally:
        db.close()
    print(
        f"{'created' if created else 'updated'} {user_id}"
        + (" (admin)" if args.admin else "")
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="synapse-xsign",
        description="Matrix cross-signing key service (embedded host).",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "-c", "--config", default="sample_config.yaml", help="YAML config file"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="serve (the default)")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serve with N processes sharing the port",
    )
    run.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-name", help=argparse.SUPPRESS)
    run.add_argument("--worker-count", type=int, default=1, help=argparse.SUPPRESS)
    sub.add_parser("migrate", help="apply database migrations and exit")
    reg = sub.add_parser("register-user", help="create or update a user")
    reg.add_argument("user", help="user id or localpart")
    reg.add_argument("-p", "--password", help="password (prompted if omitted)")
    reg.add_argument(
        "--admin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="make (or, with --no-admin, unmake) a server admin",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``synapse-xsign``."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, getattr(args, "worker_name", None))
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        return cmd_migrate(config)
    if args.command == "register-user":
        return cmd_register_user(config, args)
    workers = getattr(args, "workers", 1)
    if workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if workers > 1:
        from synapse_xsign_module.hosts.embedded.workers import run_workers

        return run_workers(config, args.config, workers, args.log_level)
    return cmd_run(
        config, getattr(args, "listen_fd", None), getattr(args, "worker_count", 1)
    )


if __name__ == "__main__":
    sys.exit(main())
