"""``synapse-xsign run --workers 2``: two processes, one port, one database.

Each test runs on PostgreSQL (when ``XSIGN_TEST_POSTGRES_URL`` is set) and on a
SQLite file. The requests go over real TCP from many threads; the kernel spreads
the connections over both worker processes, and the tests check that both served.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

from twisted.trial import unittest

from tests.utils import TestUser, postgres_url, prepare_database

SERVER_NAME = "workers.test"
PASSWORD = "worker password"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, body: Any, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class WorkersTestBase:
    """Two embedded-host processes on one database (see the subclasses)."""

    def database_url(self) -> str:
        """The database both processes use (prepared empty)."""
        raise NotImplementedError

    def setUp(self: Any) -> None:
        self.dir = tempfile.mkdtemp(prefix="xsign-workers-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.db_url = self.database_url()
        self.config = os.path.join(self.dir, "config.yaml")
        self._write_config()
        self.log = os.path.join(self.dir, "server.log")
        cli = [
            sys.executable,
            "-m",
            "synapse_xsign_module.hosts.embedded.cli",
            "--config",
            self.config,
        ]
        for user in ("alice", "bob"):
            subprocess.run(
                [*cli, "register-user", user, "--password", PASSWORD],
                check=True,
                capture_output=True,
                timeout=60,
            )
        self.addCleanup(self._stop)
        # The picked port may be taken before the supervisor binds it: then
        # start again on another.
        for attempt in range(1, 4):
            with open(self.log, "wb") as out:
                self.proc = subprocess.Popen(
                    [*cli, "run", "--workers", "2"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_healthy():
                return
            if attempt == 3 or "Address already in use" not in self._log():
                self.fail(f"workers did not start:\n{self._log()}")
            self._stop()
            self._write_config()

    def _write_config(self) -> None:
        """The config of both processes, on a newly picked port."""
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        with open(self.config, "w", encoding="utf-8") as f:
            yaml.safe_dump(
                {
                    "database": {"url": self.db_url, "threadpool_size": 4},
                    "embedded": {"server_name": SERVER_NAME, "port": self.port},
                },
                f,
            )

    def _wait_healthy(self) -> bool:
        """Whether /health answers before the deadline and the process lives."""
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2):
                    return True
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    return False
                time.sleep(0.2)

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _log(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def login(self, user: str) -> TestUser:
        """Log in over TCP."""
        code, body = _call(
            f"{self.base}/_matrix/client/v3/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user},
                "password": PASSWORD,
            },
        )
        self.assertEqual(code, 200, body)
        return TestUser(body["user_id"], body["device_id"], body["access_token"])

    def served_by(self) -> Counter[str]:
        """How many requests each worker logged."""
        return Counter(
            re.findall(r"\[(worker\d)\] INFO synapse_xsign_module.access", self._log())
        )

    def test_claims_across_processes(self) -> None:
        """Concurrent claims through both processes hand out every key exactly once."""
        alice = self.login("alice")
        bob = self.login("bob")
        otks = {f"signed_curve25519:K{i:03d}": {"key": f"k{i}"} for i in range(120)}
        code, body = _call(
            f"{self.base}/_matrix/client/v3/keys/upload",
            {
                "one_time_keys": otks,
                "fallback_keys": {
                    "signed_curve25519:FB": {"key": "fb", "fallback": True}
                },
            },
            alice.token,
        )
        self.assertEqual(code, 200, body)
        claim = {
            "one_time_keys": {alice.user_id: {alice.device_id: "signed_curve25519"}}
        }

        def one(_: int) -> str:
            code, body = _call(
                f"{self.base}/_matrix/client/v3/keys/claim", claim, bob.token
            )
            assert code == 200, body
            (key_id,) = body["one_time_keys"][alice.user_id][alice.device_id]
            return str(key_id)

        with ThreadPoolExecutor(max_workers=16) as pool:
            got = list(pool.map(one, range(150)))
        counts = Counter(got)
        handed = {k: n for k, n in counts.items() if k != "signed_curve25519:FB"}
        self.assertEqual(set(handed), set(otks))
        self.assertEqual(set(handed.values()), {1})
        self.assertEqual(counts["signed_curve25519:FB"], 30)
        served = self.served_by()
        self.assertGreater(served["worker0"], 0, served)
        self.assertGreater(served["worker1"], 0, served)

    def test_concurrent_uploads_across_processes(self) -> None:
        """Concurrent first cross-signing uploads through both processes: one identity."""
        alice = self.login("alice")
        bodies = [alice.make_cross_signing() for _ in range(12)]

        def one(body: dict[str, Any]) -> int:
            code, _ = _call(
                f"{self.base}/_matrix/client/v3/keys/device_signing/upload",
                body,
                alice.token,
            )
            return code

        with ThreadPoolExecutor(max_workers=12) as pool:
            codes = list(pool.map(one, bodies))
        self.assertEqual(codes.count(200), 1, codes)
        self.assertEqual(codes.count(401), 11, codes)
        winner = bodies[codes.index(200)]
        code, result = _call(
            f"{self.base}/_matrix/client/v3/keys/query",
            {"device_keys": {alice.user_id: []}},
            alice.token,
        )
        self.assertEqual(code, 200, result)
        self.assertEqual(result["master_keys"][alice.user_id], winner["master_key"])
        self.assertEqual(
            result["self_signing_keys"][alice.user_id], winner["self_signing_key"]
        )
        self.assertEqual(
            result["user_signing_keys"][alice.user_id], winner["user_signing_key"]
        )

    def test_uia_session_across_processes(self) -> None:
        """A UIA session started on one process completes on any (sessions are in the database)."""
        alice = self.login("alice")
        first = alice.make_cross_signing()
        code, _ = _call(
            f"{self.base}/_matrix/client/v3/keys/device_signing/upload",
            first,
            alice.token,
        )
        self.assertEqual(code, 200)
        for _ in range(6):
            new = alice.make_cross_signing()
            code, challenge = _call(
                f"{self.base}/_matrix/client/v3/keys/device_signing/upload",
                new,
                alice.token,
            )
            self.assertEqual(code, 401, challenge)
            auth = {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": alice.user_id},
                "password": PASSWORD,
                "session": challenge["session"],
            }
            code, body = _call(
                f"{self.base}/_matrix/client/v3/keys/device_signing/upload",
                {**new, "auth": auth},
                alice.token,
            )
            self.assertEqual((code, body), (200, {}))
        served = self.served_by()
        self.assertGreater(served["worker0"], 0, served)
        self.assertGreater(served["worker1"], 0, served)


class PostgresWorkersTest(WorkersTestBase, unittest.TestCase):
    """--workers 2 on PostgreSQL."""

    def database_url(self) -> str:
        url = postgres_url()
        if not url:
            raise unittest.SkipTest("needs PostgreSQL (XSIGN_TEST_POSTGRES_URL)")
        from synapse_xsign_module.config import DatabaseConfig

        prepare_database(DatabaseConfig(url=url)).close()
        return url


class SqliteWorkersTest(WorkersTestBase, unittest.TestCase):
    """--workers 2 on one SQLite file (WAL): reads in both, writes take turns."""

    def database_url(self) -> str:
        return f"sqlite:///{self.dir}/xsign.db"


class WorkersRefusedTest(unittest.TestCase):
    def test_in_memory_sqlite_refused(self) -> None:
        """--workers refuses an in-memory SQLite database with a clear message."""
        folder = tempfile.mkdtemp(prefix="xsign-workers-")
        self.addCleanup(shutil.rmtree, folder, True)
        config = os.path.join(folder, "memory.yaml")
        with open(config, "w", encoding="utf-8") as f:
            yaml.safe_dump({"database": {"url": "sqlite://"}}, f)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "synapse_xsign_module.hosts.embedded.cli",
                "--config",
                config,
            ]
            + ["run", "--workers", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 2)
        self.assertIn("in-memory SQLite", done.stderr)


class ListeningSocketsTest(unittest.TestCase):
    def test_one_socket_per_worker_sharing_the_port(self) -> None:
        """On Linux each worker listens on its own socket; the kernel spreads
        connections over all of them."""
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("SO_REUSEPORT balancing is Linux's")
        from synapse_xsign_module.hosts.embedded.workers import listening_sockets

        socks = listening_sockets("127.0.0.1", 0, 2)
        for s in socks:
            self.addCleanup(s.close)
        self.assertEqual(len({id(s) for s in socks}), 2)
        port = socks[0].getsockname()[1]
        self.assertEqual({s.getsockname()[1] for s in socks}, {port})
        clients = []
        for _ in range(64):
            c = socket.create_connection(("127.0.0.1", port))
            self.addCleanup(c.close)
            clients.append(c)
        accepted = []
        for s in socks:
            s.setblocking(False)
            count = 0
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                conn.close()
                count += 1
            accepted.append(count)
        self.assertEqual(sum(accepted), 64)
        self.assertTrue(all(n > 0 for n in accepted), accepted)
