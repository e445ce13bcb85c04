"""Users' keys as ``/keys/query`` serves them, kept between requests.

Clients ask for the same users again and again (every member of every
encrypted room), while a user's keys change rarely. An entry holds one user's
keys already rendered (:class:`~synapse_xsign_module.handlers.user_keys.UserKeys`),
tagged with the key version they were read at (see
:mod:`~synapse_xsign_module.storage.versions`). Every query reads the current
versions in its transaction and uses an entry only at an equal version, so a
change made by any process sharing the database is seen at once.

What depends on who asks is never part of an entry: the user-signing key is
held but shown to its owner alone, and signatures made with another user's
user-signing key are read for each request.
"""

from __future__ import annotations

from collections import OrderedDict

from synapse_xsign_module.handlers.user_keys import UserKeys
from synapse_xsign_module.metrics import QUERY_CACHE_LOOKUPS, QUERY_CACHE_SIZE


class UserKeysCache:
    """The most recently used users' keys, up to a size in bytes.

    Used from the reactor thread only.

    Args:
        max_bytes: the bound; 0 turns the cache off.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[str, UserKeys] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def held(self, user_ids: list[str]) -> dict[str, UserKeys]:
        """The entries held for some users (at whatever version)."""
        entries = self._entries
        return {u: entries[u] for u in user_ids if u in entries}

    def used(self, hits: list[str], misses: int) -> None:
        """Mark entries as just used, and count the lookups."""
        for user_id in hits:
            if user_id in self._entries:
                self._entries.move_to_end(user_id)
        QUERY_CACHE_LOOKUPS.labels("hit").inc(len(hits))
        QUERY_CACHE_LOOKUPS.labels("miss").inc(misses)

    def put(self, user_id: str, keys: UserKeys) -> None:
        """Hold a user's keys, dropping the least recently used beyond the
        bound. An entry at a newer version (put by a request that read later)
        is kept."""
        held = self._entries.get(user_id)
        if held is not None and (held.version or 0) > (keys.version or 0):
            return
        if keys.size > self.max_bytes:
            self.discard(user_id)
            return
        old = self._entries.pop(user_id, None)
        if old is not None:
            self.size -= old.size
        self._entries[user_id] = keys
        self.size += keys.size
        while self.size > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.size -= dropped.size
        QUERY_CACHE_SIZE.set(self.size)

    def discard(self, user_id: str) -> None:
        """Forget a user's entry."""
        old = self._entries.pop(user_id, None)
        if old is not None:
            self.size -= old.size
            QUERY_CACHE_SIZE.set(self.size)
