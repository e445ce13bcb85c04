"""Recently verified access tokens, so that most requests skip the token read.

Entries are keyed by the token's SHA-256 digest (the token itself is not kept)
and live for a short time. Revocations made by this process clear the cache at
once; those made by another process (another ``--workers`` process) take
effect here when the entry expires.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from synapse_xsign_module.clock import Clock

V = TypeVar("V")

#: Most tokens remembered at once; the oldest entry makes way for a new one.
MAX_ENTRIES = 50_000


class TokenCache(Generic[V]):
    """A small time-limited map from token digest to what the token means.

    Args:
        clock: the module clock.
        ttl_ms: how long an entry is trusted; 0 turns the cache off.
        max_entries: the most entries kept.
    """

    def __init__(self, clock: Clock, ttl_ms: int, max_entries: int = MAX_ENTRIES):
        self._clock = clock
        self._ttl_ms = ttl_ms
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._generation = 0

    @property
    def generation(self) -> int:
        """Changes whenever the cache is cleared; see :meth:`put`."""
        return self._generation

    def get(self, digest: str) -> V | None:
        """The remembered value, or None when unknown or expired."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        value, expires = entry
        if expires <= self._clock.time_msec():
            del self._entries[digest]
            return None
        return value

    def put(self, digest: str, value: V, generation: int) -> None:
        """Remember a value read from the database.

        Args:
            digest: the token digest.
            value: what the read found.
            generation: :attr:`generation` from before the read started. If the
                cache was cleared since, the read may predate a revocation and
                is not remembered.
        """
        if self._ttl_ms <= 0 or generation != self._generation:
            return
        self._entries[digest] = (value, self._clock.time_msec() + self._ttl_ms)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (a token was revoked or an account deactivated)."""
        self._entries.clear()
        self._generation += 1

    def __len__(self) -> int:
        return len(self._entries)
