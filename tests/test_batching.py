"""Reads of single keys coalesced into one transaction (``BatchedReader``), and
the cross-signing state read that uses it."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Connection

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from synapse_xsign_module.hosts.embedded.accounts import AccountStore
from synapse_xsign_module.jsonutil import canonical_json
from synapse_xsign_module.storage.batching import BatchedReader
from synapse_xsign_module.storage.cross_signing import (
    CrossSigningStore,
    NewKey,
    get_state_txn,
)
from tests.utils import (
    cross_signing_key,
    make_config,
    new_signing_key,
    prepare_database,
    public_key,
    remove_sqlite,
    test_db_url,
)


class _Source:
    """What the fake reads see: a dict, with reads that can be held open."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.batches: list[list[str]] = []
        self.hold: threading.Event | None = None
        self.started = threading.Event()
        self.fail_next = False

    def read(self, conn: Connection, keys: list[str]) -> dict[str, int]:
        self.batches.append(list(keys))
        # What this read sees is fixed when it starts, as a snapshot is.
        seen = {k: self.values[k] for k in keys if k in self.values}
        self.started.set()
        if self.hold is not None:
            self.hold.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise ValueError("the read failed")
        return seen


async def _until(condition: Any) -> None:
    """Let the reactor run until ``condition()`` holds (at most 5 s)."""
    for _ in range(500):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition never held")


class _DatabaseCase(unittest.TestCase):
    """A migrated, empty database of the engine under test, started."""

    def setUp(self) -> None:
        url = test_db_url()
        if url.startswith("sqlite:///"):
            self.addCleanup(remove_sqlite, url[len("sqlite:///") :])
        self.db = prepare_database(make_config(url).database)
        self.db.start()
        self.addCleanup(self.db.close)


class BatchedReaderTest(_DatabaseCase):
    def setUp(self) -> None:
        super().setUp()
        self.source = _Source()

    def reader(self, max_batch: int = 256) -> BatchedReader[str, int]:
        return BatchedReader(
            self.db, "test_read", self.source.read, lambda: -1, max_batch=max_batch
        )

    def hold_reads(self) -> threading.Event:
        """Make reads wait until the returned event is set (set at cleanup)."""
        release = threading.Event()
        self.source.hold = release
        self.addCleanup(release.set)
        return release

    async def test_requests_of_one_iteration_share_one_read(self) -> None:
        self.source.values = {"a": 1, "b": 2}
        reader = self.reader()
        got = await defer.gatherResults(
            [reader.get("a"), reader.get("b"), reader.get("a"), reader.get("zz")]
        )
        self.assertEqual(got, [1, 2, 1, -1])
        self.assertEqual(self.source.batches, [["a", "b", "zz"]])
        self.assertEqual((reader.batches, reader.keys_read), (1, 3))

    async def test_callers_during_a_read_share_the_next_one(self) -> None:
        self.source.values = {"a": 1, "b": 2, "c": 3}
        reader = self.reader()
        release = self.hold_reads()
        first = reader.get("a")
        await _until(self.source.started.is_set)
        later = [reader.get("b"), reader.get("c")]
        self.assertEqual(self.source.batches, [["a"]])
        self.source.hold = None
        release.set()
        self.assertEqual(await first, 1)
        self.assertEqual(await defer.gatherResults(later), [2, 3])
        self.assertEqual(self.source.batches, [["a"], ["b", "c"]])

    async def test_a_caller_never_joins_a_read_under_way(self) -> None:
        # A read under way may have read before the caller's write committed;
        # the caller must get a read that started after it asked.
        self.source.values = {"a": 1}
        reader = self.reader()
        release = self.hold_reads()
        old = reader.get("a")
        await _until(self.source.started.is_set)
        self.source.values["a"] = 2  # committed after that read started
        new = reader.get("a")
        self.source.hold = None
        release.set()
        self.assertEqual(await old, 1)
        self.assertEqual(await new, 2)
        self.assertEqual(self.source.batches, [["a"], ["a"]])

    async def test_a_failed_read_fails_its_callers_only(self) -> None:
        self.source.values = {"a": 1, "b": 2}
        reader = self.reader()
        release = self.hold_reads()
        self.source.fail_next = True
        doomed = [reader.get("a"), reader.get("b")]
        await _until(self.source.started.is_set)
        after = reader.get("b")
        self.source.hold = None
        release.set()
        for d in doomed:
            with self.assertRaises(ValueError):
                await d
        self.assertEqual(await after, 2)

    async def test_batches_are_bounded(self) -> None:
        self.source.values = {k: i for i, k in enumerate("abcde")}
        reader = self.reader(max_batch=2)
        got = await defer.gatherResults([reader.get(k) for k in "abcde"])
        self.assertEqual(got, [0, 1, 2, 3, 4])
        self.assertEqual(self.source.batches, [["a", "b"], ["c", "d"], ["e"]])

    async def test_unshared_reads_each_on_its_own(self) -> None:
        self.source.values = {"a": 1, "b": 2}
        reader: BatchedReader[str, int] = BatchedReader(
            self.db, "test_read", self.source.read, lambda: -1, shared=False
        )
        got = await defer.gatherResults(
            [reader.get("a"), reader.get("b"), reader.get("a"), reader.get("zz")]
        )
        self.assertEqual(got, [1, 2, 1, -1])
        # Each its own read, run side by side in the pool (in any order).
        self.assertEqual(sorted(self.source.batches), [["a"], ["a"], ["b"], ["zz"]])

    async def test_a_read_that_cannot_start_fails_its_callers_only(self) -> None:
        self.source.values = {"a": 1}
        reader = self.reader()
        real = self.db.run_read

        def broken(*args: Any) -> Any:
            self.db.run_read = real  # type: ignore[method-assign]
            raise RuntimeError("no pool")

        self.db.run_read = broken  # type: ignore[method-assign]
        with self.assertRaises(RuntimeError):
            await reader.get("a")
        self.assertEqual(await reader.get("a"), 1)


