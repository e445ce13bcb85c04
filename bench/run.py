"""``python -m bench``: the command line and the run itself."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import attr

from twisted.internet import defer
from twisted.python.failure import Failure

from bench import crypto_rate
from bench.fixtures import Target, say
from bench.http import JsonClient
from bench.providers import (
    EmbeddedAdminProvider,
    SynapseSharedSecretProvider,
    UserProvider,
)
from bench.report import (
    DEFAULT_JSON,
    cell_record,
    code_version,
    failed_record,
    machine,
    median_cells,
    merge,
    signature_fractions,
    table,
    write_json,
)
from bench.runner import run_cell
from bench.server import EmbeddedServer, local_pg_database, redact_url
from bench.settings import ALL_WORKLOADS, FULL, QUICK, Settings
from bench.workloads import WORKLOADS, Workload, sizes_of

#: Keep-alive connections each cell's requests rotate over (at least 4 per
#: request in flight).
MIN_CONNECTIONS = 32

EPILOG = """\
targets:
  By default the bench starts the embedded host itself (synapse-xsign run on a
  free loopback port, SQLite in a temporary directory, or --db-url). --base-url
  measures a running server instead; --target NAME=SPEC (repeatable) measures
  several side by side, SPEC being
    embedded[,db_url=URL][,db_threads=N][,workers=N]   (workers: run --workers N)
    URL[,shared_secret=S]            Synapse: shared-secret registration + /login
    URL[,admin_token=T]              embedded host: its admin API
    URL[,admin_user=U,admin_password=P]
  (a URL target without these uses --synapse-shared-secret, else --admin-*).
  For Synapse, set bcrypt_rounds: 4 and generous rc_login limits in
  homeserver.yaml, or the setup crawls (the bench waits out 429s).
  Environment: BENCH_DB_URL, BENCH_SYNAPSE_SHARED_SECRET, BENCH_ADMIN_TOKEN,
  BENCH_ADMIN_PASSWORD stand for the options of the same names.

examples:
  python -m bench                               # full run, SQLite, 10 s cells
  python -m bench --quick                       # CI smoke run
  python -m bench --workloads W4 --k 500 --concurrency 8 --duration 30
  python -m bench --target sqlite=embedded \\
      --target 'pg=embedded,db_url=postgresql+psycopg://u:p@127.0.0.1/xsign'
  python -m bench --interleave --repeat 3 --target synapse=http://127.0.0.1:8008 \\
      --target sqlite=embedded                  # side by side, cell by cell
  python -m bench --compare a.json b.json        # one table from two runs
