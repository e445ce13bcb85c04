"""The embedded host's own client endpoints: login, whoami, logout, versions."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from twisted.internet import threads
from twisted.web.resource import Resource
from twisted.web.server import Request

from synapse_xsign_module.errors import (
    Codes,
    MatrixError,
    bad_json,
    forbidden,
    not_found,
)
from synapse_xsign_module.handlers.admin import page_body, parse_page, require_json_bool
from synapse_xsign_module.handlers.validation import server_of
from synapse_xsign_module.hosts.embedded.accounts import DeviceIdInUse, User
from synapse_xsign_module.hosts.embedded.host_auth import get_access_token
from synapse_xsign_module.hosts.embedded.passwords import check_password, hash_password
from synapse_xsign_module.hosts.embedded.uia import qualify_user
from synapse_xsign_module.http.admin import (
    SYNAPSE_ADMIN_USERS,
    USER,
    build_synapse_compat_resource,
    require_admin,
)
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


async def _issue_token(
    host: EmbeddedHost, user: User, device_id: str | None, display_name: str | None
) -> tuple[str, str]:
    """An access token for an active account, on a new or given device.

    Raises:
        MatrixError: 403 for a deactivated account, or a device id equal to one
            of the user's cross-signing keys.
    """
    if user.deactivated:
        raise MatrixError(
            403, Codes.USER_DEACTIVATED, "This account has been deactivated"
        )
    try:
        return await host.accounts.login(
            user.user_id, device_id, display_name, host.service.clock.time_msec()
        )
    except DeviceIdInUse:
        raise forbidden(
            "The device ID is in use: it equals one of the cross-signing keys"
        ) from None


def _login_resource(host: EmbeddedHost) -> JsonResource:
    resource = JsonResource("login")
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
        if device_id is not None and (
            not isinstance(device_id, str) or not 0 < len(device_id) <= 255
        ):
            raise bad_json("device_id must be a string of 1 to 255 characters")
        display_name = body.get("initial_device_display_name")
        if display_name is not None and not isinstance(display_name, str):
            raise bad_json("initial_device_display_name must be a string")

        account = await host.accounts.get_user(user_id)
        stored = account.password_hash if account is not None else None
        ok = await threads.deferToThread(check_password, password, stored)
        if account is None or not ok:
            raise forbidden("Invalid username or password")
        token, device = await _issue_token(host, account, device_id, display_name)
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
    resource = JsonResource("whoami")

    async def whoami(request: Request) -> tuple[int, JsonDict]:
        who = await host.authenticate(request)
        body: JsonDict = {"user_id": who.user_id, "is_guest": who.is_guest}
        if who.device_id is not None:
            body["device_id"] = who.device_id
        return 200, body

    resource.add_route("GET", "", whoami)
    return resource


def _logout_resource(host: EmbeddedHost) -> JsonResource:
    resource = JsonResource("logout")

    async def logout(request: Request) -> tuple[int, JsonDict]:
        who = await host.authenticate(request)
        token = get_access_token(request)
        assert token is not None
        await host.accounts.logout(token)
        logger.info("%s logged out of device %s", who.user_id, who.device_id)
        if who.device_id is not None:
            host.notify_device_update(who.user_id, [who.device_id])
        return 200, {}

    resource.add_route("POST", "", logout)
    return resource


def _versions_resource() -> JsonResource:
    resource = JsonResource("versions")

    async def versions(request: Request) -> tuple[int, JsonDict]:
        return 200, {"versions": SPEC_VERSIONS, "unstable_features": {}}

    resource.add_route("GET", "", versions)
    return resource


def _user_json(user: User) -> JsonDict:
    return {
        "user_id": user.user_id,
        "admin": user.is_admin,
        "deactivated": user.deactivated,
        "has_password": user.password_hash is not None,
        "created_ts": user.created_ts,
    }


def add_account_admin_routes(host: EmbeddedHost, resource: JsonResource) -> None:
    """Add the embedded host's account management to the admin API resource."""
    max_body = host.service.config.max_request_body_size

    async def list_users(request: Request) -> tuple[int, JsonDict]:
        await require_admin(host, request)
        offset, limit = parse_page(request.args or {})
        users, total = await host.accounts.list_users(offset, limit)
        return 200, page_body("users", [_user_json(u) for u in users], offset, total)

    async def put_user(request: Request, user_id: str) -> tuple[int, JsonDict]:
        admin = await require_admin(host, request)
        if server_of(user_id) != host.server_name:
            raise bad_json(f"{user_id} is not a user id on {host.server_name}")
        body = read_json_body(request, max_body)
        password = body.get("password")
        if password is not None and (not isinstance(password, str) or not password):
            raise bad_json("'password' must be a non-empty string")
        is_admin = require_json_bool(body, "admin")
        deactivated = require_json_bool(body, "deactivated")
        password_hash = (
            await threads.deferToThread(hash_password, password) if password else None
        )
        user, created = await host.accounts.upsert_user(
            user_id,
            host.service.clock.time_msec(),
            password_hash=password_hash,
            is_admin=is_admin,
            deactivated=deactivated,
        )
        logger.info(
            "Admin %s %s account %s (admin=%s, deactivated=%s, password %s)",
            admin.user_id,
            "created" if created else "updated",
            user_id,
            is_admin,
            deactivated,
            "set" if password else "unchanged",
        )
        if deactivated:
            host.notify_device_update(user_id, [])
        return (201 if created else 200), _user_json(user)

    async def login_as(request: Request, user_id: str) -> tuple[int, JsonDict]:
        admin = await require_admin(host, request)
        body = read_json_body(request, max_body)
        device_id = body.get("device_id")
        if device_id is not None and (
            not isinstance(device_id, str) or not 0 < len(device_id) <= 255
        ):
            raise bad_json("'device_id' must be a string of 1 to 255 characters")
        user = await host.accounts.get_user(user_id)
        if user is None:
            raise not_found(f"Unknown user {user_id}")
        token, device = await _issue_token(host, user, device_id, None)
        logger.info(
            "Admin %s issued a token for %s on device %s",
            admin.user_id,
            user_id,
            device,
        )
        return 200, {"user_id": user_id, "access_token": token, "device_id": device}

    resource.add_route("GET", "users", list_users)
    resource.add_route("PUT", f"users/{USER}", put_user)
    resource.add_route("POST", f"users/{USER}/login", login_as)


def mount_host_resources(host: EmbeddedHost) -> None:
    """Register the embedded host's own endpoints (after the module's)."""
    if host.service.admin_resource is not None:
        add_account_admin_routes(host, host.service.admin_resource)
    host.register_resource(
        SYNAPSE_ADMIN_USERS, build_synapse_compat_resource(host.service)
    )
    login = _login_resource(host)
    whoami = _whoami_resource(host)
    logout = _logout_resource(host)
    for version in ("r0", "v3"):
        host.register_resource(f"/_matrix/client/{version}/login", login)
        host.register_resource(f"/_matrix/client/{version}/account/whoami", whoami)
        host.register_resource(f"/_matrix/client/{version}/logout", logout)
    host.register_resource("/_matrix/client/versions", _versions_resource())
    host.register_resource("/health", HealthResource())
