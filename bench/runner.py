"""Running one cell: a workload at one size and one concurrency.

``concurrency`` workers share a source of prepared requests (bodies encoded
before the clock starts) and send them back to back until the cell's time (or
request count) is spent. Workloads that use something up (a fresh device, a
fresh user, one-time keys) are fed in timed segments: the clock stops while
the next batch is prepared, sized from the rate measured so far, and only the
time spent sending counts.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import attr

from twisted.internet import defer

from bench.http import Answer, JsonClient

#: A check of one answer: None when correct, else what is wrong.
Check = Callable[[Answer], "str | None"]

#: Error samples kept per cell.
MAX_ERROR_SAMPLES = 5
#: Upper bound of one prepared batch of a consuming workload.
MAX_BATCH = 20000


@attr.s(auto_attribs=True, slots=True, frozen=True)
class Unit:
    """One prepared request: POST ``raw`` to ``path`` as ``token``."""

    path: str
    token: str
    raw: bytes
    check: Check
    tag: Any = None


class UnitSource:
    """Hands prepared requests to workers."""

    def take(self, worker: int) -> Unit | None:
        """The next request for ``worker``, or None when there is none left."""
        raise NotImplementedError


class QueueSource(UnitSource):
    """Each unit once, to whichever worker asks first (consuming workloads)."""

    def __init__(self, units: list[Unit]) -> None:
        self._units = deque(units)
        self.taken: list[Unit] = []

    def take(self, worker: int) -> Unit | None:
        """Pop the next unit."""
        if not self._units:
            return None
        unit = self._units.popleft()
        self.taken.append(unit)
        return unit


class CycleSource(UnitSource):
    """Worker ``w`` repeats its own list forever (repeatable workloads)."""

    def __init__(self, per_worker: list[list[Unit]]) -> None:
        self._lists = per_worker
        self._next = [0] * len(per_worker)

    def take(self, worker: int) -> Unit | None:
        """The worker's next unit, round and round."""
        units = self._lists[worker % len(self._lists)]
        i = self._next[worker % len(self._lists)]
        self._next[worker % len(self._lists)] = i + 1
        return units[i % len(units)]


@attr.s(auto_attribs=True)
class CellStats:
    """What happened in one cell."""

    ok: int = 0
    errors: int = 0
    sent: int = 0
    elapsed: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    #: The part of ``server_cpu_s`` spent in signature verification processes.
    verifier_cpu_s: float | None = None
    #: False when a server process ended during a timed segment: the CPU
    #: figures then miss what it used in that segment.
    cpu_complete: bool = True
    #: CPU of the PostgreSQL backends serving the server's database, when
    #: that database is on this machine (see :func:`database_snapshot`).
    database_cpu_s: float | None = None
    #: False when a backend of it ended during a timed segment.
    database_cpu_complete: bool = True
    segments: int = 0
    prepare_s: float = 0.0
    latencies: list[float] = attr.Factory(list)
    error_samples: list[str] = attr.Factory(list)

    def error(self, text: str) -> None:
        """Count one wrong answer or failed request."""
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(text)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def _segment(
    client: JsonClient,
    source: UnitSource,
    concurrency: int,
    stats: CellStats,
    deadline: float,
    max_requests: int | None,
) -> float:
    """Send until the deadline, the request budget or the source runs out."""

    async def worker(index: int) -> None:
        while time.perf_counter() < deadline:
            if max_requests is not None and stats.sent >= max_requests:
                return
            unit = source.take(index)
            if unit is None:
                return
            stats.sent += 1
            try:
                answer = await client.request(
                    "POST", unit.path, token=unit.token, raw=unit.raw
                )
            except Exception as e:  # counted as an error
                stats.error(f"{type(e).__name__}: {e}")
                continue
            problem = unit.check(answer)
            if problem is None:
                stats.ok += 1
                stats.latencies.append(answer.latency)
            else:
                stats.error(problem)

    start = time.perf_counter()
    await defer.gatherResults(
        [defer.ensureDeferred(worker(i)) for i in range(concurrency)],
        consumeErrors=True,
    )
    return time.perf_counter() - start


class Feed:
    """What the runner needs from a workload."""

    consumable: bool = False

    async def prepare(self, n: int | None, concurrency: int) -> UnitSource:
        """A source of ``n`` units (consuming), or an endless one (``n`` None)."""
        raise NotImplementedError

    def first_batch(self, concurrency: int) -> int:
        """Units in the first batch of a timed consuming cell."""
        return max(8 * concurrency, 50)


