"""Routes of the admin API under ``/_synapse/client/xsign/admin/v1``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.server import Request

from synapse_xsign_module.errors import forbidden
from synapse_xsign_module.handlers.admin import parse_page
from synapse_xsign_module.host import Host, Requester
from synapse_xsign_module.http.base import JsonDict, JsonResource

if TYPE_CHECKING:
    from synapse_xsign_module.service import XSignService

ADMIN_PREFIX = "/_synapse/client/xsign/admin/v1"
#: Synapse's own path for the replacement window, served by the embedded host.
SYNAPSE_ADMIN_USERS = "/_synapse/admin/v1/users"
USER = r"(?P<user_id>[^/]+)"
ALLOW_REPLACEMENT = "_allow_cross_signing_replacement_without_uia"


async def require_admin(host: Host, request: Request) -> Requester:
    """Authenticate the request and insist on a server admin (every request).

    Raises:
        MatrixError: 401 without a valid token, 403 for a non-admin.
    """
    requester = await host.authenticate(request, allow_guest=False)
    if requester.is_guest or not await host.is_admin(requester.user_id):
        raise forbidden("You are not a server admin")
    return requester


def build_admin_resource(service: XSignService) -> JsonResource:
    """The admin API resource (the embedded host adds its account routes)."""
    host = service.host
    admin = service.admin
    resource = JsonResource("admin")

    async def user_keys(request: Request, user_id: str) -> tuple[int, JsonDict]:
        await require_admin(host, request)
        return 200, await admin.user_keys(user_id)

    async def history(request: Request, user_id: str) -> tuple[int, JsonDict]:
        await require_admin(host, request)
        offset, limit = parse_page(request.args or {})
        return 200, await admin.history(user_id, offset, limit)

    async def allow_replacement(request: Request, user_id: str) -> tuple[int, JsonDict]:
        who = await require_admin(host, request)
        return 200, await admin.allow_replacement(who.user_id, user_id)

    async def reset(request: Request, user_id: str) -> tuple[int, JsonDict]:
        who = await require_admin(host, request)
        return 200, await admin.reset_cross_signing(who.user_id, user_id)

    async def delete_device(
        request: Request, user_id: str, device_id: str
    ) -> tuple[int, JsonDict]:
        who = await require_admin(host, request)
        return 200, await admin.delete_device_keys(who.user_id, user_id, device_id)

    async def stats(request: Request) -> tuple[int, JsonDict]:
        await require_admin(host, request)
        return 200, await admin.stats()

    resource.add_route("GET", f"users/{USER}/keys", user_keys)
    resource.add_route("GET", f"users/{USER}/cross_signing/history", history)
    resource.add_route("POST", f"users/{USER}/{ALLOW_REPLACEMENT}", allow_replacement)
    resource.add_route("DELETE", f"users/{USER}/cross_signing", reset)
    resource.add_route(
        "DELETE", f"users/{USER}/devices/(?P<device_id>[^/]+)/keys", delete_device
    )
    resource.add_route("GET", "stats", stats)
    return resource


def build_synapse_compat_resource(service: XSignService) -> JsonResource:
    """``/_synapse/admin/v1/users/{user_id}/_allow_cross_signing_...`` (embedded)."""
    resource = JsonResource("admin")

    async def allow_replacement(request: Request, user_id: str) -> tuple[int, JsonDict]:
        who = await require_admin(service.host, request)
        return 200, await service.admin.allow_replacement(who.user_id, user_id)

    resource.add_route("POST", f"{USER}/{ALLOW_REPLACEMENT}", allow_replacement)
    return resource
