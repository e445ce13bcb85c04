"""``POST /_matrix/client/{r0,v3,unstable}/keys/claim`` through the HTTP layer."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from sqlalchemy import Connection, event, select, text

from twisted.internet import defer

from synapse_xsign_module.storage.device_keys import ClaimResult, claim_txn
from synapse_xsign_module.storage.schema import fallback_keys
from tests.utils import SERVER_NAME, HostTestCase, Response, TestUser, signed_key

ALG = "signed_curve25519"


class KeysClaimTest(HostTestCase):
    """``/keys/claim``: order, at-most-once, fallback keys, shape, concurrency."""

    # More database threads than the default, so that claims really overlap.
    config_overrides = {"database": {"threadpool_size": 8}}

    async def upload(self, user: TestUser, body: dict[str, Any]) -> dict[str, int]:
        """Upload keys as ``user``; returns one_time_key_counts."""
        resp = await self.client.post(
            "/_matrix/client/v3/keys/upload", body, token=user.token
        )
        self.assertEqual(resp.code, 200, resp)
        counts: dict[str, int] = resp.json["one_time_key_counts"]
        return counts

    async def upload_otks(self, user: TestUser, ids: list[str]) -> dict[str, Any]:
        """Upload ``signed_curve25519`` one-time keys; returns ``alg:id`` -> key."""
        keys = {f"{ALG}:{kid}": signed_key(user) for kid in ids}
        await self.upload(user, {"one_time_keys": keys})
        return keys

    async def claim(
        self, claimer: TestUser, body: Any, version: str = "v3"
    ) -> Response:
        """POST ``body`` to ``/keys/claim`` as ``claimer``."""
        return await self.client.post(
            f"/_matrix/client/{version}/keys/claim", body, token=claimer.token
        )

    async def claim_one(self, claimer: TestUser, target: TestUser) -> dict[str, Any]:
        """Claim a ``signed_curve25519`` key of ``target``'s device; ``alg:id`` -> key."""
        resp = await self.claim(
            claimer, {"one_time_keys": {target.user_id: {target.device_id: ALG}}}
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["failures"], {})
        got: dict[str, Any] = (
            resp.json["one_time_keys"].get(target.user_id, {}).get(target.device_id, {})
        )
        if not got:
            self.assertEqual(resp.json["one_time_keys"], {})
        return got

    async def fallback_used(self, user: TestUser) -> dict[str, bool]:
        """Fallback key id -> used flag, for the user's device."""

        def txn(conn: Connection) -> dict[str, bool]:
            c = fallback_keys.c
            rows = conn.execute(
                select(c.key_id, c.used).where(
                    c.user_id == user.user_id, c.device_id == user.device_id
                )
            )
            return {k: bool(u) for k, u in rows}

        result: dict[str, bool] = await self.db.run_read("fallback_used", txn)
        return result

    async def otk_count(self, user: TestUser) -> int:
        """The device's signed_curve25519 count, as an empty upload reports it."""
        return (await self.upload(user, {}))[ALG]

    # --- order and at-most-once ------------------------------------------------

    async def test_oldest_key_is_handed_out_first(self) -> None:
        """Keys come out in upload order, not in key-id order."""
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        uploaded: list[dict[str, Any]] = []
        for kid in ("ZZZZ", "MMMM", "AAAA", "QQQQ"):
            uploaded.append(await self.upload_otks(alice, [kid]))
        for keys in uploaded:
            self.assertEqual(await self.claim_one(bob, alice), keys)
        self.assertEqual(await self.claim_one(bob, alice), {})

    async def test_each_key_is_handed_out_at_most_once(self) -> None:
        """Repeated claims never return a key twice and stop when keys run out."""
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        carol = await self.user_with_device("carol", "CDEV")
        keys = await self.upload_otks(alice, [f"K{i:02d}" for i in range(10)])
        seen: list[str] = []
        for i in range(12):
            got = await self.claim_one(bob if i % 2 else carol, alice)
            self.assertLessEqual(len(got), 1)
            for kid, key in got.items():
                self.assertEqual(key, keys[kid])
                seen.append(kid)
        self.assertEqual(sorted(seen), sorted(keys))
        self.assertEqual(len(seen), len(set(seen)))
        self.assertEqual(await self.otk_count(alice), 0)

    async def test_one_request_claims_for_several_devices(self) -> None:
        """One claim for two devices and a user gives each its own oldest key."""
        alice = await self.user_with_device("alice", "ADEV")
        token, dev = await self.login(alice.user_id, "ADEV2")
        alice2 = TestUser(alice.user_id, dev, token)
        bob = await self.user_with_device("bob", "BDEV")
        a1 = await self.upload_otks(alice, ["A1"])
        await self.upload_otks(alice, ["A0"])
        a2 = await self.upload_otks(alice2, ["B1"])
        b = await self.upload_otks(bob, ["C1"])
        resp = await self.claim(
            bob,
            {
                "one_time_keys": {
                    alice.user_id: {"ADEV": ALG, "ADEV2": ALG},
                    bob.user_id: {"BDEV": ALG},
                }
            },
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(
            resp.json,
            {
                "one_time_keys": {
                    alice.user_id: {"ADEV": a1, "ADEV2": a2},
                    bob.user_id: {"BDEV": b},
                },
                "failures": {},
            },
        )

    # --- fallback keys -------------------------------------------------------------

    async def test_fallback_key_when_no_one_time_key_of_the_algorithm(self) -> None:
        """With no OTK of that algorithm the fallback key is returned and marked used."""
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        otk = signed_key(alice)
        fb = signed_key(alice, fallback=True)
        await self.upload(
            alice,
            {
                "one_time_keys": {f"{ALG}:OTK1": otk, "other_alg:X": "AAAA"},
                "fallback_keys": {f"{ALG}:FB1": fb},
            },
        )
        self.assertEqual(await self.claim_one(bob, alice), {f"{ALG}:OTK1": otk})
        self.assertEqual(await self.fallback_used(alice), {"FB1": False})
        # Only an OTK of another algorithm is left: the fallback key is given.
        self.assertEqual(await self.claim_one(bob, alice), {f"{ALG}:FB1": fb})
        self.assertEqual(await self.fallback_used(alice), {"FB1": True})
        # ... and again: fallback keys are reused until replaced.
        self.assertEqual(await self.claim_one(bob, alice), {f"{ALG}:FB1": fb})
        counts = await self.upload(alice, {})
        self.assertEqual(counts, {ALG: 0, "other_alg": 1})

    # --- response shape --------------------------------------------------------------

    async def test_nothing_to_give_is_absent(self) -> None:
        """Users and devices with no key are left out, with no empty maps."""
        alice = await self.user_with_device("alice", "ADEV")
        token, dev = await self.login(alice.user_id, "EMPTY")
        bob = await self.user_with_device("bob", "BDEV")
        keys = await self.upload_otks(alice, ["K1"])
        await self.upload_otks(bob, ["K1"])
        await self.upload(
            bob, {"fallback_keys": {"other_fb:F": signed_key(bob, fallback=True)}}
        )
        resp = await self.claim(
            bob,
            {
                "one_time_keys": {
                    alice.user_id: {"ADEV": ALG, dev: ALG, "NO_SUCH_DEVICE": ALG},
                    bob.user_id: {"BDEV": "unknown_alg"},
                    f"@ghost:{SERVER_NAME}": {"GDEV": ALG},
                }
            },
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(
            resp.json,
            {"one_time_keys": {alice.user_id: {"ADEV": keys}}, "failures": {}},
        )
        bodies: list[dict[str, Any]] = [
            {"one_time_keys": {}},
            {"one_time_keys": {alice.user_id: {}}},
            {"one_time_keys": {alice.user_id: {"ADEV": ALG}}},  # now used up
        ]
        for body in bodies:
            resp = await self.claim(bob, body)
            self.assertEqual(resp.code, 200, resp)
            self.assertEqual(resp.json, {"one_time_keys": {}, "failures": {}}, body)

    async def test_remote_users_are_reported_under_failures(self) -> None:
        """Remote users get a failures entry per server; local claims still work."""
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        keys = await self.upload_otks(alice, ["K1"])
        resp = await self.claim(
            bob,
            {
                "one_time_keys": {
                    "@remote:other.example": {"RDEV": ALG},
                    "@remote2:other.example": {"RDEV2": ALG},
                    "@x:third.example:8448": {"XDEV": ALG},
                    alice.user_id: {"ADEV": ALG},
                }
            },
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["one_time_keys"], {alice.user_id: {"ADEV": keys}})
        failures = resp.json["failures"]
        self.assertEqual(set(failures), {"other.example", "third.example:8448"})
        for failure in failures.values():
            self.assertIsInstance(failure, dict)

    async def test_malformed_bodies_are_rejected(self) -> None:
        """Malformed claim bodies get 400 M_BAD_JSON and claim nothing."""
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        await self.upload_otks(alice, ["K1"])
        uid = alice.user_id
        bad: list[Any] = [
            {},
            {"timeout": 10000},
            {"one_time_keys": None},
            {"one_time_keys": []},
            {"one_time_keys": "x"},
            {"one_time_keys": {uid: ["ADEV"]}},
            {"one_time_keys": {uid: "ADEV"}},
            {"one_time_keys": {uid: None}},
            {"one_time_keys": {uid: {"ADEV": 1}}},
            {"one_time_keys": {uid: {"ADEV": None}}},
            {"one_time_keys": {uid: {"ADEV": [ALG]}}},
            # A valid entry next to a bad one must not be claimed.
            {"one_time_keys": {uid: {"ADEV": ALG}, "@bob:test.local": {"B": 5}}},
            {"one_time_keys": {uid: {"ADEV": ALG, "OTHER": {}}}},
        ]
        for body in bad:
            resp = await self.claim(bob, body)
            self.assertEqual(resp.code, 400, (body, resp))
            self.assertEqual(resp.json["errcode"], "M_BAD_JSON", (body, resp))
        resp = await self.client.post(
            "/_matrix/client/v3/keys/claim", raw=b"[]", token=bob.token
        )
        self.assertEqual(resp.code, 400, resp)
        self.assertEqual(resp.json["errcode"], "M_BAD_JSON", resp)
        self.assertEqual(await self.otk_count(alice), 1)

    async def test_all_version_prefixes_are_served(self) -> None:
        """r0, v3 and unstable all claim from the same store."""
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        uploaded = [await self.upload_otks(alice, [f"K{i}"]) for i in range(3)]
        for keys, version in zip(uploaded, ("r0", "v3", "unstable"), strict=True):
            resp = await self.claim(
                bob, {"one_time_keys": {alice.user_id: {"ADEV": ALG}}}, version=version
            )
            self.assertEqual(resp.code, 200, (version, resp))
            self.assertEqual(
                resp.json,
                {"one_time_keys": {alice.user_id: {"ADEV": keys}}, "failures": {}},
            )

    # --- concurrency -------------------------------------------------------------------

    async def test_concurrent_claims_over_http(self) -> None:
        """60 simultaneous claims for 40 OTKs: each OTK once, then the fallback key."""
        alice = await self.user_with_device("alice", "ADEV")
        claimers = [await self.user_with_device(f"c{i}", f"CDEV{i}") for i in range(3)]
        keys = await self.upload_otks(alice, [f"K{i:03d}" for i in range(40)])
        fb = signed_key(alice, fallback=True)
        await self.upload(alice, {"fallback_keys": {f"{ALG}:FB": fb}})

        body = {"one_time_keys": {alice.user_id: {"ADEV": ALG}}}
        responses: list[Response] = await defer.gatherResults(
            [defer.ensureDeferred(self.claim(claimers[i % 3], body)) for i in range(60)]
        )
        handed: Counter[str] = Counter()
        for resp in responses:
            self.assertEqual(resp.code, 200, resp)
            self.assertEqual(resp.json["failures"], {})
            got = resp.json["one_time_keys"][alice.user_id]["ADEV"]
            self.assertEqual(len(got), 1, resp)
            ((kid, key),) = got.items()
            self.assertEqual(key, fb if kid == f"{ALG}:FB" else keys[kid])
            handed[kid] += 1
        self.assertEqual(handed.pop(f"{ALG}:FB", 0), 20)
        self.assertEqual(dict(handed), {kid: 1 for kid in keys})
        self.assertEqual(await self.otk_count(alice), 0)
        self.assertEqual(await self.fallback_used(alice), {"FB": True})

    async def test_claim_txn_from_simultaneous_threads(self) -> None:
        """claim_txn in parallel transactions hands out every key exactly once,
        each at the first try."""
        alice = await self.user_with_device("alice", "ADEV")
        n_keys, workers, rounds = 60, 6, 12  # 72 claims for 60 keys
        for start in range(0, n_keys, 20):
            await self.upload_otks(
                alice, [f"K{i:03d}" for i in range(start, start + 20)]
            )
        triple = [(alice.user_id, alice.device_id, ALG)]
        postgres = self.db.engine_name == "postgresql"
        barrier = threading.Barrier(workers)
        results: list[list[ClaimResult]] = [[] for _ in range(workers)]
        errors: list[BaseException] = []
        deletes = 0
        lock = threading.Lock()

        def claim_in_txn(conn: Connection, first: list[bool]) -> ClaimResult:
            def before(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
                nonlocal deletes
                if statement.lstrip().upper().startswith("DELETE"):
                    with lock:
                        deletes += 1
                    if first[0]:
                        # Every worker has picked its oldest key and none has
                        # deleted it yet: all of them now race for the same row.
                        first[0] = False
                        barrier.wait(timeout=30)

            # Pool threads keep their connection: listen for this transaction
            # only.
            event.listen(conn, "before_cursor_execute", before)
            try:
                conn.execute(text("SELECT 1"))  # the transaction is open
                return claim_txn(conn, triple)
            finally:
                event.remove(conn, "before_cursor_execute", before)

        def worker(i: int) -> None:
            try:
                for round_no in range(rounds):
                    # While every worker is sure to find a key (no worker gets
                    # more than one round ahead), meet inside the transactions.
                    # SQLite serializes writers at BEGIN IMMEDIATE, so there the
                    # workers line up before their transactions instead.
                    race = round_no < n_keys // workers - 1
                    if not postgres:
                        barrier.wait(timeout=30)
                    results[i].append(
                        self.db.run_in_thread(
                            "claim", True, claim_in_txn, [race and postgres]
                        )
                    )
            except BaseException as e:
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        self.assertFalse(any(t.is_alive() for t in threads), "workers hung")
        self.assertEqual(errors, [])

        handed: Counter[str] = Counter()
        empty = 0
        for per_worker in results:
            self.assertEqual(len(per_worker), rounds)
            for result in per_worker:
                got = result.get(alice.user_id, {}).get(alice.device_id, {})
                self.assertLessEqual(len(got), 1, result)
                if not got:
                    self.assertEqual(result, {})
                    empty += 1
                handed.update(list(got))
        self.assertEqual(dict(handed), {f"{ALG}:K{i:03d}": 1 for i in range(n_keys)})
        self.assertEqual(empty, workers * rounds - n_keys)
        self.assertEqual(await self.otk_count(alice), 0)
        if postgres:
            # Each claim locked a different key (skipping those the others
            # held) and deleted it at once: nobody lost a race and went round
            # again, however many claims met inside their transactions.
            self.assertEqual(deletes, n_keys)
