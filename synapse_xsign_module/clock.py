"""Time as the module sees it: the reactor's clock, in milliseconds."""

from __future__ import annotations

from typing import Any


class Clock:
    """Reads the time from the reactor, so that tests can move it.

    Args:
        reactor: anything with ``seconds()`` (a reactor or a task.Clock).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def time_msec(self) -> int:
        """Milliseconds since the epoch."""
        return int(self._reactor.seconds() * 1000)
