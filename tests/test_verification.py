"""Batches of signatures checked in threads and in worker processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from signedjson.sign import sign_json

from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from synapse_xsign_module.handlers.crypto import signed_bytes
from synapse_xsign_module.handlers.verification import (
    MAX_POOL_FAILURES,
    MIN_PROCESS_BATCH,
    Item,
    SignatureVerifier,
    invalid_indexes,
)
from tests.utils import new_signing_key, public_key

T = TypeVar("T")
USER = "@alice:test.local"


class _PoolHost:
    """The one Host method the verifier uses."""

    async def run_in_threadpool(self, pool: ThreadPool, fn: Callable[[], T]) -> T:
        return await deferToThreadPool(reactor, pool, fn)


def make_items(n: int, bad: set[int]) -> list[Item]:
    """``n`` signed device objects; those at ``bad`` carry a wrong signature
    (by another key, over other bytes, or not a signature at all)."""
    key, other = new_signing_key(), new_signing_key()
    items: list[Item] = []
    for i in range(n):
        obj: dict[str, Any] = {"device_id": f"D{i}", "user_id": USER}
        signed = sign_json(obj, USER, key)
        message = signed_bytes(signed)
        sig = signed["signatures"][USER][f"ed25519:{key.version}"]
        if i in bad:
            kind = i % 3
            if kind == 0:
                sig = sign_json(dict(obj), USER, other)["signatures"][USER][
                    f"ed25519:{other.version}"
                ]
            elif kind == 1:
                message = message.replace(b"D", b"E", 1)
            else:
                sig = "not base64!"
        items.append((message, sig, public_key(key)))
    return items


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


class InvalidIndexesTest(unittest.TestCase):
    def test_flags_exactly_the_bad_signatures(self) -> None:
        bad = {0, 4, 5, 9}
        self.assertEqual(invalid_indexes(make_items(10, bad)), sorted(bad))


class VerifierTest(unittest.TestCase):
    """Every path gives the same answer: the indexes of the bad signatures."""

    def make(self, processes: int) -> SignatureVerifier:
        verifier = SignatureVerifier(_PoolHost(), processes)  # type: ignore[arg-type]
        self.addCleanup(verifier.stop)
        return verifier

    def children(self) -> list[Any]:
        return multiprocessing.active_children()

    async def test_threads_only(self) -> None:
        verifier = self.make(0)
        bad = {1, 150, 299}
        self.assertEqual(await verifier.invalid(make_items(300, bad)), sorted(bad))
        self.assertEqual(self.children(), [])

    async def test_large_batch_in_processes(self) -> None:
        verifier = self.make(2)
        bad = {0, 63, 64, 127, 200, 255}
        got = await verifier.invalid(make_items(256, bad))
        self.assertEqual(got, sorted(bad))
        self.assertEqual(len(self.children()), 2)
        verifier.stop()
        self.assertEqual(self.children(), [])

    async def test_batch_alone_stays_in_this_process(self) -> None:
        verifier = self.make(2)
        got = await verifier.invalid(make_items(300, {0, 299}), alone=True)
        self.assertEqual(got, [0, 299])
        self.assertEqual(self.children(), [])

    async def test_small_batch_stays_in_this_process(self) -> None:
        verifier = self.make(2)
        bad = {3}
        got = await verifier.invalid(make_items(MIN_PROCESS_BATCH - 1, bad))
        self.assertEqual(got, [3])
        self.assertEqual(self.children(), [])

    async def test_empty_batch(self) -> None:
        self.assertEqual(await self.make(2).invalid([]), [])

    async def test_dead_process_is_replaced(self) -> None:
        """A worker killed between batches: the next batch is still answered
        right (in threads), and a later one runs in new processes."""
        verifier = self.make(2)
        items = make_items(200, {7, 190})
        self.assertEqual(await verifier.invalid(items), [7, 190])
        first = self.children()
        self.assertEqual(len(first), 2)
        os.kill(first[0].pid, signal.SIGKILL)
        wait_until(lambda: not first[0].is_alive())
        self.assertEqual(await verifier.invalid(items), [7, 190])
        self.assertEqual(await verifier.invalid(items), [7, 190])
        now = {p.pid for p in self.children()}
        self.assertEqual(len(now), 2)
        self.assertFalse(now & {p.pid for p in first})

    async def test_processes_given_up_after_repeated_failures(self) -> None:
        """Pools that break MAX_POOL_FAILURES times in a row (here: their
        workers killed before a batch each time) are given up: every batch is
        then checked in threads; each batch is answered right meanwhile."""
        verifier = self.make(2)
        items = make_items(200, {42})
        for _ in range(MAX_POOL_FAILURES):
            self.assertEqual(verifier.processes, 2)
            verifier._start_processes()
            workers = self.children()
            self.assertEqual(len(workers), 2)
            for p in workers:
                os.kill(p.pid, signal.SIGKILL)
            wait_until(lambda w=workers: not any(p.is_alive() for p in w))
            self.assertEqual(await verifier.invalid(items), [42])  # in threads
        self.assertEqual(verifier.processes, 0)
        self.assertEqual(await verifier.invalid(items), [42])
        self.assertEqual(self.children(), [])

    async def test_a_batch_answered_resets_the_failures(self) -> None:
        verifier = self.make(2)
        items = make_items(200, {42})
        for _ in range(MAX_POOL_FAILURES):
            verifier._start_processes()
            for p in self.children():
                os.kill(p.pid, signal.SIGKILL)
            wait_until(lambda: not self.children())
            self.assertEqual(await verifier.invalid(items), [42])  # in threads
            self.assertEqual(await verifier.invalid(items), [42])  # new workers
        self.assertEqual(verifier.processes, 2)
        self.assertEqual(len(self.children()), 2)

    def test_workers_exit_when_the_server_dies(self) -> None:
        """A server killed without stopping its verifier leaves no process
        behind: the workers watch their parent."""
        script = (
            "import multiprocessing, os, signal\n"
            "from synapse_xsign_module.handlers.verification import "
            "SignatureVerifier\n"
            "if __name__ == '__main__':\n"
            "    v = SignatureVerifier(None, 2)\n"
            "    v._start_processes()\n"
            "    print(' '.join(str(p.pid) for p in "
            "multiprocessing.active_children()), flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
        pids = [int(p) for p in done.stdout.split()]
        self.assertEqual(len(pids), 2, done.stderr)
        wait_until(lambda: not any(_running(p) for p in pids))

    async def test_warm_up_starts_the_processes(self) -> None:
        verifier = self.make(2)
        verifier.pool.start()
        verifier.warm_up()
        wait_until(lambda: len(self.children()) == 2)

    async def test_stopped_verifier_starts_no_processes(self) -> None:
        verifier = self.make(2)
        verifier.stop()
        self.assertEqual(await verifier.invalid(make_items(200, {5})), [5])
        self.assertEqual(self.children(), [])
