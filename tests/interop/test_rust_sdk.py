"""matrix-rust-sdk's crypto engine against the embedded host, over real HTTP.

The clients are played by ``interop.mjs`` (Node.js, with the npm package
``@matrix-org/matrix-sdk-crypto-wasm`` pinned in ``package.json``). This test
registers the users with the ``synapse-xsign`` CLI, starts the server as a
subprocess on a free port with a fresh SQLite database, runs the script once,
and asserts on the JSON it reports. It installs nothing: ``tox -e interop``
runs ``npm ci --prefix tests/interop`` first, and without ``node_modules`` the
tests are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import yaml

from twisted.trial import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SDK_PACKAGE = "@matrix-org/matrix-sdk-crypto-wasm"
SCRIPT = os.path.join(HERE, "interop.mjs")
RESULT_MARKER = "XSIGN_INTEROP_RESULT "
SERVER_NAME = "interop.test"
USERS = ("alice", "bob", "carol")

#: Budgets, in seconds; the whole run normally takes a few seconds.
SERVER_START_TIMEOUT = 30.0
SCRIPT_TIMEOUT = 90.0
CLI_TIMEOUT = 60.0


#: Set by ``tox -e interop``: the tests run, and a missing Node.js or SDK fails
#: them instead of skipping them.
RUN_ENV = "XSIGN_RUN_INTEROP"


def _skip_reason() -> str | None:
    if not os.environ.get(RUN_ENV):
        return f"the interop tests run under 'tox -e interop' ({RUN_ENV}=1)"
    problem = _missing_tools()
    if problem is not None:
        raise RuntimeError(f"{RUN_ENV} is set but {problem}")
    return None


def _missing_tools() -> str | None:
    if shutil.which("node") is None:
        return "Node.js ('node') is not on PATH; the interop tests need Node.js >= 20"
    installed = os.path.join(HERE, "node_modules", *SDK_PACKAGE.split("/"))
    if not os.path.isfile(os.path.join(installed, "package.json")):
        return (
            f"{SDK_PACKAGE} is not installed in tests/interop/node_modules: "
            "run 'npm ci --prefix tests/interop' (tox -e interop does)"
        )
    return None


SKIP_REASON = _skip_reason()


def _cli() -> list[str]:
    """The synapse-xsign command of the running interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), "synapse-xsign")
    if os.path.isfile(script):
        return [script]
    return [sys.executable, "-m", "synapse_xsign_module.hosts.embedded.cli"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-limit:]
    except OSError:
        return "(no output)"


class InteropError(Exception):
    """The scenario could not be run to its end."""


