"""Starts a real Synapse with the module, and a routing front, as processes.

The tests talk to them over real HTTP with blocking calls (they are plain
synchronous trial tests), so nothing here runs on the test's reactor.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SERVER_NAME = "synapse.test"
STARTUP_TIMEOUT = 90.0

MODULE_LISTENER = """\
  - port: {module_port}
    bind_addresses: ['127.0.0.1']
    type: http
    x_forwarded: true
    resources: []
"""


#: Starts tried when a picked port turns out to be taken.
START_ATTEMPTS = 3


def _port_taken(failure: str) -> bool:
    """Whether a failed start's output says a port was already in use."""
    return "Address already in use" in failure or "EADDRINUSE" in failure


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HttpResult:
    """Status and JSON body of a response."""

    def __init__(self, code: int, body: Any) -> None:
        self.code = code
        self.json = body

    def __repr__(self) -> str:
        return f"<HttpResult {self.code} {json.dumps(self.json)[:400]}>"


def call(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    timeout: float = 30.0,
) -> HttpResult:
    """One blocking HTTP request with a JSON body; never raises for a status."""
    data = json.dumps(body).encode("utf-8") if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            raw = resp.read()
            return HttpResult(resp.status, json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return HttpResult(e.code, parsed)


class SynapseServer:
    """A Synapse process with the module loaded, in a temporary directory.

    Args:
        module_db_url: the module's database URL (None: a SQLite file).
        module_listener: add the listener without ``client`` that serves the
            key paths (the deployment README describes).
    """

    def __init__(
        self, module_db_url: str | None = None, module_listener: bool = True
    ) -> None:
        self.dir = tempfile.mkdtemp(prefix="xsign-synapse-")
        self.client_port = free_port()
        self.module_port = free_port() if module_listener else None
        self.front_port = free_port()
        self.shared_secret = secrets.token_hex(16)
        self.module_db_url = module_db_url or f"sqlite:///{self.dir}/xsign.db"
        self.log_path = os.path.join(self.dir, "homeserver.log")
        self._procs: list[subprocess.Popen[bytes]] = []
        self._module_listener = module_listener
        self._write_config(module_listener)

    @property
    def client_url(self) -> str:
        """Synapse's normal client listener."""
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def front_url(self) -> str:
        """The routing front (what clients use)."""
        return f"http://127.0.0.1:{self.front_port}"

    def _write_config(self, module_listener: bool) -> None:
        values = {
            "server_name": SERVER_NAME,
            "dir": self.dir,
            "client_port": self.client_port,
            "module_listener": MODULE_LISTENER.format(module_port=self.module_port)
            if module_listener
            else "",
            "shared_secret": self.shared_secret,
            "macaroon_secret": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "module_db_url": self.module_db_url,
        }
        for name in ("homeserver.yaml", "log.config"):
            with open(os.path.join(HERE, f"{name}.template"), encoding="utf-8") as f:
                text = f.read().format(**values)
            with open(os.path.join(self.dir, name), "w", encoding="utf-8") as f:
                f.write(text)
        self.config_path = os.path.join(self.dir, "homeserver.yaml")

    def start(self) -> None:
        """Generate keys, start Synapse (and the front), wait until healthy.

        A port :func:`free_port` picked can be taken by another process before
        Synapse or the front binds it: such a start is tried again on new ports.
        """
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_once()
                return
            except RuntimeError as e:
                if attempt == START_ATTEMPTS or not _port_taken(str(e)):
                    raise
            self._new_ports()

    def _new_ports(self) -> None:
        """Pick new ports, rewrite the config and drop the failed start's logs."""
        self.client_port = free_port()
        self.module_port = free_port() if self._module_listener else None
        self.front_port = free_port()
        self._write_config(self._module_listener)
        for name in ("homeserver.log", "stdout.log", "front.log"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.dir, name))

    def _start_once(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", self.config_path]
            + ["--generate-keys"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        env = {**os.environ, "PYTHONPATH": ROOT}
        with open(os.path.join(self.dir, "stdout.log"), "wb") as out:
            self._procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "synapse.app.homeserver"]
                    + ["-c", self.config_path],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )
        if self.module_port is not None:
            with open(os.path.join(self.dir, "front.log"), "wb") as out:
                self._procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tests.synapse_integration.front"]
                        + [str(self.front_port), str(self.client_port)]
                        + [str(self.module_port)],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=ROOT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        urls = [f"{self.client_url}/health"]
        if self.module_port is not None:
            urls.append(f"{self.front_url}/_matrix/client/versions")
        for url in urls:
            while True:
                if any(p.poll() is not None for p in self._procs):
                    self.stop()
                    raise RuntimeError(
                        f"a process exited during startup:\n{self.log_tail()}"
                        f"\n--- front:\n{self._front_log()}"
                    )
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        if resp.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{url} not healthy:\n{self.log_tail()}")
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and remove the directory."""
        for proc in self._procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._procs = []

    def cleanup(self) -> None:
        """Stop and delete the temporary directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        """The whole Synapse log."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _front_log(self) -> str:
        """The end of the routing front's output."""
        try:
            with open(
                os.path.join(self.dir, "front.log"), encoding="utf-8", errors="replace"
            ) as f:
                return f.read()[-2000:]
        except FileNotFoundError:
            return ""

    def log_tail(self, limit: int = 6000) -> str:
        """The end of the Synapse log and stdout."""
        out = self.log()[-limit:]
        try:
            with open(
                os.path.join(self.dir, "stdout.log"), encoding="utf-8", errors="replace"
            ) as f:
                out += "\n--- stdout:\n" + f.read()[-2000:]
        except FileNotFoundError:
            pass
        return out

    def register(self, localpart: str, password: str, admin: bool = False) -> str:
        """Register a user with Synapse's shared-secret admin registration."""
        url = f"{self.client_url}/_synapse/admin/v1/register"
        nonce = call("GET", url).json["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(
            b"\x00".join(
                [
                    nonce.encode(),
                    localpart.encode(),
                    password.encode(),
                    b"admin" if admin else b"notadmin",
                ]
            )
        )
        result = call(
            "POST",
            url,
            {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            },
        )
        if result.code != 200:
            raise RuntimeError(f"registration of {localpart} failed: {result}")
        return str(result.json["user_id"])

    def login(
        self, localpart: str, password: str, base: str | None = None
    ) -> tuple[str, str]:
        """Log in through Synapse; returns (access token, device id)."""
        result = call(
            "POST",
            f"{base or self.front_url}/_matrix/client/v3/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": localpart},
                "password": password,
            },
        )
        if result.code != 200:
            raise RuntimeError(f"login of {localpart} failed: {result}")
        return str(result.json["access_token"]), str(result.json["device_id"])


def user_path(user_id: str) -> str:
    """A user id as a URL path segment."""
    return quote(user_id, safe="")