"""


@attr.s(auto_attribs=True)
class TargetSpec:
    """One server to measure."""

    name: str
    url: str | None = None  # None: start the embedded host
    db_url: str | None = None
    db_threads: int | None = None
    workers: int | None = None
    shared_secret: str | None = None
    admin_token: str | None = None
    admin_user: str | None = None
    admin_password: str | None = None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"need positive integers: {text}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _workload_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip().upper() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in ALL_WORKLOADS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"unknown workloads {unknown}; choose from {','.join(ALL_WORKLOADS)}"
        )
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the cross-signing and device-key endpoints, "
        "verifying every answer and every signature.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 1 s cells (CI)")
    p.add_argument("--workloads", type=_workload_list, help="e.g. W1,W4 (default: all)")
    p.add_argument("--concurrency", type=_int_list, help="requests in flight (1,8)")
    p.add_argument("--duration", type=float, help="seconds per cell (10; quick 1)")
    p.add_argument("--requests", type=int, help="exact requests per cell instead")
    p.add_argument("--otks", type=int, help="one-time keys per W1 upload (50)")
    p.add_argument("--k", type=_int_list, help="W4 devices signed (1,50,500)")
    p.add_argument("--m", type=_int_list, help="W5 masters signed (1,50)")
    p.add_argument("--q", type=_int_list, help="W6 users queried (1,50,500)")
    p.add_argument("--claim-devices", type=int, help="W7 devices per claim (50)")
    p.add_argument(
        "--w4-users",
        type=_positive,
        help="W4 users per worker, each signing once per timed segment (4; quick 1)",
    )
    p.add_argument(
        "--setup-concurrency", type=int, help="requests in flight while preparing (16)"
    )
    p.add_argument(
        "--repeat",
        type=_positive,
        help="measure each cell this many times; the table shows the median (1)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="start every target at once and run each cell on one after the other",
    )
    p.add_argument(
        "--db-url",
        default=env("BENCH_DB_URL"),
        help="database of the started embedded host",
    )
    p.add_argument("--db-threads", type=int, help="its database.threadpool_size")
    p.add_argument("--base-url", help="measure this running server instead")
    p.add_argument(
        "--synapse-shared-secret",
        default=env("BENCH_SYNAPSE_SHARED_SECRET"),
        help="--base-url is Synapse: make users by shared-secret registration",
    )
    p.add_argument(
        "--admin-token",
        default=env("BENCH_ADMIN_TOKEN"),
        help="--base-url is an embedded host: an admin's token",
    )
    p.add_argument("--admin-user", help="... or an admin's user id")
    p.add_argument(
        "--admin-password", default=env("BENCH_ADMIN_PASSWORD"), help="... and password"
    )
    p.add_argument("--name", help="the target's name in the report")
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="a server to measure (repeatable; see below)",
    )
    p.add_argument(
        "--json",
        default=DEFAULT_JSON,
        help="where to write the results (bench/results/latest.json)",
    )
    p.add_argument(
        "--crypto-signatures",
        type=int,
        help="signatures per process for the ed25519 rate (10000; best of 3)",
    )
    p.add_argument("--no-crypto", action="store_true", help="skip the ed25519 rate")
    p.add_argument(
        "--strict", action="store_true", help="exit 1 when any request failed too"
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="JSON",
        help="print one table from earlier runs' JSON and exit",
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's sizes: the defaults (or --quick's) with the options given."""
    base = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    for option, field in (
        ("workloads", "workloads"),
        ("concurrency", "concurrency"),
        ("duration", "duration"),
        ("requests", "requests"),
        ("otks", "otks"),
        ("k", "k_sizes"),
        ("m", "m_sizes"),
        ("q", "q_sizes"),
        ("claim_devices", "claim_devices"),
        ("w4_users", "w4_users"),
        ("setup_concurrency", "setup_concurrency"),
        ("crypto_signatures", "crypto_signatures"),
        ("repeat", "repeat"),
        ("interleave", "interleave"),
    ):
        value = getattr(args, option)
        if value is not None:
            changes[field] = value
    return attr.evolve(base, **changes)


TARGET_OPTIONS = (
    "db_url",
    "db_threads",
    "workers",
    "shared_secret",
    "admin_token",
    "admin_user",
    "admin_password",
)
#: Options are split at ``,key=`` only, so values may hold commas.
_OPTION_SPLIT = re.compile(",(?=(?:" + "|".join(TARGET_OPTIONS) + ")=)")


def parse_target(text: str, args: argparse.Namespace | None = None) -> TargetSpec:
    """``NAME=embedded[,k=v...]`` or ``NAME=URL[,k=v...]``.

    A URL target without provider options takes --synapse-shared-secret or
    --admin-token / --admin-user / --admin-password from ``args``.
    """
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--target wants NAME=SPEC, got {text!r}")
    parts = _OPTION_SPLIT.split(rest)
    spec = TargetSpec(name=name)
    if parts[0] != "embedded":
        if not parts[0].startswith(("http://", "https://")):
            raise argparse.ArgumentTypeError(
                f"--target {name}: 'embedded' or an http(s) URL, got {parts[0]!r}"
            )
        spec.url = parts[0]
    for part in parts[1:]:
        key, _, value = part.partition("=")
        setattr(spec, key, int(value) if key in ("db_threads", "workers") else value)
    if (
        spec.url is not None
        and args is not None
        and not (spec.shared_secret or spec.admin_token or spec.admin_user)
    ):
        spec.shared_secret = args.synapse_shared_secret
        spec.admin_token = args.admin_token
        spec.admin_user = args.admin_user
        spec.admin_password = args.admin_password
    return spec


