"""The ``/keys/query`` cache: every change is served at once, in every process,
and nothing that depends on who asks leaks between requesters."""

from __future__ import annotations

import random
from typing import Any
from urllib.parse import quote

import attr
from signedjson.key import generate_signing_key
from signedjson.sign import sign_json
from sqlalchemy import select

from twisted.internet import reactor
from twisted.trial import unittest

from synapse_xsign_module.handlers.query_cache import UserKeysCache
from synapse_xsign_module.handlers.user_keys import ENTRY_OVERHEAD, UserKeys
from synapse_xsign_module.hosts.embedded.host import EmbeddedHost
from synapse_xsign_module.metrics import QUERY_CACHE_LOOKUPS
from synapse_xsign_module.storage.database import Database
from synapse_xsign_module.storage.schema import key_versions
from tests.test_signatures import SignatureTestBase, sig_of
from tests.utils import (
    Client,
    TestUser,
    make_config,
    public_key,
)

QUERY = "/_matrix/client/v3/keys/query"
KEYS_UPLOAD = "/_matrix/client/v3/keys/upload"
ADMIN = "/_synapse/client/xsign/admin/v1"


def lookups(result: str) -> float:
    """How many users the cache counted as ``result`` so far."""
    value: float = QUERY_CACHE_LOOKUPS.labels(result)._value.get()
    return value


class QueryCacheTestBase(SignatureTestBase):
    """Helpers: query through any client, a second process on the same database."""

    async def ask(
        self, user: TestUser, *targets: str, client: Client | None = None
    ) -> dict[str, Any]:
        """``/keys/query`` for every device of ``targets`` as ``user``."""
        resp = await (client or self.client).post(
            QUERY, {"device_keys": {t: [] for t in targets}}, token=user.token
        )
        self.assertEqual(resp.code, 200, resp)
        body: dict[str, Any] = resp.json
        return body

    def second_process(self, cache_mb: int = 64) -> Client:
        """Another host on the same database, with its own cache (as another
        process would have)."""
        config = make_config(self.db_url, key_query_cache_mb=cache_mb)
        db = Database(config.database, reactor)  # not emptied: shared
        host = EmbeddedHost(config, reactor, db=db)
        host.service.start()
        host.mount()
        self.addCleanup(host.service.stop)
        return Client(host.root)


class ServedFromCacheTest(QueryCacheTestBase):
    """A repeated query is answered from the cache, with the same bytes."""

    async def test_repeat_is_a_hit_with_the_same_answer(self) -> None:
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        await self.sign_device_and_master(alice)
        first = await self.ask(bob, alice.user_id)
        hits = lookups("hit")
        second = await self.ask(bob, alice.user_id)
        self.assertEqual(lookups("hit"), hits + 1)
        self.assertEqual(first, second)
        # Versioned from the first change on.
        with self.db.engine.connect() as conn:
            version = conn.execute(
                select(key_versions.c.version).where(
                    key_versions.c.user_id == alice.user_id
                )
            ).scalar_one()
        self.assertGreaterEqual(version, 3)

    async def test_cache_off_reads_every_time(self) -> None:
        alice = await self.ready_user("alice")
        other = self.second_process(cache_mb=0)
        await self.ask(alice, alice.user_id, client=other)
        hits, misses = lookups("hit"), lookups("miss")
        await self.ask(alice, alice.user_id, client=other)
        self.assertEqual(lookups("hit"), hits)
        self.assertEqual(lookups("miss"), misses + 1)

    async def test_some_devices_of_a_cached_user(self) -> None:
        alice = await self.ready_user("alice")
        second = await self.user_with_device_keys(alice.user_id, "SECOND")
        await self.ask(alice, alice.user_id)  # caches both devices
        hits = lookups("hit")
        resp = await self.client.post(
            QUERY,
            {"device_keys": {alice.user_id: [second.device_id, "NOPE"]}},
            token=alice.token,
        )
        self.assertEqual(lookups("hit"), hits + 1)
        self.assertEqual(list(resp.json["device_keys"][alice.user_id]), ["SECOND"])
        everything = await self.ask(alice, alice.user_id)
        self.assertEqual(
            set(everything["device_keys"][alice.user_id]), {"ALICEDEV", "SECOND"}
        )

    async def user_with_device_keys(self, user_id: str, device_id: str) -> TestUser:
        """Log ``user_id`` in on another device and upload its keys."""
        token, device = await self.login(user_id, device_id)
        user = TestUser(user_id, device, token)
        resp = await self.client.post(
            KEYS_UPLOAD, {"device_keys": user.device_keys()}, token=user.token
        )
        self.assertEqual(resp.code, 200, resp)
        return user


