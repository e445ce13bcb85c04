"""The bench's accounting of server CPU: the verification processes apart."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.trial import unittest

from bench.report import cpu_split, median_cells, merge, signature_fractions, table
from bench.run import build_parser, settings_from
from bench.runner import (
    CellStats,
    ProcessCpu,
    TreeSnapshot,
    _add_database_cpu,
    _backend_database,
    cpu_between,
    database_snapshot,
    tree_snapshot,
)
from bench.server import local_pg_database
from tests.utils import postgres_url

#: CPU seconds each child burns.
BURN = 0.3

# A plain child (not spawned by multiprocessing) that spawns a grandchild,
# prints the grandchild's pid, burns BURN and waits to be killed.
_PLAIN_CHILD = f"""
import multiprocessing, sys, time
sys.path[:0] = {[os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]!r}
from tests.test_bench_report import burn_then_sleep
if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(
        target=burn_then_sleep, args=({BURN},), daemon=True
    )
    child.start()
    print(child.pid, flush=True)
    burn_then_sleep({BURN})
"""


def burn_then_sleep(seconds: float) -> None:
    """Use ``seconds`` of CPU, then wait to be killed."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    time.sleep(120)


def _exit_when_told(conn: multiprocessing.connection.Connection) -> None:
    """In a spawned process: say so on ``conn``, then exit as soon as anything
    arrives on it."""
    conn.send(b"ready")
    conn.recv()


def _stop(process: multiprocessing.process.BaseProcess) -> None:
    """Kill a child process of a test (if still there) and reap it."""
    process.kill()
    process.join(10)


def _pid_entry(snapshot: TreeSnapshot, pid: int) -> ProcessCpu | None:
    return next((p for (q, _), p in snapshot.items() if q == pid), None)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rpartition(")")[2].split()[0]