def targets_from(args: argparse.Namespace) -> list[TargetSpec]:
    """The servers to measure."""
    if args.target:
        specs = [parse_target(t, args) for t in args.target]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError("--target names must differ")
        return specs
    if args.base_url:
        return [
            TargetSpec(
                name=args.name or "target",
                url=args.base_url,
                shared_secret=args.synapse_shared_secret,
                admin_token=args.admin_token,
                admin_user=args.admin_user,
                admin_password=args.admin_password,
            )
        ]
    engine = "postgresql" if (args.db_url or "").startswith("postgresql") else "sqlite"
    return [
        TargetSpec(
            name=args.name or f"embedded-{engine}",
            db_url=args.db_url,
            db_threads=args.db_threads,
        )
    ]


def _provider(
    spec: TargetSpec, client: JsonClient, server: EmbeddedServer | None
) -> UserProvider:
    if server is not None:
        return EmbeddedAdminProvider(
            client, admin_user=server.admin_user, admin_password=server.admin_password
        )
    if spec.shared_secret:
        return SynapseSharedSecretProvider(client, spec.shared_secret)
    return EmbeddedAdminProvider(
        client,
        admin_token=spec.admin_token,
        admin_user=spec.admin_user,
        admin_password=spec.admin_password,
    )


@attr.s(auto_attribs=True)
class _Opened:
    """A target whose server is up and whose bench users exist."""

    spec: TargetSpec
    target: Target
    server: EmbeddedServer | None


@attr.s(auto_attribs=True)
class _Prepared:
    """A workload set up on one target, with its setup time still to record."""

    target: Target
    workload: Workload
    setup_s: float


