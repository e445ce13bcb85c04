"""Running the embedded host as several processes sharing one listening socket.

The parent binds the port once, runs the migrations once, and starts N worker
processes that each adopt the socket (the kernel spreads connections over
them). Workers keep no state another would need: UIA sessions, one-time key
claims and key replacements all live in the database (PostgreSQL, or one SQLite
file in WAL mode, where reads run in every process at once and writes take the
file's lock one at a time). The parent
forwards SIGTERM/SIGINT to the workers; if one dies, it stops the others and
exits non-zero so that a supervisor can restart the whole set.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from synapse_xsign_module.config import XSignConfig
from synapse_xsign_module.storage import migrate
from synapse_xsign_module.storage.database import Database

logger = logging.getLogger(__name__)


def bind_socket(address: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket that child processes can inherit.

    Args:
        address: the address to bind.
        port: the port (0: any free port).
        reuse_port: set ``SO_REUSEPORT``, so that several sockets can listen on
            the same port and the kernel spreads new connections over them.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address, port))
    sock.listen(1024)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def listening_sockets(address: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per worker where the kernel can balance them.

    On Linux each worker gets a socket of its own in one ``SO_REUSEPORT``
    group: the kernel hands each new connection to one of them, evenly.
    Elsewhere (no ``SO_REUSEPORT``, or one that does not balance) the workers
    share one socket and take turns accepting from it.
    """
    if count > 1 and sys.platform.startswith("linux"):
        first = bind_socket(address, port, reuse_port=True)
        port = first.getsockname()[1]
        return [first] + [
            bind_socket(address, port, reuse_port=True) for _ in range(count - 1)
        ]
    sock = bind_socket(address, port)
    return [sock] * count


def run_workers(
    config: XSignConfig, config_path: str, count: int, log_level: str
) -> int:
    """Supervise ``count`` worker processes; returns the exit status.

    Args:
        config: the parsed configuration.
        config_path: the config file, handed to the workers.
        count: number of worker processes.
        log_level: passed to the workers.
    """
    db = Database(config.database, reactor=None)
    try:
        if db.engine_name == "sqlite" and db.engine.url.database in (
            None,
            "",
            ":memory:",
        ):
            logger.error(
                "--workers needs a database the processes share: PostgreSQL or "
                "a SQLite file, not an in-memory SQLite database"
            )
            return 2
        revision = migrate.upgrade(db.engine)
    finally:
        db.close()
    emb = config.embedded
    socks = listening_sockets(emb.bind_address, emb.port, count)
    host, port = socks[0].getsockname()[:2]
    logger.info(
        "synapse-xsign supervisor: %d workers on http://%s:%d, schema %s",
        count,
        host,
        port,
        revision,
    )
    children: list[subprocess.Popen[bytes]] = []
    for index in range(count):
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "synapse_xsign_module.hosts.embedded.cli",
                    "--config",
                    config_path,
                    "--log-level",
                    log_level,
                    "run",
                    "--listen-fd",
                    str(socks[index].fileno()),
                    "--worker-name",
                    f"worker{index}",
                    "--worker-count",
                    str(count),
                ],
                pass_fds=(socks[index].fileno(),),
            )
        )
    for sock in set(socks):
        sock.close()  # each worker holds its own

    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while any(c.poll() is None for c in children):
        for child in children:
            code = child.poll()
            if code is not None and code != 0 and not stopping:
                logger.error(
                    "worker %d exited with %d; stopping the others", child.pid, code
                )
                status = 1
                forward(signal.SIGTERM, None)
        time.sleep(0.2)
    if not stopping and status == 0:
        status = 1  # every worker went away on its own
    logger.info("synapse-xsign supervisor: all workers stopped")
    return (
        status if not stopping else max(status, *(c.returncode or 0 for c in children))
    )
