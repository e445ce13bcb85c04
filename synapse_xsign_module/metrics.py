"""Prometheus metrics of the module.

They live in prometheus_client's default registry: inside Synapse they appear
on Synapse's own metrics listener; the embedded host serves them on
``embedded.metrics_port`` when that is set.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "xsign_http_requests",
    "HTTP requests answered, by endpoint, method and status code",
    ["endpoint", "method", "code"],
)
HTTP_DURATION = Histogram(
    "xsign_http_request_duration_seconds",
    "Time from dispatch to response, by endpoint",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DB_TRANSACTIONS = Counter(
    "xsign_db_transactions",
    "Database transactions that committed, by description",
    ["desc"],
)
DB_RETRIES = Counter(
    "xsign_db_retries",
    "Database transactions retried after a serialization failure, deadlock, "
    "locked database or dropped connection",
    ["desc"],
)
QUERY_CACHE_LOOKUPS = Counter(
    "xsign_key_query_cache_lookups",
    "Users looked up for /keys/query: 'hit' when served from the cache at "
    "their current key version, 'miss' when read from the database",
    ["result"],
)
QUERY_CACHE_SIZE = Gauge(
    "xsign_key_query_cache_bytes",
    "About how many bytes the /keys/query cache holds",
)
