"""The real ``synapse-xsign`` process: start, serve over TCP, stop on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any

from signedjson.key import generate_signing_key

import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from synapse_xsign_module.storage import migrate
from tests.utils import make_device_keys, postgres_url

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_NAME = "smoke.test"
PASSWORD = "smoke-pass-8f3k"
#: Bounded waits, in seconds.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def child_env() -> dict[str, str]:
    """The environment of the child processes: this checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class CollectingProtocol(ProcessProtocol):
    """Collects a child's stdout and stderr; ``ended`` fires with its exit code."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        value = reason.value
        if isinstance(value, ProcessDone):
            self.ended.callback(0)
        elif isinstance(value, ProcessTerminated):
            # Killed by a signal: exitCode is None, signal is set.
            self.ended.callback(value.exitCode)
        else:
            self.ended.callback(None)

    @property
    def stderr(self) -> str:
        """What the child wrote to stderr so far."""
        return self.err.decode("utf-8", "replace")

    @property
    def stdout(self) -> str:
        """What the child wrote to stdout so far."""
        return self.out.decode("utf-8", "replace")


def spawn(*args: str) -> tuple[CollectingProtocol, Any]:
    """Start ``python -m synapse_xsign_module.hosts.embedded.cli <args>``."""
    proto = CollectingProtocol()
    argv = [sys.executable, "-m", "synapse_xsign_module.hosts.embedded.cli", *args]
    transport = reactor.spawnProcess(  # type: ignore[attr-defined]
        proto, sys.executable, argv, env=child_env(), path=REPO
    )
    return proto, transport


async def wait(d: defer.Deferred[Any], seconds: float) -> Any:
    """``d``'s result, or a TimeoutError after ``seconds``."""
    return await d.addTimeout(seconds, reactor)  # type: ignore[arg-type]


