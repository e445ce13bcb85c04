"""The embedded host's cache of verified access tokens."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, delete, update

from twisted.internet import defer
from twisted.internet.task import Clock as FakeReactor
from twisted.trial import unittest

from synapse_xsign_module.clock import Clock
from synapse_xsign_module.hosts.embedded.accounts import TokenInfo, hash_token
from synapse_xsign_module.hosts.embedded.token_cache import TokenCache
from synapse_xsign_module.storage.schema import host_access_tokens, host_users
from tests.utils import HostTestCase

WHOAMI = "/_matrix/client/v3/account/whoami"
ADMIN_USERS = "/_synapse/client/xsign/admin/v1/users/"
INFO = TokenInfo("@a:test", "DEV")


def deactivate_row(engine: Engine, user_id: str) -> None:
    """Deactivate an account behind the host's back (as another process
    would, without clearing this process's cache)."""
    with engine.begin() as conn:
        conn.execute(
            update(host_users)
            .where(host_users.c.user_id == user_id)
            .values(deactivated=True)
        )


class TokenCacheUnitTest(unittest.TestCase):
    """TokenCache on its own, with a clock the test moves."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(1_000_000)
        self.cache: TokenCache[TokenInfo] = TokenCache(Clock(self.reactor), 2000)

    def test_entry_lives_for_the_ttl(self) -> None:
        """An entry is returned until its time is up, then forgotten."""
        self.cache.put("d", INFO, self.cache.generation)
        self.reactor.advance(1.999)
        self.assertEqual(self.cache.get("d"), INFO)
        self.reactor.advance(0.001)
        self.assertIsNone(self.cache.get("d"))
        self.assertEqual(len(self.cache), 0)

    def test_zero_ttl_keeps_nothing(self) -> None:
        """token_cache_ms = 0 turns the cache off."""
        cache: TokenCache[TokenInfo] = TokenCache(Clock(self.reactor), 0)
        cache.put("d", INFO, cache.generation)
        self.assertIsNone(cache.get("d"))

    def test_read_from_before_a_clear_is_not_kept(self) -> None:
        """A read that started before a revocation cannot re-add the token."""
        generation = self.cache.generation
        self.cache.put("d", INFO, generation)
        self.cache.clear()
        self.assertIsNone(self.cache.get("d"))
        self.cache.put("d", INFO, generation)  # the slow read comes back
        self.assertIsNone(self.cache.get("d"))
        self.cache.put("d", INFO, self.cache.generation)
        self.assertEqual(self.cache.get("d"), INFO)

    def test_oldest_entry_makes_way(self) -> None:
        """At most max_entries are kept; the oldest goes first."""
        cache: TokenCache[TokenInfo] = TokenCache(Clock(self.reactor), 2000, 2)
        for digest in ("a", "b", "c"):
            cache.put(digest, INFO, cache.generation)
        self.assertIsNone(cache.get("a"))
        self.assertEqual((cache.get("b"), cache.get("c")), (INFO, INFO))


class _HostWithCache(HostTestCase):
    """An embedded host whose token cache runs on a clock the test moves."""

    def setUp(self) -> None:
        super().setUp()
        self.reactor = FakeReactor()
        self.reactor.advance(1_000_000)
        self.host.accounts.token_cache = TokenCache(Clock(self.reactor), 2000)

    def delete_token_row(self, token: str) -> None:
        """Revoke a token behind this process's back (as another process would)."""
        with self.db.engine.begin() as conn:
            conn.execute(
                delete(host_access_tokens).where(
                    host_access_tokens.c.token_hash == hash_token(token)
                )
            )

    async def whoami(self, token: str) -> int:
        resp = await self.client.get(WHOAMI, token=token)
        code: int = resp.code
        return code


