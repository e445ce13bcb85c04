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

from twisted.trial import unittest

from bench.keys import (
    Identity,
    KeyBook,
    add_signature,
    make_device_keys,
    new_signing_key,
)
from bench.verify import Expect, Verifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = {"W1", "W2", "W3", "W4", "W5", "W6", "W7"}
TIMEOUT = 120


class BenchSmokeTest(unittest.TestCase):
    def test_quick_run(self) -> None:
        """Every workload runs one short cell with no error and verifies."""
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
            + ["--otks", "10", "--duration", "0.3", "--crypto-signatures", "300"]
            + ["--setup-concurrency", "4", "--json", path],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
        log = done.stderr.decode(errors="replace")[-4000:]
        self.assertEqual(done.returncode, 0, log)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        self.assertTrue(data["ok"], log)
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
        self.assertIn("| W7 keys/claim", done.stdout.decode())

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