class ProcessTestCase(unittest.TestCase):
    """Helpers to run the CLI as a child process and talk to it over TCP."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="xsign-smoke-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pool = HTTPConnectionPool(reactor)  # type: ignore[arg-type]
        self.http = HTTPClient(Agent(reactor, pool=self.pool))  # type: ignore[arg-type]
        self.addCleanup(self.pool.closeCachedConnections)

    def write_config(self, db_url: str) -> str:
        """A config file for the embedded host on a free loopback port."""
        path = os.path.join(self.tmp, "config.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                "database:\n"
                f"  url: {json.dumps(db_url)}\n"
                "  threadpool_size: 2\n"
                "embedded:\n"
                f"  server_name: {SERVER_NAME}\n"
                "  bind_address: 127.0.0.1\n"
                "  port: 0\n"  # any free port; the log says which
                "  access_log: true\n"
                "  metrics_port: 0\n"  # any free port, logged
            )
        return path

    async def run_to_end(self, *args: str, timeout: float = 60.0) -> CollectingProtocol:
        """Run the CLI to completion; returns its collected output."""
        proto, _ = spawn(*args)
        proto.code = await wait(proto.ended, timeout)  # type: ignore[attr-defined]
        return proto

    def start_server(self, config: str) -> tuple[CollectingProtocol, Any]:
        """Start ``run``; the process is killed at cleanup if still running."""
        proto, transport = spawn("--config", config, "run")

        async def kill() -> None:
            if proto.running:
                try:
                    transport.signalProcess("KILL")
                except Exception:
                    pass
                await wait(proto.ended, 10)

        self.addCleanup(lambda: defer.ensureDeferred(kill()))
        return proto, transport

    async def wait_for_port(self, proto: CollectingProtocol) -> int:
        """The port the server logs it listens on (bounded wait)."""
        for _ in range(int(START_TIMEOUT / 0.05)):
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", proto.stderr)
            if m:
                return int(m.group(1))
            if not proto.running:
                self.fail(f"server exited early:\n{proto.stderr}")
            await deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]
        self.fail(f"server did not start:\n{proto.stderr}")

    async def wait_for_health(self, base: str) -> None:
        """Poll GET /health until it answers 200 OK (bounded wait)."""
        last: Any = None
        for _ in range(int(START_TIMEOUT / 0.1)):
            try:
                resp = await wait(self.http.get(base + "/health"), 5)
                body = await wait(treq.content(resp), 5)
                if resp.code == 200 and body == b"OK":
                    return
                last = (resp.code, body)
            except Exception as e:  # not listening yet
                last = e
            await deferLater(reactor, 0.1, lambda: None)  # type: ignore[arg-type]
        self.fail(f"/health never answered 200: {last!r}")

    async def post_json(
        self, url: str, body: Any, token: str | None = None
    ) -> tuple[int, Any]:
        """POST JSON over TCP; returns (status, parsed body)."""
        headers = {b"Content-Type": [b"application/json"]}
        if token is not None:
            headers[b"Authorization"] = [f"Bearer {token}".encode()]
        resp = await wait(
            self.http.post(url, data=json.dumps(body).encode(), headers=headers), 10
        )
        content = await wait(treq.content(resp), 10)
        return resp.code, json.loads(content)


class EmbeddedProcessTest(ProcessTestCase):
    """The whole life of the embedded host process over SQLite."""

    async def test_serve_and_stop(self) -> None:
        """Register, start, log in, upload and query keys over TCP, stop on SIGTERM."""
        db_path = os.path.join(self.tmp, "data", "xsign.db")
        config = self.write_config(f"sqlite:///{db_path}")

        reg = await self.run_to_end(
            "--config", config, "register-user", "alice", "--password", PASSWORD
        )
        self.assertEqual(reg.code, 0, reg.stderr)  # type: ignore[attr-defined]
        self.assertIn(f"created @alice:{SERVER_NAME}", reg.stdout)

        proto, transport = self.start_server(config)
        port = await self.wait_for_port(proto)
        base = f"http://127.0.0.1:{port}"
        await self.wait_for_health(base)

        code, login = await self.post_json(
            base + "/_matrix/client/v3/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "alice"},
                "password": PASSWORD,
                "device_id": "SMOKEDEV",
            },
        )
        self.assertEqual(code, 200, login)
        token = login["access_token"]
        user_id = f"@alice:{SERVER_NAME}"
        self.assertEqual((login["user_id"], login["device_id"]), (user_id, "SMOKEDEV"))

        dk = make_device_keys(user_id, "SMOKEDEV", generate_signing_key("SMOKEDEV"))
        code, body = await self.post_json(
            base + "/_matrix/client/v3/keys/upload", {"device_keys": dk}, token
        )
        self.assertEqual(code, 200, body)
        self.assertEqual(body, {"one_time_key_counts": {"signed_curve25519": 0}})
        code, body = await self.post_json(
            base + "/_matrix/client/v3/keys/query",
            {"device_keys": {user_id: []}},
            token,
        )
        self.assertEqual(code, 200, body)
        self.assertEqual(body["device_keys"][user_id]["SMOKEDEV"]["keys"], dk["keys"])

        # A request with the token in the query string, for the access log.
        resp = await wait(
            self.http.get(
                base + "/_matrix/client/v3/account/whoami",
                params={"access_token": token},
            ),
            10,
        )
        whoami = json.loads(await wait(treq.content(resp), 10))
        self.assertEqual(whoami["user_id"], user_id)

        # Prometheus metrics on their own port.
        m = re.search(
            r"Prometheus metrics on (http://127\.0\.0\.1:\d+/metrics)", proto.stderr
        )
        assert m is not None, proto.stderr
        resp = await wait(self.http.get(m.group(1)), 10)
        metrics = (await wait(treq.content(resp), 10)).decode()
        self.assertEqual(resp.code, 200)
        self.assertIn(
            'xsign_http_requests_total{code="200",endpoint="keys/query",method="POST"} 1.0',
            metrics,
        )
        self.assertIn('xsign_db_transactions_total{desc="query_keys"}', metrics)
        await self.pool.closeCachedConnections()

        transport.signalProcess("TERM")
        exit_code = await wait(proto.ended, STOP_TIMEOUT)
        self.assertEqual(exit_code, 0, proto.stderr)

        log = proto.stderr
        self.assertIn(f"listening on http://127.0.0.1:{port}", log)
        self.assertIn(f"for server {SERVER_NAME}", log)
        self.assertIn(f"sqlite:///{db_path}", log)
        self.assertIn(f"schema {migrate.head_revision()}", log)
        self.assertIn("Shutting down", log)
        # Access log lines, with the token never written.
        self.assertIn("POST /_matrix/client/v3/keys/upload 200", log)
        self.assertIn("access_token=<redacted>", log)
        self.assertNotIn(token, log)
        self.assertNotIn(PASSWORD, log)
        self.assertNotIn("Traceback", log)

    async def test_bad_config_exits_2(self) -> None:
        """An invalid config makes the process exit 2 naming the key."""
        path = os.path.join(self.tmp, "bad.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write("embedded:\n  prot: 8008\n")
        proto = await self.run_to_end("--config", path, "run")
        self.assertEqual(proto.code, 2)  # type: ignore[attr-defined]
        self.assertIn("configuration error: embedded.prot", proto.stderr)


class DatabasePasswordLogTest(ProcessTestCase):
    """A PostgreSQL URL's password never reaches the process's output."""

    SECRET = "Sup3rSecretPw"

    async def test_unreachable_database_does_not_leak_password(self) -> None:
        """When the database cannot be reached the process fails without the password."""
        # Port 9 on loopback: nothing listens there.
        url = f"postgresql+psycopg://xsign:{self.SECRET}@127.0.0.1:9/xsign"
        proto = await self.run_to_end("--config", self.write_config(url), "run")
        self.assertNotEqual(proto.code, 0)  # type: ignore[attr-defined]
        self.assertTrue(proto.stderr)
        self.assertNotIn(self.SECRET, proto.stderr + proto.stdout)

    async def test_postgres_password_hidden_in_log(self) -> None:
        """Serving from PostgreSQL, the log names the database with the password masked."""
        pg = postgres_url()
        if pg is None:
            raise unittest.SkipTest("needs PostgreSQL (XSIGN_TEST_POSTGRES_URL)")
        # Trust authentication ignores the password, so any will do.
        scheme, _, rest = pg.partition("://")
        userinfo, _, hostpart = rest.rpartition("@")
        user = userinfo.split(":")[0]
        if not user or ":" in userinfo:
            raise unittest.SkipTest("needs a PostgreSQL URL with a user, no password")
        url = f"{scheme}://{user}:{self.SECRET}@{hostpart}"
        config = self.write_config(url)

        migrated = await self.run_to_end("--config", config, "migrate")
        self.assertEqual(migrated.code, 0, migrated.stderr)  # type: ignore[attr-defined]
        self.assertIn(f"{user}:***@", migrated.stdout)

        proto, transport = self.start_server(config)
        port = await self.wait_for_port(proto)
        await self.wait_for_health(f"http://127.0.0.1:{port}")
        await self.pool.closeCachedConnections()
        transport.signalProcess("TERM")
        self.assertEqual(await wait(proto.ended, STOP_TIMEOUT), 0, proto.stderr)
        output = proto.stderr + proto.stdout + migrated.stderr + migrated.stdout
        self.assertIn(f"{user}:***@", proto.stderr)
        self.assertNotIn(self.SECRET, output)