class TreeSnapshotTest(unittest.TestCase):
    def setUp(self) -> None:
        if not os.path.exists("/proc/self/stat"):
            raise unittest.SkipTest("needs Linux /proc")

    def test_spawned_processes_are_marked(self) -> None:
        """A process multiprocessing spawned is marked, at any depth (the
        verification processes of a worker of ``run --workers``); a plain
        child is not."""
        spawned = multiprocessing.get_context("spawn").Process(
            target=burn_then_sleep, args=(BURN,), daemon=True
        )
        spawned.start()
        self.addCleanup(_stop, spawned)
        plain = subprocess.Popen(
            [sys.executable, "-c", _PLAIN_CHILD], stdout=subprocess.PIPE
        )
        self.addCleanup(plain.wait, 10)
        self.addCleanup(plain.kill)
        assert plain.stdout is not None
        grandchild = int(plain.stdout.readline())
        self.addCleanup(self._kill, grandchild)

        pids = (spawned.pid, plain.pid, grandchild)
        deadline = time.monotonic() + 30
        while True:
            snapshot = tree_snapshot(os.getpid())
            assert snapshot is not None
            entries = [_pid_entry(snapshot, pid) for pid in pids]
            burnt = all(e is not None and e.cpu >= BURN for e in entries)
            if burnt or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        marks = [e.spawned if e is not None else None for e in entries]
        self.assertEqual(marks, [True, False, True])
        self.assertTrue(burnt, entries)
        root = _pid_entry(snapshot, os.getpid())
        assert root is not None
        self.assertFalse(root.spawned)

    @staticmethod
    def _kill(pid: int) -> None:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass

    def test_an_exited_process_keeps_its_mark(self) -> None:
        """A spawned process that has exited but is not reaped yet has no
        command line: an earlier snapshot's mark is kept."""
        ours, theirs = multiprocessing.Pipe()
        child = multiprocessing.get_context("spawn").Process(
            target=_exit_when_told, args=(theirs,), daemon=True
        )
        child.start()
        self.addCleanup(_stop, child)
        # Once it has said so, it runs its own command line (after
        # start() returns it may not have been executed yet).
        self.assertTrue(ours.poll(30))
        self.assertEqual(ours.recv(), b"ready")
        before = tree_snapshot(os.getpid())
        assert before is not None
        entry = _pid_entry(before, child.pid or 0)
        self.assertTrue(entry is not None and entry.spawned)

        ours.send(b"exit")
        assert child.pid is not None
        deadline = time.monotonic() + 30
        while _state(child.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(_state(child.pid), "Z")

        without = tree_snapshot(os.getpid())
        kept = tree_snapshot(os.getpid(), before)
        assert without is not None and kept is not None
        gone = _pid_entry(without, child.pid)
        self.assertTrue(gone is not None and not gone.spawned)  # no command line
        kept_entry = _pid_entry(kept, child.pid)
        self.assertTrue(kept_entry is not None and kept_entry.spawned)

    def test_no_such_process(self) -> None:
        self.assertIsNone(tree_snapshot(2**22 + 1))  # above Linux's pid_max


class CpuBetweenTest(unittest.TestCase):
    def test_between(self) -> None:
        """What each process added; a new process all it used (a pid reused by
        another process counts as new); a process gone makes it incomplete."""
        before = {
            (1, 10): ProcessCpu(1.0, False),
            (2, 20): ProcessCpu(2.0, True),
            (3, 30): ProcessCpu(5.0, True),
        }
        after = {
            (1, 10): ProcessCpu(1.5, False),
            (2, 20): ProcessCpu(2.75, True),
            (4, 40): ProcessCpu(0.25, True),
            (3, 31): ProcessCpu(0.125, False),
        }
        used = cpu_between(before, after)
        self.assertAlmostEqual(used.total, 0.5 + 0.75 + 0.25 + 0.125)
        self.assertAlmostEqual(used.spawned, 0.75 + 0.25)
        self.assertFalse(used.complete)

    def test_complete(self) -> None:
        before = {(1, 10): ProcessCpu(1.0, False), (2, 20): ProcessCpu(2.0, True)}
        after = {**before, (2, 20): ProcessCpu(3.0, True)}
        used = cpu_between(before, after)
        self.assertEqual((used.total, used.spawned, used.complete), (1.0, 1.0, True))


class DatabaseCpuTest(unittest.TestCase):
    """The CPU of the PostgreSQL backends serving a database on this machine."""

    def test_backend_titles(self) -> None:
        """The database is the second word after the cluster's name; the
        server's own processes serve none."""
        for title, database in [
            (b"postgres: 15/main: alice xsign 127.0.0.1(4100) idle\0\0", b"xsign"),
            (b"postgres: alice xsign [local] idle in transaction", b"xsign"),
            (b"postgres: 15/main: xsign alice 127.0.0.1(4100) SELECT", b"alice"),
            (b"postgres: 15/main: checkpointer ", None),
            (b"postgres: 15/main: autovacuum launcher", None),
            (b"postgres: 15/main: autovacuum worker xsign", None),
            (b"postgres: logical replication launcher", None),
            (b"postgres: 15/main: parallel worker for PID 4100", None),
            (b"postgres: 15/main: walsender xsign xsign 10.0.0.2(4100) idle", None),
            (b"postgres: 15/main: archiver last was 00000001000000000000001", None),
        ]:
            self.assertEqual(_backend_database(title), database, title)

    def test_local_databases(self) -> None:
        """Only a PostgreSQL URL on this machine names a database to watch."""
        pg = "postgresql+psycopg://u:p@{}:5432/xsign"
        self.assertEqual(local_pg_database(pg.format("127.0.0.1")), "xsign")
        self.assertEqual(local_pg_database(pg.format("localhost")), "xsign")
        self.assertEqual(local_pg_database("postgresql:///xsign"), "xsign")
        self.assertEqual(local_pg_database("postgresql://bob@localhost"), "bob")
        for socket in (
            "postgresql://bob@%2Fvar%2Frun%2Fpostgresql/xsign",
            "postgresql:///xsign?host=/var/run/postgresql",
        ):
            self.assertEqual(local_pg_database(socket), "xsign", socket)
        self.assertIsNone(local_pg_database(pg.format("db.example.org")))
        self.assertIsNone(
            local_pg_database("postgresql://bob@localhost/xsign?host=db.example.org")
        )
        self.assertIsNone(local_pg_database("sqlite:////tmp/x.db"))
        self.assertIsNone(local_pg_database("not a url"))

    def test_segments_add_up(self) -> None:
        """Each segment adds what its backends used (a new one from its
        start); a backend gone by the end marks the figure incomplete; with
        no backend seen at all the figure stays unknown."""
        stats = CellStats()
        _add_database_cpu(stats, {}, {})
        _add_database_cpu(stats, {}, None)
        self.assertIsNone(stats.database_cpu_s)
        one, two = (1, 10), (2, 20)
        _add_database_cpu(
            stats,
            {one: ProcessCpu(1.0, False)},
            {one: ProcessCpu(1.5, False), two: ProcessCpu(0.25, False)},
        )
        self.assertEqual(
            (stats.database_cpu_s, stats.database_cpu_complete), (0.75, True)
        )
        _add_database_cpu(
            stats,
            {one: ProcessCpu(1.5, False), two: ProcessCpu(0.25, False)},
            {two: ProcessCpu(0.5, False)},
        )
        self.assertEqual(
            (stats.database_cpu_s, stats.database_cpu_complete), (1.0, False)
        )

    def test_snapshot_finds_a_backend_and_its_cpu(self) -> None:
        """A connection's backend is in its database's snapshot (not in
        another's), and the CPU its queries burn shows between two."""
        url = postgres_url()
        database = local_pg_database(url) if url else None
        if database is None or not os.path.exists("/proc/self/stat"):
            raise unittest.SkipTest("needs PostgreSQL on this machine and /proc")
        import psycopg
        from sqlalchemy.engine import make_url

        dsn = make_url(url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            before = database_snapshot(database)
            assert before is not None
            self.assertIn(row[0], {pid for pid, _ in before})
            self.assertEqual(database_snapshot(database + "_not_there"), {})
            conn.execute("SELECT count(*) FROM generate_series(1, 3000000)")
            after = database_snapshot(database)
            assert after is not None
        self.assertGreater(cpu_between(before, after).total, 0.05)


def _w4_cell(**changes: Any) -> dict[str, Any]:
    cell = {
        "target": "t",
        "workload": "W4",
        "param": 500,
        "concurrency": 8,
        "req_per_s": 50.0,
        "items_per_s": 25000.0,
        "server_cpu_pct": 170.0,
        "verifier_cpu_pct": 113.0,
        "cpu_complete": True,
    }
    cell.update(changes)
    return cell


CRYPTO = {
    "processes": 2,
    "nacl": {"1": 20000.0, "all": 40000.0},
    "signedjson": {"1": 16000.0, "all": 32000.0},
}


class CpuSplitTest(unittest.TestCase):
    def test_split(self) -> None:
        """Per signature: the processes' CPU over the signatures verified;
        per request: the rest of the server's CPU over the requests."""
        split = cpu_split(_w4_cell(), 20000.0)
        assert split is not None
        self.assertAlmostEqual(split["verifier_us_per_signature"], 45.2)
        self.assertAlmostEqual(split["raw_us_per_signature"], 50.0)
        self.assertAlmostEqual(split["rest_ms_per_request"], 11.4)
        self.assertNotIn("database_ms_per_request", split)
        split = cpu_split(_w4_cell(database_cpu_pct=40.0), 20000.0)
        assert split is not None
        self.assertAlmostEqual(split["database_ms_per_request"], 8.0)

    def test_no_split_without_the_processes_time(self) -> None:
        """Checked in threads (0%), a server the bench did not start, a server
        process that ended during the cell, or a result file from before the
        split was measured: no split."""
        self.assertIsNone(cpu_split(_w4_cell(verifier_cpu_pct=0.0), 20000.0))
        self.assertIsNone(cpu_split(_w4_cell(verifier_cpu_pct=None), 20000.0))
        self.assertIsNone(cpu_split(_w4_cell(server_cpu_pct=None), 20000.0))
        self.assertIsNone(cpu_split(_w4_cell(cpu_complete=False), 20000.0))
        old = _w4_cell()
        del old["verifier_cpu_pct"], old["cpu_complete"]
        self.assertIsNone(cpu_split(old, 20000.0))

    def test_fraction_lines(self) -> None:
        """One line per W4 cell, and the CPU split under it when known."""
        cells = [
            _w4_cell(database_cpu_pct=40.0),
            _w4_cell(target="old", verifier_cpu_pct=None),
        ]
        lines = signature_fractions(cells, CRYPTO)
        self.assertEqual(len(lines), 3)
        self.assertIn("PostgreSQL's backends 8.0 ms per request", lines[1])
        self.assertIn("62.5% of the raw ed25519 rate on 2 cores", lines[0])
        self.assertIn("45.2 us per signature", lines[1])
        self.assertIn("raw, one core: 50.0 us", lines[1])
        self.assertIn("11.4 ms per request", lines[1])
        self.assertTrue(lines[2].startswith("old W4"))
        self.assertIn("cpu_split", cells[0]["signature_fraction"])
        self.assertNotIn("cpu_split", cells[1]["signature_fraction"])

    def test_compared_files_keep_their_own_raw_rate(self) -> None:
        """``--compare a.json b.json``: each file's cells are measured against
        the raw rate of their own run, not the first file's."""
        out = tempfile.mkdtemp(prefix="xsign-bench-report-")
        self.addCleanup(shutil.rmtree, out, True)
        slower = {**CRYPTO, "nacl": {"1": 10000.0, "all": 20000.0}}
        paths = []
        for name, crypto in (("a", CRYPTO), ("b", slower)):
            path = os.path.join(out, f"{name}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"crypto": crypto, "cells": [_w4_cell(target=name)]}, f)
            paths.append(path)
        lines = signature_fractions(merge(paths)["cells"], None)
        self.assertIn("62.5% of the raw ed25519 rate", lines[0])
        self.assertIn("raw, one core: 50.0 us", lines[1])
        self.assertIn("125.0% of the raw ed25519 rate", lines[2])
        self.assertIn("raw, one core: 100.0 us", lines[3])


def _run(rate: float, **changes: Any) -> dict[str, Any]:
    """One run of a W3 cell, as the bench records it."""
    cell = {
        "target": "t",
        "workload": "W3",
        "endpoint": "keys/device_signing/upload",
        "param_name": None,
        "param": None,
        "concurrency": 8,
        "item": "keys",
        "req_per_s": rate,
        "items_per_s": 3 * rate,
        "p50_ms": 1000 / rate if rate else 0.0,
        "p99_ms": 3000 / rate if rate else 0.0,
        "errors": 0,
        "verified": True,
    }
    cell.update(changes)
    return cell


class MedianCellsTest(unittest.TestCase):
    """``--repeat``: one row per cell, from the run with the median rate."""

    def test_median_run_with_range_and_totals(self) -> None:
        runs = [_run(100.0), _run(300.0, errors=2), _run(200.0, errors=1)]
        (row,) = median_cells(runs)
        self.assertEqual(row["req_per_s"], 200.0)
        self.assertEqual(row["p99_ms"], 15.0)  # the median run's own p99
        self.assertEqual(row["runs"], 3)
        self.assertEqual(row["req_per_s_range"], [100.0, 300.0])
        self.assertEqual(row["errors"], 3)
        self.assertTrue(row["verified"])
        self.assertNotIn("runs", runs[2])  # the recorded runs stay as they were

    def test_even_count_takes_the_lower_middle(self) -> None:
        runs = [_run(r) for r in (40.0, 10.0, 30.0, 20.0)]
        self.assertEqual(median_cells(runs)[0]["req_per_s"], 20.0)

    def test_one_failed_run_fails_the_cell(self) -> None:
        runs = [_run(100.0), _run(0.0, verified=False), _run(90.0)]
        (row,) = median_cells(runs)
        self.assertFalse(row["verified"])
        self.assertEqual(row["req_per_s"], 90.0)

    def test_cells_apart_stay_apart_in_order(self) -> None:
        once = _run(50.0, target="u")
        cells = [
            _run(10.0, concurrency=1),
            once,
            _run(20.0),
            _run(30.0, concurrency=1),
            _run(40.0),
        ]
        rows = median_cells(cells)
        self.assertEqual(
            [(r["target"], r["concurrency"], r.get("runs")) for r in rows],
            [("t", 1, 2), ("u", 8, None), ("t", 8, 2)],
        )
        self.assertIs(rows[1], once)

    def test_table_shows_runs_and_range_only_when_repeated(self) -> None:
        self.assertNotIn("runs", table([_run(100.0)]))
        text = table(median_cells([_run(100.0), _run(250.0), _run(180.0)]))
        header, _, row = text.splitlines()
        self.assertIn("| runs | req/s range |", header)
        self.assertIn("|    3 |     100-250 |", row)
        self.assertIn(" 180 ", row)

    def test_repeat_option(self) -> None:
        parser = build_parser()
        self.assertEqual(settings_from(parser.parse_args([])).repeat, 1)
        self.assertEqual(settings_from(parser.parse_args(["--repeat", "3"])).repeat, 3)
        for bad in ("0", "-1", "x"):
            with self.assertRaises(SystemExit):
                parser.parse_args(["--repeat", bad])
