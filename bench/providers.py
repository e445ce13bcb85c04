"""How the bench gets users and logged-in devices on a homeserver.

- :class:`EmbeddedAdminProvider`: the embedded host's admin API
  (``PUT /_synapse/client/xsign/admin/v1/users/{user}`` creates an account
  without a password, ``POST .../users/{user}/login`` issues a token for a
  named device). Needs a server admin's token (the bench registers an admin
  with the ``synapse-xsign`` CLI when it starts the host itself).
- :class:`SynapseSharedSecretProvider`: Synapse's shared-secret registration
  (``/_synapse/admin/v1/register``, nonce + HMAC-SHA1) and password ``/login``
  for each device. For a benchmark, give Synapse ``bcrypt_rounds: 4`` and
  generous ``rc_login`` / ``rc_registration`` limits; the bench waits out 429s.
  It registers one admin account to open replacement windows.

W4 replaces a user's self-signing key before each request (so every signature
it sends is new): on the embedded host (or a Synapse that loads the module)
inside the module's admin-opened replacement window, on Synapse itself with
password UIA (Synapse's own window applies only with delegated auth).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Protocol
from urllib.parse import quote

from bench.http import JsonClient, JsonDict, RequestFailed

ADMIN_API = "/_synapse/client/xsign/admin/v1"


#: The admin endpoint that lets a user replace cross-signing keys without UIA.
ALLOW_REPLACEMENT = "_allow_cross_signing_replacement_without_uia"


def replacement_window_path(user_id: str) -> str:
    """The module's admin path that opens ``user_id``'s replacement window."""
    return f"{ADMIN_API}/users/{quote(user_id, safe='')}/{ALLOW_REPLACEMENT}"


class UserProvider(Protocol):
    """Makes accounts and logs devices in."""

    kind: str

    async def prepare(self) -> None:
        """Anything needed before the first account (e.g. an admin login)."""

    def user_id(self, localpart: str) -> str:
        """The user id of a localpart on this server (after :meth:`prepare`)."""

    async def create_user(self, localpart: str) -> str:
        """Create an account; returns its user id."""

    async def login(self, user_id: str, device_id: str) -> str:
        """Log ``user_id`` in on ``device_id``; returns the access token."""

    async def allow_key_replacement(self, user_id: str) -> None:
        """Let ``user_id`` replace cross-signing keys without UIA for a while,
        where the server offers that."""

    def replacement_auth(self, user_id: str) -> JsonDict | None:
        """The UIA ``auth`` a key replacement must carry (None: no UIA)."""


class EmbeddedAdminProvider:
    """Accounts through the embedded host's admin API.

    Args:
        client: the server's client.
        admin_token: a server admin's access token, or None to log in with
            ``admin_user`` / ``admin_password``.
    """

    kind = "embedded-admin"

    def __init__(
        self,
        client: JsonClient,
        admin_token: str | None = None,
        admin_user: str | None = None,
        admin_password: str | None = None,
    ) -> None:
        self._client = client
        self._token = admin_token
        self._admin_user = admin_user
        self._admin_password = admin_password
        self.server_name = ""

    async def prepare(self) -> None:
        """Log the admin in if needed and learn the server name (whoami)."""
        if self._token is None:
            if not self._admin_user or not self._admin_password:
                raise RequestFailed(
                    "the embedded-admin provider needs an admin token "
                    "(--admin-token) or an admin user and password"
                )
            body = await self._client.must(
                "POST",
                "/_matrix/client/v3/login",
                {
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": self._admin_user},
                    "password": self._admin_password,
                    "device_id": "BENCHADMIN",
                },
                what="admin login",
            )
            self._token = str(body["access_token"])
        who = await self._client.must(
            "GET", "/_matrix/client/v3/account/whoami", token=self._token
        )
        self.server_name = str(who["user_id"]).split(":", 1)[1]

    def user_id(self, localpart: str) -> str:
        """``@localpart:server``."""
        return f"@{localpart}:{self.server_name}"

    async def create_user(self, localpart: str) -> str:
        """``PUT`` the account (no password: logins go through the admin API)."""
        user_id = self.user_id(localpart)
        await self._client.must(
            "PUT",
            f"{ADMIN_API}/users/{quote(user_id, safe='')}",
            {},
            token=self._token,
            ok=(200, 201),
            what=f"create {user_id}",
        )
        return user_id

    async def login(self, user_id: str, device_id: str) -> str:
        """A token for ``device_id`` issued by the admin API."""
        body = await self._client.must(
            "POST",
            f"{ADMIN_API}/users/{quote(user_id, safe='')}/login",
            {"device_id": device_id},
            token=self._token,
            what=f"login {user_id}/{device_id}",
        )
        return str(body["access_token"])

    async def allow_key_replacement(self, user_id: str) -> None:
        """Open the module's replacement window for ``user_id``."""
        await self._client.must(
            "POST",
            replacement_window_path(user_id),
            {},
            token=self._token,
            what=f"replacement window for {user_id}",
        )

    def replacement_auth(self, user_id: str) -> JsonDict | None:
        """None: the replacement window stands in for UIA."""
        return None


