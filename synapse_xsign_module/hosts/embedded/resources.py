"""The embedded host's own client endpoints: login, whoami, logout, versions."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from twisted.internet import threads
from twisted.web.resource import Resource
from twisted.web.server import Request

from synapse_xsign_module.errors import Codes, MatrixError, bad_json, forbidden
from synapse_xsign_module.hosts.embedded.accounts import DeviceIdInUse
from synapse_xsign_module.hosts.embedded.host_auth import get_access_token
from synapse_xsign_module.hosts.embedded.passwords import check_password
from synapse_xsign_module.hosts.embedded.uia import qualify_user
from synapse_xsign_module.http.base import JsonDict, JsonResource, read_json_body

if TYPE_CHECKING:
    from synapse_xsign_module.hosts.embedded.host import EmbeddedHost

logger = logging.getLogger(__name__)

SPEC_VERSIONS = [
    "r0.6.1",
    "v1.1",
    "v1.2",
    "v1.3",
    "v1.4",
    "v1.5",
    "v1.6",
    "v1.7",
    "v1.8",
    "v1.9",
    "v1.10",
    "v1.11",
]


class HealthResource(Resource):
    """``GET /health``: 200 ``OK`` while the process serves requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render_GET(self, request: Request) -> bytes:
        """Plain-text OK."""
        request.setHeader(b"Content-Type", b"text/plain")
        return b"OK"


def _login_resource(host: EmbeddedHost) -> JsonResource:
    resource = JsonResource()
    max_body = host.service.config.max_request_body_size

    async def get_flows(request: Request) -> tuple[int, JsonDict]:
        return 200, {"flows": [{"type": "m.login.password"}]}

    async def login(request: Request) -> tuple[int, JsonDict]:
        body = read_json_body(request, max_body)
        if body.get("type") != "m.login.password":
            raise MatrixError(400, Codes.UNKNOWN, "Only m.login.password is supported")
        identifier = body.get("identifier")
        if identifier is not None:
            if (
                not isinstance(identifier, dict)
                or identifier.get("type") != "m.id.user"
            ):
                raise bad_json("identifier must be an m.id.user identifier")
            who = identifier.get("user")
        else:
            who = body.get("user")
        password = body.get("password")
        if not isinstance(who, str) or not isinstance(password, str):
            raise bad_json("user and password are required strings")
        user_id = qualify_user(who, host.server_name)
        device_id = body.get("device_id")
        if device_id is not None and (not isinstance(device_id, str) or not device_id):
            raise bad_json("device_id must be a non-empty string")
        display_name = body.get("initial_device_display_name")
        if display_name is not None and not isinstance(display_name, str):
            raise bad_json("initial_device_display_name must be a string")

        account = await host.accounts.get_user(user_id)
        stored = account.password_hash if account is not None else None
        ok = await threads.deferToThread(check_password, password, stored)
        if account is None or not ok:
            raise forbidden("Invalid username or password")
        if account.deactivated:
            raise MatrixError(
                403, Codes.USER_DEACTIVATED, "This account has been deactivated"
            )
        try:
            token, device = await host.accounts.login(
                user_id, device_id, display_name, host.service.clock.time_msec()
            )
        except DeviceIdInUse:
            raise forbidden(
                "The device ID is in use: it equals one of your cross-signing keys"
            ) from None
        logger.info("%s logged in on device %s", user_id, device)
        return 200, {
            "user_id": user_id,
            "access_token": token,
            "device_id": device,
            "home_server": host.server_name,
        }

    resource.add_route("GET", "", get_flows)
    resource.add_route("POST", "", login)
    return resource


def _whoami_resource(host: EmbeddedHost) -> JsonResource:
    resource = JsonResource()

    async def whoami(request: Request) -> tuple[int, JsonDict]:
        who = await host.authenticate(request)
        body: JsonDict = {"user_id": who.user_id, "is_guest": who.is_guest}
        if who.device_id is not None:
            body["device_id"] = who.device_id
        return 200, body

    resource.add_route("GET", "", whoami)
    return resource


def _logout_resource(host: EmbeddedHost) -> JsonResource:
    resource = JsonResource()

    async def logout(request: Request) -> tuple[int, JsonDict]:
        who = await host.authenticate(request)
        token = get_access_token(request)
        assert token is not None
        await host.accounts.logout(token)
        logger.info("%s logged out of device %s", who.user_id, who.device_id)
        host.notify_keys_changed([who.user_id])
        return 200, {}

    resource.add_route("POST", "", logout)
    return resource


def _versions_resource() -> JsonResource:
    resource = JsonResource()

    async def versions(request: Request) -> tuple[int, JsonDict]:
        return 200, {"versions": SPEC_VERSIONS, "unstable_features": {}}

    resource.add_route("GET", "", versions)
    return resource


def mount_host_resources(host: EmbeddedHost) -> None:
    """Register the embedded host's own endpoints."""
    login = _login_resource(host)
    whoami = _whoami_resource(host)
    logout = _logout_resource(host)
    for version in ("r0", "v3"):
        host.register_resource(f"/_matrix/client/{version}/login", login)
        host.register_resource(f"/_matrix/client/{version}/account/whoami", whoami)
        host.register_resource(f"/_matrix/client/{version}/logout", logout)
    host.register_resource("/_matrix/client/versions", _versions_resource())
    host.register_resource("/health", HealthResource())
