"""The client-server key endpoints under ``/_matrix/client/{r0,v3,unstable}/keys``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from twisted.web.server import Request

from synapse_xsign_module.host import Host, Requester
from synapse_xsign_module.http.base import JsonDict, JsonResource, read_json_body

if TYPE_CHECKING:
    from synapse_xsign_module.service import XSignService

ALL_VERSIONS = ("r0", "v3", "unstable")
#: ``device_signing/upload`` is not served under r0 (it came with v1.1).
NO_R0 = ("v3", "unstable")

KeyHandler = Callable[[Request, Requester, JsonDict], Awaitable[JsonDict]]


def key_paths() -> dict[str, tuple[str, ...]]:
    """Endpoint (below ``keys/``) -> the versions it is served under."""
    return {
        "upload": ALL_VERSIONS,
        "query": ALL_VERSIONS,
        "claim": ALL_VERSIONS,
        "device_signing/upload": NO_R0,
        "signatures/upload": ALL_VERSIONS,
    }


def _endpoint(
    name: str,
    host: Host,
    max_body: int,
    handler: KeyHandler,
    allow_guest: bool = True,
) -> JsonResource:
    """A leaf resource serving ``POST`` at exactly its mount point."""
    resource = JsonResource(name)

    async def on_post(request: Request) -> tuple[int, JsonDict]:
        requester = await host.authenticate(request, allow_guest=allow_guest)
        body = read_json_body(request, max_body)
        return 200, await handler(request, requester, body)

    resource.add_route("POST", "", on_post)
    return resource


def register_key_resources(host: Host, service: XSignService) -> list[str]:
    """Mount every key endpoint on the host.

    Returns:
        The paths registered.
    """
    max_body = service.config.max_request_body_size

    async def upload(_r: Request, who: Requester, body: JsonDict) -> JsonDict:
        return await service.device_keys.upload(who, body)

    async def query(_r: Request, who: Requester, body: JsonDict) -> JsonDict:
        return await service.device_keys.query(who, body)

    async def claim(_r: Request, who: Requester, body: JsonDict) -> JsonDict:
        return await service.device_keys.claim(who, body)

    async def device_signing(r: Request, who: Requester, body: JsonDict) -> JsonDict:
        return await service.cross_signing.upload(r, who, body)

    async def signatures(_r: Request, who: Requester, body: JsonDict) -> JsonDict:
        return await service.signatures.upload(who, body)

    handlers: dict[str, KeyHandler] = {
        "upload": upload,
        "query": query,
        "claim": claim,
        # Guests reach the handler, which answers M_GUEST_ACCESS_FORBIDDEN.
        "device_signing/upload": device_signing,
        "signatures/upload": signatures,
    }
    paths = []
    for name, versions in key_paths().items():
        resource = _endpoint(f"keys/{name}", host, max_body, handlers[name])
        for version in versions:
            path = f"/_matrix/client/{version}/keys/{name}"
            host.register_resource(path, resource)
            paths.append(path)
    return paths
