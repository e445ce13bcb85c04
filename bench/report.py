"""The results: one record per cell, the table on stdout, the JSON file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from bench.runner import CellStats, percentile

JsonDict = dict[str, Any]

DEFAULT_JSON = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results", "latest.json"
)
COLUMNS = (
    "workload",
    "param",
    "concurrency",
    "req/s",
    "items/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "verified",
)
#: Added for cells measured more than once (see :func:`median_cells`).
REPEAT_COLUMNS = ("runs", "req/s range")
#: Numbers, right-aligned: from concurrency to errors, and the repeat columns.
RIGHT_ALIGNED = frozenset(COLUMNS[2:8] + REPEAT_COLUMNS)


def cell_record(
    target: str,
    workload: Any,
    concurrency: int,
    stats: CellStats,
    setup_s: float,
) -> JsonDict:
    """The JSON record of one cell (verification fields are added later)."""
    elapsed = stats.elapsed
    req_s = stats.ok / elapsed if elapsed > 0 else 0.0
    lat = stats.latencies
    return {
        "target": target,
        "workload": workload.key,
        "endpoint": workload.endpoint,
        "param_name": workload.param_name or None,
        "param": workload.param,
        "concurrency": concurrency,
        "item": workload.item,
        "items_per_request": workload.items_per_request,
        "requests_ok": stats.ok,
        "requests_sent": stats.sent,
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "duration_s": round(elapsed, 4),
        "segments": stats.segments,
        "prepare_s": round(stats.prepare_s, 3),
        "setup_s": round(setup_s, 3),
        "req_per_s": req_s,
        "items_per_s": req_s * workload.items_per_request,
        "p50_ms": percentile(lat, 50) * 1000,
        "p90_ms": percentile(lat, 90) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": (lat[-1] * 1000) if lat else 0.0,
        "mean_ms": (sum(lat) / len(lat) * 1000) if lat else 0.0,
        # CPU while sending, in % of one core (the server's only when started
        # by the bench): tells a server-bound cell from a client-bound one.
        "bench_cpu_pct": 100 * stats.client_cpu_s / elapsed if elapsed else 0.0,
        "server_cpu_pct": (
            100 * stats.server_cpu_s / elapsed
            if elapsed and stats.server_cpu_s is not None
            else None
        ),
        # The part of server_cpu_pct spent in signature verification processes.
        "verifier_cpu_pct": (
            100 * stats.verifier_cpu_s / elapsed
            if elapsed and stats.verifier_cpu_s is not None
            else None
        ),
        # False: a server process ended while the cell was timed, and both
        # figures miss what it used then.
        "cpu_complete": stats.cpu_complete,
        # The server's PostgreSQL backends, when the database is on this
        # machine (not part of server_cpu_pct); False: a backend ended while
        # the cell was timed, and the figure misses what it used then.
        "database_cpu_pct": (
            100 * stats.database_cpu_s / elapsed
            if elapsed and stats.database_cpu_s is not None
            else None
        ),
        "database_cpu_complete": stats.database_cpu_complete,
        "verified": False,
        "signatures_verified": 0,
        "verify_s": 0.0,
        "verify_problem_count": 0,
        "verify_problems": [],
    }


def failed_record(target: str, workload: Any, concurrency: int, why: str) -> JsonDict:
    """A cell that could not run (its setup failed)."""
    record = cell_record(target, workload, concurrency, CellStats(), 0.0)
    record["verify_problem_count"] = 1
    record["verify_problems"] = [why]
    return record


def median_cells(cells: Sequence[JsonDict]) -> list[JsonDict]:
    """One record per cell measured several times (``--repeat``): the run
    with the median requests per second (the lower of the middle two for an
    even count), so that its latencies and CPU figures all belong to one run.

    It gets ``runs`` (how many), ``req_per_s_range`` ([lowest, highest]),
    ``errors`` summed over the runs and ``verified`` only if every run was.
    A cell measured once is returned as it is. Cells keep their first order.

    Args:
        cells: cell records; those of one target, workload, size and
            concurrency are runs of one cell.
    """
    groups: dict[tuple[Any, ...], list[JsonDict]] = {}
    for c in cells:
        key = (c["target"], c["workload"], c["param"], c["concurrency"])
        groups.setdefault(key, []).append(c)
    out = []
    for runs in groups.values():
        if len(runs) == 1:
            out.append(runs[0])
            continue
        by_rate = sorted(runs, key=lambda c: c["req_per_s"])
        median = dict(by_rate[(len(by_rate) - 1) // 2])
        median["runs"] = len(runs)
        median["req_per_s_range"] = [by_rate[0]["req_per_s"], by_rate[-1]["req_per_s"]]
        median["errors"] = sum(c["errors"] for c in runs)
        median["verified"] = all(c["verified"] for c in runs)
        out.append(median)
    return out


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(cells: Sequence[JsonDict]) -> str:
    """A Markdown table of the cells (with a target column for several, and
    the runs and their range of requests per second for cells measured more
    than once, see :func:`median_cells`)."""
    targets = list(dict.fromkeys(c["target"] for c in cells))
    columns = (("target",) if len(targets) > 1 else ()) + COLUMNS
    repeated = any(c.get("runs", 1) > 1 for c in cells)
    if repeated:
        columns += REPEAT_COLUMNS
    rows = []
    order = {t: i for i, t in enumerate(targets)}
    cells = sorted(
        cells,
        key=lambda c: (
            c["workload"],
            c["param"] or 0,
            c["concurrency"],
            order[c["target"]],
        ),
    )
    for c in cells:
        row = [c["target"]] if len(targets) > 1 else []
        row += [
            f"{c['workload']} {c['endpoint']}",
            f"{c['param_name']}={c['param']}" if c["param_name"] else "-",
            str(c["concurrency"]),
            _num(c["req_per_s"]),
            f"{_num(c['items_per_s'])} {c['item']}",
            _num(c["p50_ms"]),
            _num(c["p99_ms"]),
            str(c["errors"]),
            "yes" if c["verified"] else "FAILED",
        ]
        if repeated:
            low, high = c.get("req_per_s_range") or (c["req_per_s"], c["req_per_s"])
            row += [str(c.get("runs", 1)), f"{_num(low)}-{_num(high)}"]
        rows.append(row)
    widths = [
        max(len(col), *(len(r[i]) for r in rows)) for i, col in enumerate(columns)
    ]

    def line(values: Sequence[str]) -> str:
        cells_out = [
            v.rjust(w) if columns[i] in RIGHT_ALIGNED else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "| " + " | ".join(cells_out) + " |"

    sep = [
        ("-" * (w - 1) + ":") if c in RIGHT_ALIGNED else "-" * w
        for c, w in zip(columns, widths, strict=True)
    ]
    return "\n".join([line(columns), line(sep), *(line(r) for r in rows)])


def cpu_split(cell: JsonDict, raw_one_core: float) -> JsonDict | None:
    """Where a W4 cell's server CPU went: the verification processes' CPU per
    signature (against the raw rate of one core) and the rest of the server's
    per request; and, for a PostgreSQL database on this machine, its
    backends' CPU per request.

    Only for a server the bench started whose verification processes did
    the checking (their CPU was measured apart), with no server process
    ending during the cell. Signatures checked in the server's own threads
    (an upload alone in its process) count as verified but not in the
    processes' time: the figure per signature is then too low, and the rest
    of the server too high.

    Args:
        cell: a cell record (:func:`cell_record`).
        raw_one_core: the raw ed25519 verification rate of one core, per
            second.

    Returns:
        None when the split is not known, else ``{"verifier_us_per_signature",
        "raw_us_per_signature", "rest_ms_per_request"}``, with
        ``"database_ms_per_request"`` when the database's CPU was measured.
    """
    verifier, total = cell.get("verifier_cpu_pct"), cell.get("server_cpu_pct")
    if (
        not verifier
        or total is None
        or not cell.get("cpu_complete", True)
        or not cell["items_per_s"]
        or not raw_one_core
    ):
        return None
    split = {
        "verifier_us_per_signature": verifier / 100 / cell["items_per_s"] * 1e6,
        "raw_us_per_signature": 1e6 / raw_one_core,
        "rest_ms_per_request": (total - verifier) / 100 / cell["req_per_s"] * 1e3,
    }
    database = cell.get("database_cpu_pct")
    if database is not None:
        split["database_ms_per_request"] = database / 100 / cell["req_per_s"] * 1e3
    return split


def signature_fractions(
    cells: Sequence[JsonDict], crypto: JsonDict | None
) -> list[str]:
    """For W4: signatures verified per second against this machine's raw rate,
    and where the server's CPU went (:func:`cpu_split`).

    Args:
        cells: cell records; one that holds a ``crypto`` of its own (cells of
            several result files, see :func:`merge`) is compared with that
            run's raw rate.
        crypto: the raw rate (:func:`bench.crypto_rate.measure`) of the run,
            for the cells without one of their own.

    Returns:
        The lines to print; each W4 cell also gets a ``signature_fraction``.
    """
    out = []
    for c in cells:
        run_crypto = c.get("crypto") or crypto
        if c["workload"] != "W4" or not c["req_per_s"] or not run_crypto:
            continue
        nacl = run_crypto["nacl"]["all"]
        sj = run_crypto["signedjson"]["all"]
        cores = run_crypto["processes"]
        sig_s = c["items_per_s"]
        c["signature_fraction"] = {
            "cores": cores,
            "of_nacl": sig_s / nacl,
            "of_signedjson": sig_s / sj,
        }
        out.append(
            f"{c['target']} W4 K={c['param']} c={c['concurrency']}: "
            f"{sig_s:,.0f} signatures/s verified = {sig_s / nacl:.1%} of the raw "
            f"ed25519 rate on {cores} cores ({nacl:,.0f}/s, nacl), "
            f"{sig_s / sj:.1%} of signedjson's ({sj:,.0f}/s)"
        )
        split = cpu_split(c, run_crypto["nacl"]["1"])
        if split is not None:
            c["signature_fraction"]["cpu_split"] = split
            out.append(
                f"  CPU: the verification processes "
                f"{split['verifier_us_per_signature']:.1f} us per signature "
                f"(raw, one core: {split['raw_us_per_signature']:.1f} us), "
                f"the rest of the server {split['rest_ms_per_request']:.1f} ms "
                "per request"
                + (
                    f", PostgreSQL's backends {split['database_ms_per_request']:.1f}"
                    " ms per request"
                    if "database_ms_per_request" in split
                    else ""
                )
            )
    return out


def machine() -> JsonDict:
    """Where the run happened."""
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "processor": platform.processor() or platform.machine(),
    }


def code_version() -> JsonDict:
    """The checkout measured: commit, and whether the package has local edits."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", root, *args],
                capture_output=True,
                timeout=10,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.decode(errors="replace").strip()

    status = git("status", "--porcelain", "--", "synapse_xsign_module")
    return {
        "commit": git("rev-parse", "HEAD"),
        "package_modified": None if status is None else bool(status),
    }


def write_json(path: str, data: JsonDict) -> None:
    """Write the results (the directory is made if missing)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def merge(paths: Sequence[str]) -> JsonDict:
    """Several runs' JSON as one (targets renamed ``file:target`` on clashes;
    each cell keeps its own run's raw ed25519 rate as ``crypto``)."""
    cells: list[JsonDict] = []
    crypto = None
    seen: set[str] = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        crypto = crypto or data.get("crypto")
        names = {c["target"] for c in data.get("cells", [])}
        rename = {}
        for name in names:
            new = name
            if name in seen:
                new = f"{os.path.splitext(os.path.basename(path))[0]}:{name}"
            rename[name] = new
            seen.add(new)
        for c in data.get("cells", []):
            # Each cell keeps its own run's raw rate (signature_fractions).
            cells.append(
                {**c, "target": rename[c["target"]], "crypto": data.get("crypto")}
            )
    return {"cells": cells, "crypto": crypto}
