"""Benchmark of the cross-signing and device-key endpoints (``python -m bench``).

It starts the embedded host (or reaches any homeserver), makes users through a
pluggable provider, runs the workloads W1-W7 at several concurrencies, checks
every answer, reads the keys back after each cell and verifies every signature
with signedjson, and reports req/s, items/s and latencies next to this
machine's raw ed25519 verification rate.

Modules: :mod:`bench.run` (command line), :mod:`bench.workloads` (W1-W7),
:mod:`bench.runner` (timed cells), :mod:`bench.fixtures` (users and keys made
before timing), :mod:`bench.providers` (embedded admin API, Synapse
shared-secret registration), :mod:`bench.server` (the started embedded host),
:mod:`bench.verify` (read-back checks), :mod:`bench.keys` (key material),
:mod:`bench.http` (treq client), :mod:`bench.crypto_rate` (ed25519 rate),
:mod:`bench.report` (table and JSON), :mod:`bench.settings` (sizes).
"""