def _wait_healthy(base_url: str, server: subprocess.Popen[bytes], log: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise InteropError(
                f"the server exited with {server.returncode}:\n{_tail(log)}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise InteropError(f"the server did not answer /health:\n{_tail(log)}")


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def run_script(base_url: str, passwords: dict[str, str], log: str) -> dict[str, Any]:
    """Run interop.mjs against a homeserver whose users exist; its report.

    Args:
        base_url: the client-server base URL (the embedded host, or a routing
            front in front of Synapse).
        passwords: localpart -> password of alice, bob and carol.
        log: the server's log file, quoted when the script fails.

    Raises:
        InteropError: the script failed or reported a failure.
    """
    env = {**os.environ, "XSIGN_INTEROP_CREDENTIALS": json.dumps(passwords)}
    try:
        done = subprocess.run(
            ["node", SCRIPT, base_url],
            cwd=HERE,
            env=env,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        raise InteropError(
            f"interop.mjs ran over {SCRIPT_TIMEOUT}s; server log:\n{_tail(log)}"
        ) from e
    lines = [
        line[len(RESULT_MARKER) :]
        for line in done.stdout.splitlines()
        if line.startswith(RESULT_MARKER)
    ]
    report: dict[str, Any] | None = json.loads(lines[-1]) if lines else None
    if done.returncode != 0 or report is None or not report.get("ok"):
        raise InteropError(
            f"interop.mjs exited {done.returncode}; report: {report}\n"
            f"--- script stderr:\n{done.stderr[-4000:]}\n"
            f"--- server log:\n{_tail(log)}"
        )
    return report


def run_scenario() -> dict[str, Any]:
    """Run the whole scenario once against a fresh server; the script's report."""
    workdir = tempfile.mkdtemp(prefix="xsign-interop-")
    try:
        port = _free_port()
        config = os.path.join(workdir, "config.yaml")
        with open(config, "w", encoding="utf-8") as f:
            yaml.safe_dump(
                {
                    "database": {
                        "url": f"sqlite:///{os.path.join(workdir, 'xsign.db')}"
                    },
                    "embedded": {
                        "server_name": SERVER_NAME,
                        "bind_address": "127.0.0.1",
                        "port": port,
                    },
                },
                f,
            )
        passwords = {u: f"interop password of {u}" for u in USERS}
        for user, password in passwords.items():
            done = subprocess.run(
                [*_cli(), "--config", config, "register-user", user]
                + ["--password", password],
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT,
            )
            if done.returncode != 0:
                raise InteropError(
                    f"register-user {user} exited {done.returncode}:\n{done.stderr}"
                )

        log = os.path.join(workdir, "server.log")
        base_url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as log_file:
            server = subprocess.Popen(
                [*_cli(), "--config", config, "run"],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_healthy(base_url, server, log)
            return run_script(base_url, passwords, log)
        finally:
            _stop(server)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class RustSdkInteropTest(unittest.TestCase):
    """Assertions on one run of the scenario (shared by the test methods)."""

    if SKIP_REASON is not None:
        skip = SKIP_REASON

    _report: dict[str, Any] | None = None
    _failure: str | None = None
    #: Server name of the users the scenario runs with.
    server_name = SERVER_NAME

    @classmethod
    def scenario(cls) -> dict[str, Any]:
        """Run the scenario once; subclasses point it at another server."""
        return run_scenario()

    def report(self) -> dict[str, Any]:
        """The scenario's report, running it on first use."""
        cls = type(self)
        if cls._report is None and cls._failure is None:
            try:
                cls._report = cls.scenario()
            except InteropError as e:
                cls._failure = str(e)
        if cls._failure is not None:
            self.fail(f"the interop scenario failed: {cls._failure}")
        assert cls._report is not None
        return cls._report

    def test_device_and_one_time_keys_uploaded(self) -> None:
        """The SDK's /keys/upload is accepted and its one-time keys are counted."""
        r = self.report()
        for user in ("alice", "bob"):
            counts = r["one_time_key_counts"][user]
            self.assertGreater(counts.get("signed_curve25519", 0), 0, (user, counts))
            self.assertGreaterEqual(
                r["clients"][user]["requests_sent"].get("keys_upload", 0), 1
            )

    def test_first_upload_needs_no_uia_and_reset_does(self) -> None:
        """First publication of cross-signing keys goes through without UIA;
        a reset is challenged and completes with m.login.password."""
        r = self.report()
        self.assertEqual(r["first_upload_uia_rounds"], {u: 0 for u in USERS})
        self.assertEqual(r["reset_uia_rounds"], {"carol": 1})

    def test_signature_uploads_accepted(self) -> None:
        """No /keys/signatures/upload of the SDK reports a failure."""
        r = self.report()
        for user in USERS:
            self.assertEqual(r["clients"][user]["signature_upload_failures"], [], user)
            self.assertGreaterEqual(
                r["clients"][user]["requests_sent"].get("signatures_upload", 0), 1
            )

    def test_own_device_cross_signing_trusted(self) -> None:
        """Each client trusts its own device through its own cross-signing keys,
        as read back from the server."""
        r = self.report()
        self.assertEqual(
            r["own_device_cross_signing_trusted"], {u: True for u in USERS}
        )
        self.assertEqual(r["own_identity_verified"], {u: True for u in USERS})
        for user in USERS:
            self.assertEqual(
                r["cross_signing_status"][user],
                {
                    "has_master": True,
                    "has_self_signing": True,
                    "has_user_signing": True,
                },
            )
        self.assertTrue(
            r["raw"]["bob_queries_self"]["device_signed_by_self_signing_key"]
        )

    def test_other_users_devices_seen_cross_signed(self) -> None:
        """alice and bob see each other's identity and cross-signed device."""
        before = self.report()["before_verification"]
        self.assertTrue(before["alice_sees_bob_identity"])
        self.assertTrue(before["bob_device_known_to_alice"])
        self.assertTrue(before["bob_device_cross_signed_by_owner"])
        self.assertTrue(before["alice_device_cross_signed_by_owner"])
        self.assertEqual(before["bob_device_display_name"], "bob's rust-sdk device")
        self.assertFalse(before["bob_identity_verified_for_alice"])
        self.assertFalse(before["bob_device_trusted_by_alice"])

    def test_one_time_key_claim_gives_olm_session(self) -> None:
        """alice claims one of bob's signed one-time keys and the SDK accepts it."""
        olm = self.report()["olm"]
        self.assertEqual(olm, {"claim_request_made": True, "session_established": True})

    def test_bob_verified_for_alice(self) -> None:
        """After alice signs bob's master key and re-queries him, bob's identity
        and device are trusted by alice's client."""
        after = self.report()["after_verification"]
        self.assertTrue(after["bob_identity_verified_for_alice"])
        self.assertTrue(after["bob_device_trusted_by_alice"])

    def test_user_signing_key_private_to_owner(self) -> None:
        """Only the owner's query returns their user-signing key."""
        raw = self.report()["raw"]
        self.assertTrue(raw["bob_queries_alice"]["has_alice_master"])
        self.assertTrue(raw["bob_queries_alice"]["has_alice_self_signing"])
        self.assertNotIn(
            f"@alice:{self.server_name}",
            raw["bob_queries_alice"]["user_signing_keys_users"],
        )
        self.assertEqual(raw["bob_queries_alice"]["user_signing_keys_users"], [])
        self.assertEqual(
            raw["bob_queries_self"]["user_signing_keys_users"],
            [f"@bob:{self.server_name}"],
        )
        self.assertEqual(raw["carol_queries_bob"]["user_signing_keys_users"], [])

    def test_user_signature_visible_to_signer_only(self) -> None:
        """alice's signature on bob's master key is shown to alice, not to carol."""
        r = self.report()
        raw = r["raw"]
        alice_usk = json.loads(r["alice_user_signing_key"])
        (usk_id,) = alice_usk["keys"]
        self.assertEqual(
            raw["alice_queries_bob"]["alice_signatures_on_bob_master"], [usk_id]
        )
        self.assertTrue(raw["carol_queries_bob"]["has_bob_master"])
        self.assertEqual(raw["carol_queries_bob"]["alice_signatures_on_bob_master"], [])
