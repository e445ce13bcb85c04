"""This machine's ed25519 verification rate, measured on the spot.

Two ways of verifying, each in 1 process and in ``os.cpu_count()`` processes
(multiprocessing, started together behind a barrier):

- ``nacl``: PyNaCl ``VerifyKey.verify`` over the signed bytes (the raw rate);
- ``signedjson``: ``verify_signed_json`` over a DeviceKeys object (canonical
  JSON encoding + the same verification: what a Python server pays per
  signature at best).

Run alone: ``python -m bench.crypto_rate [N]``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from typing import Any

from bench.keys import make_device_keys, new_signing_key, verify_key

#: Distinct signed objects cycled through.
SAMPLES = 64
MODES = ("nacl", "signedjson")


def _samples() -> list[tuple[Any, ...]]:
    from canonicaljson import encode_canonical_json
    from unpaddedbase64 import decode_base64

    from bench.keys import strip

    out = []
    for i in range(SAMPLES):
        device_id = f"RATE{i:04d}"
        key = new_signing_key(device_id)
        obj = make_device_keys("@rate:bench.test", device_id, key)
        key_id = f"ed25519:{device_id}"
        sig = decode_base64(obj["signatures"]["@rate:bench.test"][key_id])
        vk = verify_key(key_id, obj["keys"][key_id])
        out.append((obj, vk, encode_canonical_json(strip(obj)), sig))
    return out


def verify_many(n: int, mode: str) -> tuple[int, float]:
    """Verify ``n`` signatures; returns (n, seconds)."""
    from signedjson.sign import verify_signed_json

    samples = _samples()
    start = time.perf_counter()
    if mode == "nacl":
        for i in range(n):
            _, vk, msg, sig = samples[i % SAMPLES]
            vk.verify(msg, sig)
    else:
        for i in range(n):
            obj, vk, _, _ = samples[i % SAMPLES]
            verify_signed_json(obj, "@rate:bench.test", vk)
    return n, time.perf_counter() - start


def _worker(n: int, mode: str, barrier: Any, queue: Any) -> None:
    verify_many(64, mode)  # warm up imports and caches
    barrier.wait()
    queue.put(verify_many(n, mode))


def rate(n: int, processes: int, mode: str) -> float:
    """Signatures verified per second by ``processes`` processes together."""
    if processes == 1:
        verify_many(64, mode)
        count, seconds = verify_many(n, mode)
        return count / seconds
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(n, mode, barrier, queue), daemon=True)
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    return float(sum(count / seconds for count, seconds in results))


def measure(n: int, processes: int | None = None, rounds: int = 3) -> dict[str, Any]:
    """Both modes, in 1 process and in ``processes`` (default: every core).

    Each figure is the best of ``rounds`` runs (other load only slows it down).

    Returns:
        ``{"cpu_count", "processes", "signatures_per_process", "nacl": {"1",
        "all", "per_core"}, "signedjson": {...}}`` in signatures per second.
    """
    cores = os.cpu_count() or 1
    procs = processes or cores
    out: dict[str, Any] = {
        "cpu_count": cores,
        "processes": procs,
        "signatures_per_process": n,
        "rounds": rounds,
    }
    for mode in MODES:
        one = max(rate(n, 1, mode) for _ in range(rounds))
        every = max(rate(n, procs, mode) for _ in range(rounds)) if procs > 1 else one
        out[mode] = {"1": one, "all": every, "per_core": every / procs}
    return out


def describe(result: dict[str, Any]) -> str:
    """One line per mode."""
    lines = []
    for mode in MODES:
        r = result[mode]
        lines.append(
            f"ed25519 verify ({mode}): {r['1']:,.0f}/s on 1 core, "
            f"{r['all']:,.0f}/s on {result['processes']} processes "
            f"({r['per_core']:,.0f}/s per core)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    measured = measure(int(sys.argv[1]) if len(sys.argv) > 1 else 10000)
    print(describe(measured))
    print(json.dumps(measured, indent=2))
