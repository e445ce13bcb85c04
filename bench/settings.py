"""Sizes and timings of a run (full, or ``--quick`` for a CI smoke run)."""

from __future__ import annotations

import attr

ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7")


@attr.s(auto_attribs=True)
class Settings:
    """What to run.

    Attributes:
        workloads: which of W1..W7.
        concurrency: requests in flight per cell.
        duration: seconds of sending per cell.
        requests: exact requests per cell instead of a duration.
        otks: one-time keys per W1 upload.
        k_sizes: W4, devices signed per request.
        m_sizes: W5, master keys signed per request.
        q_sizes: W6, users per query.
        claim_devices: W7, devices per claim.
        w4_users: W4, users per worker. Each user has one new self-signing
            key at a time, so a timed segment sends one request per user:
            with one user per worker, fewer and fewer requests are in
            flight as a segment's last ones finish, after every round of
            ``concurrency`` requests; with more, that happens once per
            this many rounds. With 4 at c=8, the 16,000 devices signed in
            turn (K=500) are more than a server remembers parsed (the
            module: 8,192), so each request's devices are read and parsed
            as for a first signature, not served from memory.
        setup_concurrency: requests in flight while preparing.
        crypto_signatures: signatures per process for the ed25519 rate.
        repeat: times each cell is measured, one after the other; the table
            shows the run with the median requests per second, and the range.
        interleave: every target's server started at once, and each cell
            (each of its repeats too) run on one target after the other,
            rather than every cell of one target before the next target.
    """

    workloads: tuple[str, ...] = ALL_WORKLOADS
    concurrency: tuple[int, ...] = (1, 8)
    duration: float = 10.0
    requests: int | None = None
    otks: int = 50
    k_sizes: tuple[int, ...] = (1, 50, 500)
    m_sizes: tuple[int, ...] = (1, 50)
    q_sizes: tuple[int, ...] = (1, 50, 500)
    claim_devices: int = 50
    w4_users: int = 4
    setup_concurrency: int = 16
    crypto_signatures: int = 10000
    repeat: int = 1
    interleave: bool = False


FULL = Settings()
#: ``--quick``: every workload, small sizes, 1 s cells.
QUICK = Settings(
    duration=1.0,
    k_sizes=(1, 20),
    m_sizes=(1, 10),
    q_sizes=(1, 20),
    claim_devices=10,
    w4_users=1,
    crypto_signatures=2000,
)