class TokenCacheHostTest(_HostWithCache):
    """The cache inside the embedded host: revocations here act at once."""

    async def test_revoked_elsewhere_works_until_the_entry_expires(self) -> None:
        """Another process's revocation shows here within token_cache_ms."""
        alice = await self.user_with_device("alice", "ADEV")
        self.assertEqual(await self.whoami(alice.token), 200)
        self.delete_token_row(alice.token)
        self.assertEqual(await self.whoami(alice.token), 200)
        self.reactor.advance(2.0)
        self.assertEqual(await self.whoami(alice.token), 401)

    async def test_logout_is_immediate(self) -> None:
        """Logging out clears the cache: the token is refused at once."""
        alice = await self.user_with_device("alice", "ADEV")
        self.assertEqual(await self.whoami(alice.token), 200)
        resp = await self.client.post(
            "/_matrix/client/v3/logout", {}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(await self.whoami(alice.token), 401)

    async def test_login_to_the_same_device_is_immediate(self) -> None:
        """A new login to a device revokes its old token at once."""
        alice = await self.user_with_device("alice", "ADEV")
        self.assertEqual(await self.whoami(alice.token), 200)
        new_token, _ = await self.login(alice.user_id, "ADEV")
        self.assertEqual(await self.whoami(alice.token), 401)
        self.assertEqual(await self.whoami(new_token), 200)

    async def test_deactivation_is_immediate(self) -> None:
        """Deactivating an account through the admin API refuses its tokens at once."""
        admin = await self.user_with_device("admin", "ADM", admin=True)
        bob = await self.user_with_device("bob", "BDEV")
        self.assertEqual(await self.whoami(bob.token), 200)
        resp = await self.client.request(
            "PUT",
            ADMIN_USERS + "%40bob%3Atest.local",
            body={"deactivated": True},
            token=admin.token,
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(await self.whoami(bob.token), 401)


class LoginTokenCacheTest(_HostWithCache):
    """A login puts its new token into the cache, and clears the cache only
    when it revokes tokens."""

    async def test_new_token_needs_no_read(self) -> None:
        """The token a login issues is known without a read (as another
        process's revocation shows: until the entry expires)."""
        user_id = await self.make_user("alice")
        token, _ = await self.login(user_id, "ADEV")
        self.delete_token_row(token)
        self.assertEqual(await self.whoami(token), 200)
        self.reactor.advance(2.0)
        self.assertEqual(await self.whoami(token), 401)

    async def test_login_to_a_new_device_keeps_other_tokens(self) -> None:
        """A login that revokes nothing leaves the other cached tokens."""
        bob = await self.user_with_device("bob", "BDEV")
        self.assertEqual(await self.whoami(bob.token), 200)
        self.delete_token_row(bob.token)  # known only to the cache now
        alice = await self.make_user("alice")
        await self.login(alice, "ADEV")
        self.assertEqual(await self.whoami(bob.token), 200)

    async def test_deactivated_meanwhile_is_not_cached(self) -> None:
        """An account deactivated behind this process's back before the login
        commits: its new token is not remembered, and a read refuses it."""
        user_id = await self.make_user("alice")
        deactivate_row(self.db.engine, user_id)
        token, _ = await self.host.accounts.login(user_id, "ADEV", None, 0)
        self.assertEqual(await self.whoami(token), 401)

    async def test_cleared_during_the_login_is_not_cached(self) -> None:
        """A revocation in this process while the login runs: its token is
        not remembered (its view of the account may predate the revocation)."""
        user_id = await self.make_user("alice")
        accounts = self.host.accounts
        cache = accounts.token_cache
        assert cache is not None
        db = accounts._db
        real_run = db.run

        def run_then_clear(*args: Any, **kwargs: Any) -> Any:
            d = real_run(*args, **kwargs)
            cache.clear()  # while the transaction runs
            return d

        db.run = run_then_clear  # type: ignore[method-assign]
        try:
            token, _ = await accounts.login(user_id, "ADEV", None, 0)
        finally:
            db.run = real_run  # type: ignore[method-assign]
        self.delete_token_row(token)
        self.assertEqual(await self.whoami(token), 401)


class TokenCacheOffTest(HostTestCase):
    """embedded.token_cache_ms: 0 reads every token from the database."""

    config_overrides = {"embedded": {"token_cache_ms": 0}}

    async def test_revoked_elsewhere_is_refused_at_once(self) -> None:
        alice = await self.user_with_device("alice", "ADEV")
        self.assertEqual((await self.client.get(WHOAMI, token=alice.token)).code, 200)
        with self.db.engine.begin() as conn:
            conn.execute(delete(host_access_tokens))
        self.assertEqual((await self.client.get(WHOAMI, token=alice.token)).code, 401)


class SharedTokenReadTest(HostTestCase):
    """Tokens that are not in the cache, asked for at the same time, are read
    in one transaction, each caller getting its own token's answer."""

    config_overrides = {"embedded": {"token_cache_ms": 0}}

    async def test_concurrent_reads_share_one_transaction(self) -> None:
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        carol = await self.user_with_device("carol", "CDEV")
        deactivate_row(self.db.engine, carol.user_id)
        accounts = self.host.accounts
        tokens = [alice.token, bob.token, carol.token, "unknown", alice.token]
        before = self.db.transactions
        results = await defer.gatherResults(
            [defer.ensureDeferred(accounts.get_token(t)) for t in tokens]
        )
        self.assertEqual(
            results,
            [
                TokenInfo(alice.user_id, "ADEV"),
                TokenInfo(bob.user_id, "BDEV"),
                None,  # deactivated
                None,  # never issued
                TokenInfo(alice.user_id, "ADEV"),
            ],
        )
        self.assertEqual(self.db.transactions - before, 1)
