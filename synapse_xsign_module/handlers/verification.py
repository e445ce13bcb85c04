"""Checking batches of signatures off the reactor, spread over the cores.

Each signature check is one libsodium call that runs without the GIL, but the
Python around it (decoding the signature, calling into libsodium) needs the
GIL between two checks. In a busy process the reactor thread and the database
threads hold the GIL much of the time, and a verifying thread waits for it
after every signature. Worker processes (``verification_processes``) each
have a GIL of their own: while other requests are in progress, large batches
are cut into slices and checked there, and this process goes on parsing and
storing the other requests. A batch of an upload that is the only request in
progress, a small batch, and every batch when no processes are configured, are
checked by threads of this process: then nothing else wants the GIL, and the
round trip to another process would only add latency.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from twisted.python.threadpool import ThreadPool

from synapse_xsign_module.config import usable_cores
from synapse_xsign_module.handlers.crypto import verify_signature
from synapse_xsign_module.host import Host

logger = logging.getLogger(__name__)

#: A signature to check: the signed bytes, the signature and the public key
#: (both unpadded base64).
Item = tuple[bytes, str, str]

#: Fewest signatures per slice; smaller batches are checked in one thread.
MIN_SLICE = 64

#: Worker pools that may break in a row before the processes are given up.
MAX_POOL_FAILURES = 3

#: Fewest signatures in a batch sent to the worker processes: for fewer, the
#: round trip to another process costs more than the GIL it saves.
MIN_PROCESS_BATCH = 2 * MIN_SLICE

T = TypeVar("T")


def invalid_indexes(items: Sequence[Item]) -> list[int]:
    """Indexes of the items whose signature does not verify.

    Module-level so that worker processes can run it.
    """
    return [i for i, (m, s, k) in enumerate(items) if not verify_signature(m, s, k)]


def _worker_init() -> None:
    """In a worker process: leave Ctrl-C to the server, which stops the
    workers, and exit when the server is gone without having stopped them
    (killed, or crashed), rather than wait for work forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with_parent,
            args=(parent.sentinel,),
            name="xsign-parent-watch",
            daemon=True,
        ).start()


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


def _pid(_: int) -> int:
    """A worker's process id (run once per worker to start them all)."""
    return os.getpid()


def _slices(items: Sequence[T], parts: int) -> list[Sequence[T]]:
    size = -(-len(items) // parts)
    return [items[i : i + size] for i in range(0, len(items), size)]


class SignatureVerifier:
    """Verifies batches of signatures in threads or worker processes.

    Args:
        host: the homeserver host (its thread-pool runner keeps Synapse's log
            contexts right).
        processes: worker processes for batches of at least
            :data:`MIN_PROCESS_BATCH` signatures not checked ``alone``; 0
            checks everything in threads of this process. They are started on
            the first such batch or by :meth:`warm_up`.
        crypto_pool: the thread pool a batch is handed to; one is made (one
            thread per core) if omitted.
        cores: threads to spread one batch over (default: the cores this
            process may run on, as for the default number of processes).
    """

    def __init__(
        self,
        host: Host,
        processes: int = 0,
        crypto_pool: ThreadPool | None = None,
        cores: int | None = None,
    ) -> None:
        self._host = host
        self._cores = cores or usable_cores()
        self._pool = crypto_pool or ThreadPool(
            minthreads=1, maxthreads=self._cores, name="xsign-crypto"
        )
        self._threads = ThreadPoolExecutor(
            max_workers=self._cores, thread_name_prefix="xsign-verify"
        )
        self._processes = processes
        self._process_pool: ProcessPoolExecutor | None = None
        #: Pools that broke since the last batch the processes answered.
        self._failures = 0
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def pool(self) -> ThreadPool:
        """The thread pool batches are handed to (started and stopped by the
        service)."""
        return self._pool

    @property
    def processes(self) -> int:
        """The number of worker processes configured (0: threads only)."""
        return self._processes

    async def invalid(self, items: list[Item], alone: bool = False) -> list[int]:
        """Verify every item off the reactor.

        One thread-pool call (one Deferred, which keeps Synapse's log contexts
        simple), which hands large batches on to the worker processes or to
        one thread per core.

        Args:
            items: the signatures.
            alone: no other request is in progress (the caller's measure of
                whether other work wants the GIL): the batch is checked in
                threads even if it is large.

        Returns:
            The indexes of the items whose signature does not verify, in order.
        """
        if not items:
            return []
        if not self._pool.started:
            self._pool.start()
        return await self._host.run_in_threadpool(
            self._pool, lambda: self._check(items, alone)
        )

    def warm_up(self) -> None:
        """Start the worker processes now rather than on the first large batch
        (which would wait for them to start). Does not wait for them."""
        if self._processes:
            self._pool.callInThread(self._start_processes)

    def stop(self) -> None:
        """Stop the threads and the worker processes."""
        self._stopped = True
        if self._pool.started:
            self._pool.stop()
        self._threads.shutdown(wait=False)
        with self._lock:
            pool, self._process_pool = self._process_pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _check(self, items: list[Item], alone: bool) -> list[int]:
        """In a thread of the pool: verify ``items``, in processes or threads."""
        if self._stopped:  # shutting down: no executors left
            return invalid_indexes(items)
        if self._processes and not alone and len(items) >= MIN_PROCESS_BATCH:
            pool = self._process_executor()
            if pool is not None:
                parts = max(1, min(self._processes, len(items) // MIN_SLICE))
                try:
                    bad = self._map(pool, items, parts)
                except BrokenProcessPool:
                    logger.warning(
                        "A signature verification process died; checking this "
                        "batch in threads (new processes for the next one)"
                    )
                    self._drop_processes(pool)
                else:
                    self._failures = 0
                    return bad
        parts = max(1, min(self._cores, len(items) // MIN_SLICE))
        if parts == 1:
            return invalid_indexes(items)
        return self._map(self._threads, items, parts)

    @staticmethod
    def _map(executor: Executor, items: list[Item], parts: int) -> list[int]:
        slices = _slices(items, parts)
        bad: list[int] = []
        offset = 0
        for part, result in zip(
            slices, executor.map(invalid_indexes, slices), strict=True
        ):
            bad.extend(offset + i for i in result)
            offset += len(part)
        return bad

    def _process_executor(self) -> ProcessPoolExecutor | None:
        with self._lock:
            if self._process_pool is None and not self._stopped:
                self._process_pool = ProcessPoolExecutor(
                    max_workers=self._processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                )
            return self._process_pool

    def _start_processes(self) -> None:
        pool = self._process_executor()
        if pool is None:
            return
        try:
            # One task per process makes the pool start them all; the tasks
            # may be answered by fewer of them, so the pids say little.
            list(pool.map(_pid, range(self._processes)))
        except BrokenProcessPool:
            self._drop_processes(pool)
            logger.warning("Signature verification processes failed to start")
            return
        logger.info("%d signature verification process(es) started", self._processes)

    def _drop_processes(self, pool: ProcessPoolExecutor) -> None:
        """Forget a broken process pool; the next large batch starts another,
        unless :data:`MAX_POOL_FAILURES` broke in a row: then every batch is
        checked in threads from now on."""
        with self._lock:
            if self._process_pool is pool:
                self._process_pool = None
                self._failures += 1
                if self._failures >= MAX_POOL_FAILURES and self._processes:
                    logger.error(
                        "Signature verification processes failed %d times in a "
                        "row; checking signatures in threads from now on",
                        self._failures,
                    )
                    self._processes = 0
        pool.shutdown(wait=False, cancel_futures=True)
