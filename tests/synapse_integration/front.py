"""A small routing front, as the README's reverse proxy: run as a process.

``python -m tests.synapse_integration.front LISTEN_PORT CLIENT_PORT MODULE_PORT``
sends the key endpoints to MODULE_PORT (the Synapse listener without
``client``) and every other request to CLIENT_PORT.
"""

from __future__ import annotations

import re
import sys

from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

#: The routing regex README gives for nginx and Caddy.
KEY_PATHS = re.compile(
    r"^/_matrix/client/(r0|v3|unstable)/keys/"
    r"(upload|query|claim|device_signing/upload|signatures/upload)$"
)


class Router(Resource):
    """Forwards each request, path and query intact, to one of two ports."""

    isLeaf = True

    def __init__(self, client_port: int, module_port: int) -> None:
        super().__init__()
        self._client_port = client_port
        self._module_port = module_port

    def render(self, request: Request) -> int:
        """Proxy the request."""
        path = request.path.decode("utf-8", "replace")
        port = self._module_port if KEY_PATHS.match(path) else self._client_port
        proxy = ReverseProxyResource("127.0.0.1", port, request.path)
        proxy.render(request)
        return NOT_DONE_YET


def main() -> None:
    """Serve until killed."""
    listen, client, module = (int(a) for a in sys.argv[1:4])
    site = Site(Router(client, module))
    site.noisy = False
    reactor.listenTCP(listen, site, interface="127.0.0.1")
    print(f"front listening on {listen}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
