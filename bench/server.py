"""The embedded host started by the bench: a subprocess on a free loopback port."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, ClassVar
from urllib.parse import unquote

import yaml
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from twisted.internet import threads

from bench.http import JsonClient, sleep

SERVER_NAME = "bench.test"
ADMIN_LOCALPART = "benchadmin"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def cli_command() -> list[str]:
    """The ``synapse-xsign`` command of the running interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), "synapse-xsign")
    if os.path.isfile(script):
        return [script]
    return [sys.executable, "-m", "synapse_xsign_module.hosts.embedded.cli"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redact_url(url: str) -> str:
    """A database URL without its password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


#: Hosts whose PostgreSQL runs on this machine (no host: its socket).
LOCAL_HOSTS = frozenset({None, "", "localhost", "127.0.0.1", "::1"})


def local_pg_database(url: str) -> str | None:
    """The database of a PostgreSQL URL, if that database is on this machine.

    The port is not looked at: with two clusters on this machine, a
    database of the same name in the other one is counted too.

    Args:
        url: a SQLAlchemy database URL.

    Returns:
        The database's name (the user's, when the URL names none), or None
        for another database engine or another machine.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "postgresql":
        return None
    host = parsed.query.get("host", parsed.host)
    if isinstance(host, tuple):  # given more than once
        return None
    if host is not None:
        host = unquote(host)
    if host not in LOCAL_HOSTS and not (host or "").startswith("/"):  # a socket
        return None
    return parsed.database or parsed.username


class EmbeddedServer:
    """``synapse-xsign run`` in a temporary directory.

    Args:
        db_url: SQLAlchemy URL; a SQLite file in the temporary directory if None.
        db_threads: the server's ``database.threadpool_size`` (its default if None).
        workers: processes sharing the port (``run --workers``; PostgreSQL).
    """

    #: Started and not yet stopped (stopped on an interrupted run too).
    running: ClassVar[set[EmbeddedServer]] = set()

    def __init__(
        self,
        db_url: str | None = None,
        db_threads: int | None = None,
        workers: int | None = None,
    ):
        self.workers = workers
        self.workdir = tempfile.mkdtemp(prefix="xsign-bench-")
        self.db_url = db_url or f"sqlite:///{os.path.join(self.workdir, 'xsign.db')}"
        self.db_threads = db_threads
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config_path = os.path.join(self.workdir, "config.yaml")
        self.log_path = os.path.join(self.workdir, "server.log")
        self.admin_user = f"@{ADMIN_LOCALPART}:{SERVER_NAME}"
        self.admin_password = secrets.token_urlsafe(16)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def describe(self) -> str:
        """Where it runs and on which database."""
        return f"embedded host at {self.base_url} on {redact_url(self.db_url)}"

    def _write_config(self) -> None:
        database: dict[str, Any] = {"url": self.db_url}
        if self.db_threads is not None:
            database["threadpool_size"] = self.db_threads
        with open(self.config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(
                {
                    "database": database,
                    "embedded": {
                        "server_name": SERVER_NAME,
                        "bind_address": "127.0.0.1",
                        "port": self.port,
                        "access_log": False,
                    },
                },
                f,
            )

    def _register_admin(self) -> None:
        done = subprocess.run(
            [*cli_command(), "--config", self.config_path, "--log-level", "WARNING"]
            + ["register-user", ADMIN_LOCALPART, f"--password={self.admin_password}"]
            + ["--admin"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                "synapse-xsign register-user failed:\n"
                + done.stderr.decode(errors="replace")[-2000:]
            )

    async def start(self) -> None:
        """Write the config, register the admin (CLI), start, wait for /health."""
        self._write_config()
        await threads.deferToThread(self._register_admin)
        self._log = open(self.log_path, "wb")  # closed in stop()
        EmbeddedServer.running.add(self)
        self.process = subprocess.Popen(
            [*cli_command(), "--config", self.config_path, "--log-level", "WARNING"]
            + ["run"]
            + (["--workers", str(self.workers)] if self.workers else []),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        client = JsonClient(self.base_url, max_connections=1)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the embedded host exited with {self.process.returncode}:\n"
                        + self.log_tail()
                    )
                try:
                    answer = await client.request("GET", "/health")
                    if answer.code == 200:
                        return
                except Exception:  # not listening yet
                    pass
                await sleep(0.1)
            raise RuntimeError(
                "the embedded host did not answer /health:\n" + self.log_tail()
            )
        finally:
            await client.close()

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the server's output."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-limit:] or "(no output)"
        except OSError:
            return "(no output)"

    async def stop(self) -> None:
        """SIGTERM, wait, remove the temporary directory."""
        EmbeddedServer.running.discard(self)
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                await sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.workdir, ignore_errors=True)
