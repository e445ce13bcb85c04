"""The benchmark tool (``python -m bench``) in --quick mode, with tiny sizes.

The bench starts its own embedded host (SQLite in a temporary directory) as a
subprocess, so it runs here as a subprocess too; the test reads its JSON.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial import unittest

from bench.keys import (
    Identity,
    KeyBook,
    add_signature,
    make_device_keys,
    new_signing_key,
)
from bench.server import local_pg_database
from bench.verify import Expect, Verifier
from tests.utils import POSTGRES_ENV, postgres_url

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = {"W1", "W2", "W3", "W4", "W5", "W6", "W7"}
TIMEOUT = 120


class BenchSmokeTest(unittest.TestCase):
    def run_bench(self, *args: str) -> tuple[dict[str, Any], str, str]:
        """Run ``python -m bench --quick`` with tiny sizes and ``args``;
        asserts that it succeeded.

        Returns:
            The results JSON, the standard output and the end of the log.
        """
        out = tempfile.mkdtemp(prefix="xsign-bench-test-")
        self.addCleanup(shutil.rmtree, out, True)
        path = os.path.join(out, "results.json")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (ROOT, env.get("PYTHONPATH")) if p
        )
        done = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--concurrency", "1"]
            + ["--k", "5", "--q", "5", "--m", "5", "--claim-devices", "5"]
            + ["--otks", "10", "--duration", "0.3", "--setup-concurrency", "4"]
            + ["--json", path, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
        log = done.stderr.decode(errors="replace")[-4000:]
        self.assertEqual(done.returncode, 0, log)
        with open(path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
        self.assertTrue(data["ok"], log)
        return data, done.stdout.decode(), log

    def test_quick_run(self) -> None:
        """Every workload runs one short cell with no error and verifies."""
        data, stdout, _ = self.run_bench("--crypto-signatures", "300")
        cells = data["cells"]
        self.assertEqual({c["workload"] for c in cells}, WORKLOADS)
        self.assertEqual(len(cells), len(WORKLOADS))
        for cell in cells:
            name = f"{cell['workload']} {cell['param']}"
            self.assertEqual(cell["errors"], 0, (name, cell["error_samples"]))
            self.assertTrue(cell["verified"], (name, cell["verify_problems"]))
            self.assertGreater(cell["requests_ok"], 0, name)
            self.assertGreater(cell["signatures_verified"], 0, name)
        self.assertIn(
            "signature_fraction", next(c for c in cells if c["workload"] == "W4")
        )
        self.assertGreater(data["crypto"]["nacl"]["1"], 0)
        self.assertIn("| W7 keys/claim", stdout)

    def test_interleaved_targets(self) -> None:
        """--interleave starts both servers and runs each cell, and each of
        its repeats, on one target after the other."""
        data, _, log = self.run_bench(
            "--no-crypto",
            "--interleave",
            "--repeat",
            "2",
            "--workloads",
            "W3,W4",
            "--target",
            "one=embedded",
            "--target",
            "two=embedded",
        )
        order = [(c["workload"], c["repeat"], c["target"]) for c in data["cells"]]
        self.assertEqual(
            order,
            [(w, r, t) for w in ("W3", "W4") for r in (1, 2) for t in ("one", "two")],
            log,
        )
        for cell in data["cells"]:
            self.assertTrue(cell["verified"], cell["verify_problems"])
            self.assertEqual(cell["errors"], 0, cell["error_samples"])
        # Each target's setup time goes with its first cell of the workload.
        for cell in data["cells"]:
            if cell["repeat"] == 1:
                self.assertGreater(cell["setup_s"], 0, cell["target"])
            else:
                self.assertEqual(cell["setup_s"], 0, cell["target"])
        self.assertTrue(data["settings"]["interleave"])
        self.assertEqual([t["name"] for t in data["targets"]], ["one", "two"])

    def test_database_cpu_on_local_postgres(self) -> None:
        """On a PostgreSQL database of this machine, each cell also gives its
        backends' CPU, in the JSON and on its progress line."""
        url = postgres_url()
        if url is None or local_pg_database(url) is None:
            raise unittest.SkipTest(f"needs {POSTGRES_ENV} on this machine")
        data, _, log = self.run_bench(
            "--no-crypto", "--workloads", "W4", "--db-url", url
        )
        (cell,) = data["cells"]
        self.assertTrue(cell["verified"], cell["verify_problems"])
        self.assertGreater(cell["database_cpu_pct"], 0, log)
        self.assertRegex(log, r" database \d+% bench")

    def test_w4_segments_hold_a_request_per_user(self) -> None:
        """With --w4-users 3 a W4 segment sends one request for each of the
        worker's 3 users (each with a new key), not one per worker: 7
        requests at c=1 take 3 segments (3, 3, 1), and every one verifies."""
        data, _, log = self.run_bench(
            "--no-crypto",
            "--workloads",
            "W4",
            "--k",
            "3",
            "--w4-users",
            "3",
            "--requests",
            "7",
        )
        (cell,) = data["cells"]
        self.assertEqual(cell["requests_ok"], 7, log)
        self.assertEqual(cell["segments"], 3, log)
        self.assertEqual(cell["errors"], 0, cell["error_samples"])
        self.assertTrue(cell["verified"], cell["verify_problems"])
        self.assertEqual(data["settings"]["w4_users"], 3)

    def test_verifier_rejects_a_forged_signature(self) -> None:
        """A read-back whose SSK signature is corrupt fails verification."""
        book = KeyBook()
        user, other = "@a:bench.test", "@b:bench.test"
        device = make_device_keys(user, "DEV", new_signing_key("DEV"))
        book.add_device(user, "DEV", device)
        identity = Identity(user)
        book.add_identity(identity)
        ssk_id = f"ed25519:{identity.ssk_pub}"
        answer = {
            "device_keys": {
                user: {"DEV": add_signature(device, user, identity.self_signing)}
            },
            "master_keys": {user: identity.objects["master"]},
            "self_signing_keys": {user: identity.objects["self_signing"]},
        }
        expect = Expect(
            devices={user: {"DEV"}},
            cross_signing={user},
            signatures={(user, "DEV", user, ssk_id)},
        )
        verifier = Verifier(book)
        self.assertEqual(verifier.check_query(answer, other, [user], expect).count, 0)
        forged = copy.deepcopy(answer)
        sigs = forged["device_keys"][user]["DEV"]["signatures"][user]
        sigs[ssk_id] = sigs["ed25519:DEV"]
        problems = verifier.check_query(forged, other, [user], expect)
        self.assertGreater(problems.count, 0)
        self.assertIn("bad signature", " ".join(problems.texts))