class Run:
    """One run over every target, collecting cell records."""

    def __init__(self, settings: Settings, specs: list[TargetSpec]) -> None:
        self.settings = settings
        self.specs = specs
        self.cells: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []
        plan = [(w, s) for w in settings.workloads for s in sizes_of(w, settings)]
        self.total = (
            len(plan) * len(settings.concurrency) * len(specs) * settings.repeat
        )
        self.index = 0

    async def run(self) -> None:
        """Every target, one after the other; or, interleaved, every cell on
        each target in turn."""
        if self.settings.interleave:
            await self.run_interleaved()
            return
        for spec in self.specs:
            await self.run_target(spec)

    async def run_target(self, spec: TargetSpec) -> None:
        """Start (or reach) one server and run every cell against it."""
        opened = await self._open(spec)
        try:
            for key, size in self._plan():
                prepared = await self._prepare(opened.target, key, size)
                if prepared is None:
                    continue
                for c, repeat in self._runs():
                    await self._measure(prepared, c, repeat)
        finally:
            await self._close(opened)

    async def run_interleaved(self) -> None:
        """Every server up at once; each workload set up on every target, then
        each of its cells run on one target after the other (and each repeat
        likewise), so that a machine whose speed drifts during the run moves
        every target's cells alike."""
        opened: list[_Opened] = []
        try:
            for spec in self.specs:
                opened.append(await self._open(spec))
            for key, size in self._plan():
                prepared = [
                    p
                    for o in opened
                    if (p := await self._prepare(o.target, key, size)) is not None
                ]
                for c, repeat in self._runs():
                    for p in prepared:
                        await self._measure(p, c, repeat)
        finally:
            for o in reversed(opened):
                await self._close(o)

    def _plan(self) -> list[tuple[str, int | None]]:
        s = self.settings
        return [(key, size) for key in s.workloads for size in sizes_of(key, s)]

    def _runs(self) -> list[tuple[int, int]]:
        s = self.settings
        return [(c, r) for c in s.concurrency for r in range(1, s.repeat + 1)]

    async def _open(self, spec: TargetSpec) -> _Opened:
        """Start (or reach) a target's server and make its bench users."""
        s = self.settings
        server = None
        info: dict[str, Any] = {"name": spec.name}
        self.targets.append(info)
        if spec.url is None:
            server = EmbeddedServer(spec.db_url, spec.db_threads, spec.workers)
            say(f"{spec.name}: starting the {server.describe()}")
            await server.start()
            base_url = server.base_url
            info.update(
                kind="embedded (started by the bench)",
                database=redact_url(server.db_url),
            )
        else:
            base_url = spec.url
            info.update(kind="given URL")
        info["base_url"] = base_url
        client = JsonClient(
            base_url, max_connections=max(*s.concurrency, s.setup_concurrency) + 4
        )
        try:
            provider = _provider(spec, client, server)
            info["provider"] = provider.kind
            target = Target(spec.name, client, provider, s.setup_concurrency)
            if server is not None and server.process is not None:
                target.server_pid = server.process.pid
                target.database = local_pg_database(server.db_url)
            await target.start()
            info["server_name"] = target.watcher().user_id.split(":", 1)[1]
        except BaseException:
            await self._stop(spec.name, client, server)
            raise
        return _Opened(spec, target, server)

    async def _close(self, opened: _Opened) -> None:
        await self._stop(opened.spec.name, opened.target.client, opened.server)

    @staticmethod
    async def _stop(
        name: str, client: JsonClient, server: EmbeddedServer | None
    ) -> None:
        """Close a target's connections and stop a server the bench started."""
        await client.close()
        if server is not None:
            if server.process is not None and server.process.poll() is not None:
                say(
                    f"{name}: the embedded host exited with "
                    f"{server.process.returncode}:\n{server.log_tail()}"
                )
            await server.stop()

    async def _prepare(
        self, target: Target, key: str, size: int | None
    ) -> _Prepared | None:
        """Set a workload up on a target; None (its cells marked failed) when
        the setup fails."""
        s = self.settings
        workload = WORKLOADS[key](target, s, size)
        started = time.monotonic()
        try:
            await workload.setup()
        except Exception as e:  # the cells are marked failed
            traceback.print_exc()
            for c in s.concurrency:
                self.index += s.repeat
                say(
                    f"[{self.index}/{self.total}] {target.name} {workload.label()} c={c}: setup failed: {e}"
                )
                self.cells.append(
                    failed_record(target.name, workload, c, f"setup failed: {e}")
                )
            return None
        return _Prepared(target, workload, time.monotonic() - started)

    async def _measure(self, prepared: _Prepared, c: int, repeat: int) -> None:
        """One cell: measure, record, and read back and verify what it stored."""
        s = self.settings
        target, workload = prepared.target, prepared.workload
        self.index += 1
        budget = f"{s.requests} requests" if s.requests else f"{s.duration:g} s"
        of = f", run {repeat}/{s.repeat}" if s.repeat > 1 else ""
        say(
            f"[{self.index}/{self.total}] {target.name} {workload.label()} c={c} ({budget}{of}) ..."
        )
        workload.begin_cell(c)
        try:
            # The kernel gives each connection to one process of a
            # `--workers` server: over many connections the share evens out.
            await target.client.open_connections(max(MIN_CONNECTIONS, 4 * c))
            stats = await run_cell(
                target.client,
                workload,
                c,
                s.duration,
                s.requests,
                target.server_pid,
                target.database,
            )
        except Exception as e:  # the cell is marked failed
            traceback.print_exc()
            failed = failed_record(target.name, workload, c, f"run failed: {e}")
            failed["repeat"] = repeat
            self.cells.append(failed)
            return
        record = cell_record(target.name, workload, c, stats, prepared.setup_s)
        record["repeat"] = repeat
        prepared.setup_s = 0.0
        v_started = time.monotonic()
        try:
            problems = await workload.verify()
            record["signatures_verified"] = problems.signatures_checked
            record["verify_problem_count"] = problems.count
            record["verify_problems"] = problems.texts
            record["verified"] = problems.count == 0 and stats.ok > 0
            if stats.ok == 0:
                record["verify_problems"].append("no correct answer to verify")
        except Exception as e:  # the cell is marked failed
            traceback.print_exc()
            record["verify_problems"] = [f"verification failed: {e}"]
            record["verify_problem_count"] = 1
        record["verify_s"] = round(time.monotonic() - v_started, 3)
        self.cells.append(record)
        say(
            f"    {record['req_per_s']:,.1f} req/s, {record['items_per_s']:,.0f} "
            f"{workload.item}/s, p50 {record['p50_ms']:.1f} ms, p99 "
            f"{record['p99_ms']:.1f} ms, {stats.errors} errors, CPU "
            + (
                f"server {record['server_cpu_pct']:.0f}% "
                if record["server_cpu_pct"] is not None
                else ""
            )
            + (
                f"(verification processes {record['verifier_cpu_pct']:.0f}%) "
                if record["verifier_cpu_pct"]
                else ""
            )
            + (
                "(a server process ended: incomplete) "
                if not record["cpu_complete"]
                else ""
            )
            + (
                f"database {record['database_cpu_pct']:.0f}% "
                + ("" if record["database_cpu_complete"] else "(incomplete) ")
                if record["database_cpu_pct"] is not None
                else ""
            )
            + f"bench {record['bench_cpu_pct']:.0f}%; "
            + (
                f"verified {record['signatures_verified']:,} signatures in {record['verify_s']:.1f} s"
                if record["verified"]
                else f"VERIFICATION FAILED: {record['verify_problems'][:3]}"
            )
        )
        for sample in stats.error_samples[:2]:
            say(f"    error: {sample}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        merged = merge(args.compare)
        shown = median_cells(merged["cells"])
        print(table(shown))
        for line in signature_fractions(shown, merged["crypto"]):
            print(line)
        return 0
    try:
        settings = settings_from(args)
        specs = targets_from(args)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    started = datetime.datetime.now(datetime.timezone.utc)

    crypto = None
    if not args.no_crypto:
        say(
            f"measuring ed25519 verification ({settings.crypto_signatures:,} signatures per process) ..."
        )
        crypto = crypto_rate.measure(settings.crypto_signatures)
        say(crypto_rate.describe(crypto))

    run = Run(settings, specs)
    outcome: dict[str, Any] = {}

    async def amain(reactor: Any) -> None:
        try:
            await run.run()
        except Exception as e:  # reported; exit status 1
            traceback.print_exc()
            outcome["error"] = f"{type(e).__name__}: {e}"

    _react(amain)

    shown = median_cells(run.cells)
    fractions = signature_fractions(shown, crypto)
    failed = [c for c in run.cells if not c["verified"]]
    errors = sum(c["errors"] for c in run.cells)
    ok = not failed and "error" not in outcome and bool(run.cells)
    data = {
        "version": 1,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "command": [
            "python",
            "-m",
            "bench",
            *redact_argv(argv if argv is not None else sys.argv[1:]),
        ],
        "machine": machine(),
        "code": code_version(),
        "settings": attr.asdict(settings),
        "crypto": crypto,
        "targets": run.targets,
        "cells": run.cells,
        "medians": shown if settings.repeat > 1 else None,
        "ok": ok,
        "error": outcome.get("error"),
    }
    write_json(args.json, data)
    print(table(shown) if shown else "(no cells ran)")
    if crypto:
        print()
        print(crypto_rate.describe(crypto))
    for line in fractions:
        print(line)
    say(f"results written to {args.json}")
    if failed:
        say(
            f"{len(failed)} cell(s) FAILED verification: "
            + ", ".join(
                f"{c['target']} {c['workload']} {c['param_name'] or ''}{'=' + str(c['param']) if c['param_name'] else ''} c={c['concurrency']}"
                for c in failed
            )
        )
    if "error" in outcome:
        say(f"the run stopped: {outcome['error']}")
    if not ok:
        return 1
    if args.strict and errors:
        say(f"{errors} request(s) failed (--strict)")
        return 1
    return 0


SECRET_FLAGS = ("--synapse-shared-secret", "--admin-token", "--admin-password")
_SECRET_OPTION = re.compile(
    "((?:shared_secret|admin_token|admin_password)=).*?(?=,(?:"
    + "|".join(TARGET_OPTIONS)
    + ")=|$)"
)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """The command line without secrets (for the JSON file)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in SECRET_FLAGS:
            if eq:
                out.append(f"{flag}=***")
            else:
                out.append(arg)
                hide_next = True
            continue
        arg = _SECRET_OPTION.sub(r"\1***", arg)
        if "://" in arg:
            arg = ",".join(redact_url(part) for part in arg.split(","))
        out.append(arg)
    return out


def _react(amain: Any) -> None:
    """Run ``amain`` on the reactor until it finishes (without sys.exit)."""
    from twisted.internet import reactor

    r: Any = reactor
    done: list[Any] = []

    def start() -> None:
        d = defer.ensureDeferred(amain(r))
        d.addBoth(done.append)
        d.addBoth(lambda _: r.stop())

    async def stop_servers() -> None:
        # Interrupted (SIGINT/SIGTERM): do not leave a started host behind.
        for server in list(EmbeddedServer.running):
            await server.stop()

    r.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.ensureDeferred(stop_servers())
    )
    r.callWhenRunning(start)
    r.run()
    if done and isinstance(done[0], Failure):
        done[0].raiseException()
