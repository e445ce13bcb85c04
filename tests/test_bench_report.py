"""The bench's accounting of server CPU: the verification processes apart."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from typing import Any

from twisted.trial import unittest

from bench.report import cpu_split, signature_fractions
from bench.runner import TreeCpu, process_tree_cpu

#: CPU seconds the spawned child burns before it sleeps; the plain child
#: burns three times as much, more than the spawned one with its start-up.
BURN = 0.5
PLAIN_BURN = 3 * BURN

_PLAIN_CHILD = (
    "import time\n"
    f"end = time.process_time() + {PLAIN_BURN}\n"
    "while time.process_time() < end:\n"
    "    pass\n"
    "time.sleep(120)\n"
)


def _burn_then_sleep(seconds: float) -> None:
    """In a spawned process: use ``seconds`` of CPU, then wait to be killed."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    time.sleep(120)


def _children_cpu(tree: TreeCpu) -> float:
    with open(f"/proc/{os.getpid()}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return tree.total - own


class ProcessTreeCpuTest(unittest.TestCase):
    def setUp(self) -> None:
        if not os.path.exists("/proc/self/stat"):
            raise unittest.SkipTest("needs Linux /proc")

    def test_spawned_processes_are_counted_apart(self) -> None:
        """A process started by multiprocessing's spawn counts as a
        verification process; another child counts in the total only."""
        spawned = multiprocessing.get_context("spawn").Process(
            target=_burn_then_sleep, args=(BURN,), daemon=True
        )
        spawned.start()
        self.addCleanup(spawned.join, 10)
        self.addCleanup(spawned.kill)
        plain = subprocess.Popen([sys.executable, "-c", _PLAIN_CHILD])
        self.addCleanup(plain.wait, 10)
        self.addCleanup(plain.kill)

        deadline = time.monotonic() + 30
        tree = process_tree_cpu(os.getpid())
        while tree is not None and time.monotonic() < deadline:
            if (
                tree.spawned >= BURN
                and _children_cpu(tree) - tree.spawned >= PLAIN_BURN
            ):
                break
            time.sleep(0.1)
            tree = process_tree_cpu(os.getpid())
        assert tree is not None
        self.assertGreaterEqual(tree.spawned, BURN)
        # The plain child's time is in the total, not in the spawned part.
        self.assertLess(tree.spawned, PLAIN_BURN)
        self.assertGreaterEqual(_children_cpu(tree) - tree.spawned, PLAIN_BURN)

    def test_no_such_process(self) -> None:
        self.assertIsNone(process_tree_cpu(2**22 + 1))  # above Linux's pid_max


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

    def test_no_split_without_the_processes_time(self) -> None:
        """Checked in threads (0%), or a server the bench did not start, or a
        result file from before the split was measured: no split."""
        self.assertIsNone(cpu_split(_w4_cell(verifier_cpu_pct=0.0), 20000.0))
        self.assertIsNone(cpu_split(_w4_cell(verifier_cpu_pct=None), 20000.0))
        old = _w4_cell()
        del old["verifier_cpu_pct"]
        self.assertIsNone(cpu_split(old, 20000.0))
        self.assertIsNone(
            cpu_split(_w4_cell(server_cpu_pct=None, verifier_cpu_pct=None), 1.0)
        )

    def test_fraction_lines(self) -> None:
        cells = [_w4_cell(), _w4_cell(target="old", verifier_cpu_pct=None)]
        lines = signature_fractions(cells, CRYPTO)
        self.assertEqual(len(lines), 3)
        self.assertIn("62.5% of the raw ed25519 rate on 2 cores", lines[0])
        self.assertIn("45.2 us per signature", lines[1])
        self.assertIn("raw, one core: 50.0 us", lines[1])
        self.assertIn("11.4 ms per request", lines[1])
        self.assertTrue(lines[2].startswith("old W4"))
        self.assertIn("cpu_split", cells[0]["signature_fraction"])
        self.assertNotIn("cpu_split", cells[1]["signature_fraction"])
