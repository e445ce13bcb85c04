"""Concurrent reads of single keys, coalesced into one read transaction.

Under load most of the cost of a small read is not the database's: it is the
hand-over to the thread pool and back, and the driver's work per statement,
all under the server process's one GIL. In a busy server on PostgreSQL
(W3 of the benchmark: an identical cross-signing upload again), the one-row
read of the current keys cost about 0.6 ms per request, the rest of the
request 0.24 ms. A :class:`BatchedReader` lets the requests that want the
same kind of read at the same time share one transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Generic, TypeVar

from sqlalchemy import Connection

from twisted.internet import defer
from twisted.python.failure import Failure

from synapse_xsign_module.storage.database import Database

K = TypeVar("K")
V = TypeVar("V")

#: Most keys read in one transaction.
MAX_BATCH = 256


class BatchedReader(Generic[K, V]):
    """Reads single keys for many callers, in as few transactions as it can.

    One read is under way at a time. The keys asked for meanwhile wait, and
    are read together as soon as it ends. A caller never joins a read that is
    already under way: its read starts after it asked, so it sees everything
    committed before it asked, as a read of its own would. The first key
    asked for while nothing is under way is read at the end of the current
    reactor iteration, together with whatever else the requests handled in
    that iteration ask for.

    Args:
        db: the database.
        desc: the transaction's name in logs and metrics.
        read_txn: ``(conn, keys) -> {key: value}``, run as one read
            transaction; keys it leaves out get ``missing()``.
        missing: the value of a key that ``read_txn`` did not return.
        max_batch: most keys in one transaction.
        shared: False to give every caller a read of its own (each through
            :meth:`Database.run_read`, as any other read), where the host does
            not allow one call to answer several requests
            (:attr:`Host.shares_reads`).
    """

    def __init__(
        self,
        db: Database,
        desc: str,
        read_txn: Callable[[Connection, list[K]], dict[K, V]],
        missing: Callable[[], V],
        max_batch: int = MAX_BATCH,
        shared: bool = True,
    ) -> None:
        self._db = db
        self._desc = desc
        self._read_txn = read_txn
        self._missing = missing
        self._max_batch = max_batch
        self._shared = shared
        self._waiting: dict[K, list[defer.Deferred[V]]] = {}
        self._reading = False
        self._scheduled = False
        #: Transactions run and keys read (for tests).
        self.batches = 0
        self.keys_read = 0

    def get(self, key: K) -> defer.Deferred[V]:
        """Read one key.

        Args:
            key: what to read.

        Returns:
            A Deferred with the key's value, or with the read's failure.
        """
        if not self._shared:
            self.batches += 1
            self.keys_read += 1
            return self._db.run_read(self._desc, self._read_one, key)
        d: defer.Deferred[V] = defer.Deferred()
        self._waiting.setdefault(key, []).append(d)
        if not self._reading and not self._scheduled:
            self._scheduled = True
            self._db.reactor.callLater(0, self._start)
        return d

    def _read_one(self, conn: Connection, key: K) -> V:
        result = self._read_txn(conn, [key])
        return result[key] if key in result else self._missing()

    def _start(self) -> None:
        """Read the waiting keys (up to the batch size), unless a read is on."""
        self._scheduled = False
        if self._reading or not self._waiting:
            return
        keys = list(islice(self._waiting, self._max_batch))
        waiters = {key: self._waiting.pop(key) for key in keys}
        self._reading = True
        self.batches += 1
        self.keys_read += len(keys)
        try:
            d = self._db.run_read(self._desc, self._read_txn, keys)
        except Exception:
            # Not even started: its callers fail, and the rest go on.
            self._finished(Failure(), waiters)
            return
        d.addBoth(self._finished, waiters)

    def _finished(
        self, result: dict[K, V] | Failure, waiters: dict[K, list[defer.Deferred[V]]]
    ) -> None:
        self._reading = False
        # The next read first: it runs in the pool while the callers go on.
        self._start()
        if isinstance(result, Failure):
            for ds in waiters.values():
                for d in ds:
                    d.errback(result)
            return
        for key, ds in waiters.items():
            for d in ds:
                # Callers of one key share its value: it is read-only.
                d.callback(result[key] if key in result else self._missing())

    def __repr__(self) -> str:
        return f"BatchedReader({self._desc!r})"