class ChangesServedAtOnceTest(QueryCacheTestBase):
    """Each kind of change is served by the next query of a cached user."""

    async def primed(self) -> tuple[TestUser, TestUser]:
        """Alice with keys, cached by a query from Bob."""
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        await self.ask(bob, alice.user_id)
        hits = lookups("hit")
        await self.ask(bob, alice.user_id)
        self.assertEqual(lookups("hit"), hits + 1)  # Alice is cached
        return alice, bob

    async def test_new_device_keys(self) -> None:
        alice, bob = await self.primed()
        alice.device_key = self.new_device_key(alice)
        resp = await self.client.post(
            KEYS_UPLOAD, {"device_keys": alice.device_keys()}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        got = await self.ask(bob, alice.user_id)
        served = got["device_keys"][alice.user_id][alice.device_id]
        self.assertEqual(
            served["keys"][f"ed25519:{alice.device_id}"], public_key(alice.device_key)
        )

    async def test_self_signing_signature_over_device(self) -> None:
        alice, bob = await self.primed()
        signed = self.ssk_signed_device(alice)
        await self.sign_upload(alice, {alice.user_id: {alice.device_id: signed}})
        got = await self.ask(bob, alice.user_id)
        ssk_id = f"ed25519:{public_key(alice.self_signing)}"
        served = got["device_keys"][alice.user_id][alice.device_id]
        self.assertIsNotNone(sig_of(served, alice.user_id, ssk_id))

    async def test_device_signature_over_master(self) -> None:
        alice, bob = await self.primed()
        master = sign_json(self.master_obj(alice), alice.user_id, alice.device_key)
        await self.sign_upload(
            alice, {alice.user_id: {public_key(alice.master): master}}
        )
        got = await self.ask(bob, alice.user_id)
        served = got["master_keys"][alice.user_id]
        self.assertIsNotNone(
            sig_of(served, alice.user_id, f"ed25519:{alice.device_id}")
        )

    async def test_cross_signing_replacement(self) -> None:
        alice, bob = await self.primed()
        body = alice.make_cross_signing()
        final = await self.replace_with_uia(alice, body)
        self.assertEqual(final.code, 200, final)
        got = await self.ask(bob, alice.user_id)
        self.assertEqual(got["master_keys"][alice.user_id], body["master_key"])
        self.assertEqual(
            got["self_signing_keys"][alice.user_id], body["self_signing_key"]
        )

    async def admin_delete(self, path: str) -> None:
        """DELETE an admin API path as a new admin; asserts 200."""
        admin = await self.user_with_device("admin", admin=True)
        resp = await self.client.request("DELETE", ADMIN + path, token=admin.token)
        self.assertEqual(resp.code, 200, resp)

    async def test_admin_reset(self) -> None:
        alice, bob = await self.primed()
        await self.admin_delete(f"/users/{quote(alice.user_id)}/cross_signing")
        got = await self.ask(bob, alice.user_id)
        self.assertNotIn(alice.user_id, got["master_keys"])
        self.assertNotIn(alice.user_id, got["self_signing_keys"])

    async def test_admin_deletes_device_keys(self) -> None:
        alice, bob = await self.primed()
        await self.admin_delete(
            f"/users/{quote(alice.user_id)}/devices/{alice.device_id}/keys"
        )
        got = await self.ask(bob, alice.user_id)
        self.assertEqual(got["device_keys"][alice.user_id], {})

    async def test_logout(self) -> None:
        alice, bob = await self.primed()
        resp = await self.client.post(
            "/_matrix/client/v3/logout", {}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        got = await self.ask(bob, alice.user_id)
        self.assertEqual(got["device_keys"][alice.user_id], {})

    async def test_change_through_another_process(self) -> None:
        """A process holding Alice's keys serves a change made through another."""
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        other = self.second_process()
        await self.ask(bob, alice.user_id, client=other)
        hits = lookups("hit")
        before = await self.ask(bob, alice.user_id, client=other)
        self.assertEqual(lookups("hit"), hits + 1)
        body = alice.make_cross_signing()
        final = await self.replace_with_uia(alice, body)  # through self.client
        self.assertEqual(final.code, 200, final)
        after = await self.ask(bob, alice.user_id, client=other)
        self.assertNotEqual(before["master_keys"], after["master_keys"])
        self.assertEqual(after["master_keys"][alice.user_id], body["master_key"])

    def new_device_key(self, user: TestUser) -> Any:
        """A new ed25519 key for the user's device."""
        return generate_signing_key(user.device_id)


class RequesterSpecificTest(QueryCacheTestBase):
    """What only some requesters may see never passes through the cache."""

    async def test_user_signing_key_to_owner_only(self) -> None:
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        # Bob's query fills the cache with Alice's keys; Alice's own then hits.
        self.assertNotIn(
            alice.user_id, (await self.ask(bob, alice.user_id))["user_signing_keys"]
        )
        hits = lookups("hit")
        own = await self.ask(alice, alice.user_id)
        self.assertEqual(lookups("hit"), hits + 1)
        self.assertIn(alice.user_id, own["user_signing_keys"])
        again = await self.ask(bob, alice.user_id)
        self.assertNotIn(alice.user_id, again["user_signing_keys"])

    async def test_user_signing_signature_to_signer_only(self) -> None:
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        carol = await self.ready_user("carol")
        await self.ask(bob, alice.user_id)  # cached
        usk_id = await self.usk_sign_master(carol, alice)
        seen = await self.ask(carol, alice.user_id)
        self.assertIsNotNone(
            sig_of(seen["master_keys"][alice.user_id], carol.user_id, usk_id)
        )
        for viewer in (bob, alice, bob):
            got = await self.ask(viewer, alice.user_id)
            self.assertIsNone(
                sig_of(got["master_keys"][alice.user_id], carol.user_id, usk_id)
            )


class RequesterSignaturesOnAMissTest(QueryCacheTestBase):
    """A user-signing signature read together with an entry that is being
    built (a miss) is not stored in that entry."""

    async def test_signer_fills_the_cache(self) -> None:
        alice = await self.ready_user("alice")
        bob = await self.ready_user("bob")
        carol = await self.ready_user("carol")
        usk_id = await self.usk_sign_master(carol, alice)
        misses = lookups("miss")
        seen = await self.ask(carol, alice.user_id)  # builds Alice's entry
        self.assertEqual(lookups("miss"), misses + 1)
        self.assertIsNotNone(
            sig_of(seen["master_keys"][alice.user_id], carol.user_id, usk_id)
        )
        hits = lookups("hit")
        got = await self.ask(bob, alice.user_id)
        self.assertEqual(lookups("hit"), hits + 1)
        self.assertIsNone(
            sig_of(got["master_keys"][alice.user_id], carol.user_id, usk_id)
        )


class SameAsUncachedTest(QueryCacheTestBase):
    """Random changes through two processes: after each one, every user's
    answer from a caching process equals the answer of a process that keeps no
    cache. A change that forgot to raise the key version shows up here."""

    async def test_random_changes(self) -> None:
        rng = random.Random(8)
        users = [await self.ready_user(name) for name in ("ann", "ben", "cat")]
        ids = [u.user_id for u in users]
        cached = self.second_process()
        uncached = self.second_process(cache_mb=0)
        steps = [
            self.step_device_keys,
            self.step_sign_device,
            self.step_sign_master,
            self.step_user_signing,
            self.step_replace,
            self.step_new_device,
        ]
        hits = lookups("hit")
        for _ in range(24):
            for viewer in users:
                await self.ask(viewer, *ids, client=cached)
            step = rng.choice(steps)
            await step(rng, users)
            for viewer in users:
                want = await self.ask(viewer, *ids, client=uncached)
                got = await self.ask(viewer, *ids, client=cached)
                self.assertEqual(got, want, step.__name__)
        # Most users were answered from the cache (3 viewers x 3 users x 2
        # queries per step; a step changes at most 2 users).
        self.assertGreater(lookups("hit") - hits, 24 * 9)

    async def step_device_keys(self, rng: random.Random, users: list[TestUser]) -> None:
        """A user's device uploads new identity keys."""
        user = rng.choice(users)
        user.device_key = generate_signing_key(user.device_id)
        resp = await self.client.post(
            KEYS_UPLOAD, {"device_keys": user.device_keys()}, token=user.token
        )
        self.assertEqual(resp.code, 200, resp)

    async def step_sign_device(self, rng: random.Random, users: list[TestUser]) -> None:
        """A user's self-signing key signs the device."""
        user = rng.choice(users)
        signed = self.ssk_signed_device(user)
        await self.sign_upload(user, {user.user_id: {user.device_id: signed}})

    async def step_sign_master(self, rng: random.Random, users: list[TestUser]) -> None:
        """A user's device signs the master key."""
        user = rng.choice(users)
        master = sign_json(self.master_obj(user), user.user_id, user.device_key)
        await self.sign_upload(user, {user.user_id: {public_key(user.master): master}})

    async def step_user_signing(
        self, rng: random.Random, users: list[TestUser]
    ) -> None:
        """A user signs another user's master key."""
        signer, target = rng.sample(users, 2)
        await self.usk_sign_master(signer, target)

    async def step_replace(self, rng: random.Random, users: list[TestUser]) -> None:
        """A user replaces the cross-signing keys."""
        user = rng.choice(users)
        final = await self.replace_with_uia(user, user.make_cross_signing())
        self.assertEqual(final.code, 200, final)

    async def step_new_device(self, rng: random.Random, users: list[TestUser]) -> None:
        """A user logs in on a new device with keys (and keeps using the old)."""
        user = rng.choice(users)
        token, device = await self.login(user.user_id)
        extra = TestUser(user.user_id, device, token)
        resp = await self.client.post(
            KEYS_UPLOAD, {"device_keys": extra.device_keys()}, token=extra.token
        )
        self.assertEqual(resp.code, 200, resp)


def entry(size: int) -> UserKeys:
    """A cache entry of about ``size`` bytes."""
    return UserKeys(1, {}, None, (), None, None, None, size)


class UserKeysCacheTest(unittest.TestCase):
    """The cache's bound and order."""

    def test_least_recently_used_goes_first(self) -> None:
        cache = UserKeysCache(3000)
        for user in ("a", "b", "c"):
            cache.put(user, entry(1000))
        cache.used(["a"], 0)  # b is now the oldest
        cache.put("d", entry(1000))
        self.assertEqual(set(cache.held(["a", "b", "c", "d"])), {"a", "c", "d"})
        self.assertEqual(cache.size, 3000)

    def test_replacing_an_entry_counts_its_size_once(self) -> None:
        cache = UserKeysCache(5000)
        cache.put("a", entry(1000))
        cache.put("a", entry(2000))
        self.assertEqual(cache.size, 2000)
        self.assertEqual(len(cache), 1)
        cache.discard("a")
        self.assertEqual((cache.size, len(cache)), (0, 0))

    def test_older_version_does_not_replace_a_newer_one(self) -> None:
        cache = UserKeysCache(5000)
        newer = attr.evolve(entry(1000), version=7)
        cache.put("a", newer)
        cache.put("a", attr.evolve(entry(1000), version=6))
        self.assertIs(cache.held(["a"])["a"], newer)

    def test_entry_larger_than_the_bound_is_not_kept(self) -> None:
        cache = UserKeysCache(1500)
        cache.put("a", entry(1000))
        cache.put("a", entry(2000))
        self.assertEqual(cache.held(["a"]), {})
        self.assertEqual(cache.size, 0)

    def test_zero_keeps_nothing(self) -> None:
        cache = UserKeysCache(0)
        cache.put("a", entry(ENTRY_OVERHEAD))
        self.assertEqual(len(cache), 0)