class CrossSigningStateTest(_DatabaseCase):
    """``CrossSigningStore.get_state`` reads what the one-user read reads, and
    concurrent uploads share one transaction."""

    def setUp(self) -> None:
        super().setUp()
        self.store = CrossSigningStore(self.db)

    async def store_master(self, user_id: str) -> None:
        key = new_signing_key()
        body = cross_signing_key(user_id, "master", key)
        await self.store.replace_keys(
            user_id,
            {"master": None, "self_signing": None, "user_signing": None},
            {"master": NewKey(public_key(key), canonical_json(body))},
            1000,
        )

    async def test_concurrent_reads_are_one_transaction(self) -> None:
        await self.store_master("@a:test.local")
        await self.store_master("@b:test.local")
        granted = await self.store.set_grant(
            "@b:test.local", 6000, "@admin:test.local", 1000
        )
        self.assertTrue(granted)
        users = ["@a:test.local", "@b:test.local", "@nobody:test.local"]
        before = self.db.transactions
        got = await defer.gatherResults([self.store.get_state(u) for u in users])
        self.assertEqual(self.db.transactions - before, 1)

        def one_by_one(conn: Connection) -> list[Any]:
            states = [get_state_txn(conn, u) for u in users]
            return [(s.keys, s.grant_expiry) for s in states]

        expected = await self.db.run_read("expected", one_by_one)
        self.assertEqual(got, expected)
        self.assertEqual(sorted(got[0][0]), ["master"])
        self.assertEqual(got[1][1], 6000)
        self.assertEqual(got[2], ({}, None))
        # A read of one user alone (a batch of one) reads the same.
        for user, state in zip(users, expected, strict=True):
            self.assertEqual(await self.store.get_state(user), state)


class DeviceIdsTest(_DatabaseCase):
    """The embedded host's device ids, read for every cross-signing upload:
    concurrent callers share one transaction."""

    def setUp(self) -> None:
        super().setUp()
        self.accounts = AccountStore(self.db)

    async def test_concurrent_reads_are_one_transaction(self) -> None:
        for user, devices in (("@a:test.local", "AB"), ("@b:test.local", "C")):
            await self.accounts.upsert_user(user, 1000)
            for device in devices:
                await self.accounts.login(user, device, None, 1000)
        users = ["@a:test.local", "@b:test.local", "@nobody:test.local"]
        before = self.db.transactions
        got = await defer.gatherResults([self.accounts.device_ids(u) for u in users])
        self.assertEqual(self.db.transactions - before, 1)
        self.assertEqual(got, [{"A", "B"}, {"C"}, set()])
        # One user alone (a batch of one) reads the same.
        self.assertEqual(await self.accounts.device_ids("@a:test.local"), {"A", "B"})