#: In the command line of every process that multiprocessing starts with
#: "spawn": the server's signature verification processes.
SPAWNED_MARK = b"multiprocessing.spawn"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class ProcessCpu:
    """One process of a tree, at one moment.

    Attributes:
        cpu: CPU seconds (user + system) it has used so far.
        spawned: multiprocessing started it with "spawn" (a signature
            verification process of the server).
    """

    cpu: float
    spawned: bool


#: A process tree at one moment: (pid, start time in clock ticks) -> its CPU.
#: The start time tells a process from a later one that reuses its pid.
TreeSnapshot = dict[tuple[int, int], ProcessCpu]


@attr.s(auto_attribs=True, frozen=True, slots=True)
class TreeCpu:
    """CPU seconds a process tree used between two snapshots.

    Attributes:
        total: all of its processes.
        spawned: the part of ``total`` used by spawned processes (the
            server's signature verification processes).
        complete: False when a process of the first snapshot was gone by the
            second: what it used in between is missing from both figures.
    """

    total: float
    spawned: float
    complete: bool


def _stat(pid: int) -> tuple[float, int, int] | None:
    """A process's CPU seconds, parent pid and start time (``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return cpu, int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _is_spawned(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return SPAWNED_MARK in f.read()
    except OSError:
        return False


def tree_snapshot(pid: int, known: TreeSnapshot | None = None) -> TreeSnapshot | None:
    """The CPU time of a process and of each of its live descendants (Linux
    ``/proc``).

    The descendants count: the workers of ``run --workers N``, whose
    supervisor does no work itself, and their signature verification
    processes, which are marked.

    Args:
        pid: the root process (the server the bench started).
        known: an earlier snapshot of the tree. A process already in it keeps
            its mark: one that has exited but is not reaped yet has no command
            line left to read.

    Returns:
        The snapshot, or None when ``/proc`` cannot tell.
    """
    root = _stat(pid)
    if root is None:
        return None
    snapshot: TreeSnapshot = {(pid, root[2]): ProcessCpu(root[0], False)}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return snapshot
    children: dict[int, list[tuple[int, float, int]]] = {}
    for entry in entries:
        if entry.isdigit() and int(entry) != pid:
            other = _stat(int(entry))
            if other is not None:
                children.setdefault(other[1], []).append(
                    (int(entry), other[0], other[2])
                )
    parents = [pid]
    while parents:
        for child, cpu, started in children.get(parents.pop(), []):
            key = (child, started)
            earlier = known.get(key) if known else None
            mark = earlier.spawned if earlier is not None else _is_spawned(child)
            snapshot[key] = ProcessCpu(cpu, mark)
            parents.append(child)
    return snapshot


#: How a PostgreSQL server process's title starts (``update_process_title``).
PG_TITLE = b"postgres: "


def _backend_database(title: bytes) -> bytes | None:
    """The database a client's PostgreSQL backend serves, from its process
    title (``postgres: [cluster: ]user database host(port) activity``, the
    host ``[local]`` for a socket); None for every other process of the
    server (walsender, autovacuum and parallel workers, checkpointer, ...)."""
    words = title[len(PG_TITLE) :].split(b"\0", 1)[0].split()
    if words and words[0].endswith(b":"):  # the cluster's name
        words = words[1:]
    if len(words) < 4 or words[0] == b"walsender":
        return None
    host = words[2]
    if host != b"[local]" and not (host.endswith(b")") and b"(" in host):
        return None
    return words[1]


def database_snapshot(database: str) -> TreeSnapshot | None:
    """The CPU time of each client backend of PostgreSQL on this machine
    connected to ``database`` (Linux ``/proc``; their process titles name
    it). The server's other processes (WAL writer, checkpointer,
    autovacuum) are not counted.

    Args:
        database: the database's name.

    Returns:
        The snapshot (empty when no backend shows it: PostgreSQL is not on
        this machine, or ``update_process_title`` is off), or None when
        ``/proc`` cannot tell.
    """
    wanted = database.encode()
    snapshot: TreeSnapshot = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read()
        except OSError:
            continue
        if not title.startswith(PG_TITLE) or _backend_database(title) != wanted:
            continue
        stat = _stat(int(entry))
        if stat is not None:
            snapshot[(int(entry), stat[2])] = ProcessCpu(stat[0], False)
    return snapshot


def cpu_between(before: TreeSnapshot, after: TreeSnapshot) -> TreeCpu:
    """What a tree used between two snapshots of it.

    A process in both counts what it added; one started in between counts
    all it used. A process gone by the second snapshot takes what it used
    in between with it: the result is then marked incomplete, rather than
    losing its whole lifetime's CPU from the total.
    """
    total = spawned = 0.0
    for key, proc in after.items():
        earlier = before.get(key)
        used = proc.cpu - (earlier.cpu if earlier is not None else 0.0)
        total += used
        if proc.spawned:
            spawned += used
    return TreeCpu(total, spawned, before.keys() <= after.keys())


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """No cyclic garbage collection while a segment is timed.

    The bench holds every key it uploaded (hundreds of thousands of objects by
    W6), and each parsed answer allocates thousands more: the collector then
    walked the whole heap again and again, and the bench, which shares the
    cores with the server, took twice the CPU per answer. Answers are trees,
    freed by reference counting; what cycles there are wait until the end.
    Everything alive is frozen (left out of later collections), not collected
    first: a full collection of that heap before each of W7's many segments
    cost minutes.
    """
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _add_database_cpu(
    stats: CellStats, before: TreeSnapshot, after: TreeSnapshot | None
) -> None:
    """Count what a database's backends used in a segment. A backend that
    came in between counts from its start; one that ended takes what it used
    with it, and marks the figure incomplete. With no backend seen either
    time, the figure stays unknown."""
    if after is None or not (before or after):
        return
    used = cpu_between(before, after)
    stats.database_cpu_s = (stats.database_cpu_s or 0.0) + used.total
    stats.database_cpu_complete = stats.database_cpu_complete and used.complete


async def run_cell(
    client: JsonClient,
    feed: Feed,
    concurrency: int,
    duration: float,
    requests: int | None,
    server_pid: int | None = None,
    database: str | None = None,
) -> CellStats:
    """Run one cell; only the time spent sending is counted.

    Args:
        client: the target's client.
        feed: the workload.
        concurrency: requests in flight.
        duration: seconds of sending (ignored when ``requests`` is set).
        requests: exact number of requests, or None for a timed cell.
        server_pid: the server's process, to account its CPU time.
        database: the name of the server's PostgreSQL database when it is on
            this machine, to account its backends' CPU time.
    """
    stats = CellStats()
    while True:
        started = time.perf_counter()
        if feed.consumable:
            if requests is not None:
                n = requests - stats.sent
            elif stats.segments == 0:
                n = feed.first_batch(concurrency)
            else:
                rate = stats.sent / stats.elapsed if stats.elapsed > 0 else 0.0
                left = duration - stats.elapsed
                n = min(MAX_BATCH, math.ceil(rate * left * 1.2) + 2 * concurrency)
            source = await feed.prepare(n, concurrency)
        else:
            source = await feed.prepare(None, concurrency)
        stats.prepare_s += time.perf_counter() - started
        if requests is not None:
            deadline = math.inf
        else:
            deadline = time.perf_counter() + max(0.0, duration - stats.elapsed)
        with _no_cyclic_gc():
            database_cpu = database_snapshot(database) if database else None
            cpu = time.process_time()
            server_cpu = tree_snapshot(server_pid) if server_pid else None
            stats.elapsed += await _segment(
                client, source, concurrency, stats, deadline, requests
            )
            stats.client_cpu_s += time.process_time() - cpu
        if server_cpu is not None and server_pid:
            after = tree_snapshot(server_pid, server_cpu)
            if after is not None:
                used = cpu_between(server_cpu, after)
                stats.server_cpu_s = (stats.server_cpu_s or 0.0) + used.total
                stats.verifier_cpu_s = (stats.verifier_cpu_s or 0.0) + used.spawned
                stats.cpu_complete = stats.cpu_complete and used.complete
        if database_cpu is not None and database is not None:
            _add_database_cpu(stats, database_cpu, database_snapshot(database))
        stats.segments += 1
        if requests is not None:
            if stats.sent >= requests or not feed.consumable:
                break
        elif stats.elapsed >= duration - 0.02 or not feed.consumable:
            break
    stats.latencies.sort()
    return stats