def registration_mac(
    secret: str, nonce: str, user: str, password: str, admin: bool
) -> str:
    """Synapse's shared-secret registration MAC (HMAC-SHA1, hex).

    Over ``nonce \\0 user \\0 password \\0 admin|notadmin``.
    """
    mac = hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha1)
    for i, part in enumerate((nonce, user, password, "admin" if admin else "notadmin")):
        if i:
            mac.update(b"\x00")
        mac.update(part.encode("utf-8"))
    return mac.hexdigest()


class SynapseSharedSecretProvider:
    """Accounts through Synapse's shared-secret registration, devices by /login.

    Args:
        client: the server's client.
        shared_secret: ``registration_shared_secret`` of ``homeserver.yaml``.
    """

    kind = "synapse-shared-secret"

    def __init__(self, client: JsonClient, shared_secret: str) -> None:
        self._client = client
        self._secret = shared_secret
        self._password = "bench-" + secrets.token_urlsafe(12)
        self._admin_token = ""
        #: Whether the module's replacement window works (None: not known yet).
        self._window: bool | None = None
        self.server_name = ""

    async def prepare(self) -> None:
        """Register one admin account: it tells the server name and opens
        replacement windows."""
        body = await self._register("benchadmin" + secrets.token_hex(4), admin=True)
        self.server_name = str(body["user_id"]).split(":", 1)[1]
        self._admin_token = str(body["access_token"])

    def user_id(self, localpart: str) -> str:
        """``@localpart:server``."""
        return f"@{localpart}:{self.server_name}"

    async def _register(self, localpart: str, admin: bool = False) -> JsonDict:
        path = "/_synapse/admin/v1/register"
        nonce = await self._client.must("GET", path, what="registration nonce")
        body = await self._client.must(
            "POST",
            path,
            {
                "nonce": nonce["nonce"],
                "username": localpart,
                "password": self._password,
                "admin": admin,
                "mac": registration_mac(
                    self._secret, str(nonce["nonce"]), localpart, self._password, admin
                ),
            },
            what=f"register {localpart}",
        )
        return body

    async def create_user(self, localpart: str) -> str:
        """Register the account (Synapse also logs it in once; that token is unused)."""
        return str((await self._register(localpart))["user_id"])

    async def allow_key_replacement(self, user_id: str) -> None:
        """Open the module's replacement window when Synapse loads the module
        (which then serves the upload). Synapse's own window applies only with
        delegated auth (MAS), so otherwise replacements carry password UIA."""
        if self._window is False:
            return
        answer = await self._client.request(
            "POST",
            replacement_window_path(user_id),
            {},
            token=self._admin_token,
        )
        self._window = answer.code == 200

    def replacement_auth(self, user_id: str) -> JsonDict | None:
        """Password UIA in the request itself (Synapse starts the session and
        completes the stage at once), unless the module's window is open."""
        if self._window:
            return None
        return {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user_id},
            "password": self._password,
        }

    async def login(self, user_id: str, device_id: str) -> str:
        """Password login on ``device_id``."""
        body = await self._client.must(
            "POST",
            "/_matrix/client/v3/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user_id},
                "password": self._password,
                "device_id": device_id,
            },
            what=f"login {user_id}/{device_id}",
        )
        return str(body["access_token"])
