"""Tests of access-token authentication on the embedded host."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import select

from synapse_xsign_module.storage.schema import (
    host_access_tokens,
    host_users,
    metadata,
)
from tests.utils import PASSWORD, HostTestCase

WHOAMI = "/_matrix/client/v3/account/whoami"
UPLOAD = "/_matrix/client/v3/keys/upload"


class AccessTokenTest(HostTestCase):
    """Reading and checking access tokens."""

    async def test_bearer_header(self) -> None:
        """A token in ``Authorization: Bearer`` authenticates its user and device."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.client.get(WHOAMI, token=alice.token)
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(
            resp.json,
            {"user_id": alice.user_id, "device_id": "ADEV", "is_guest": False},
        )

    async def test_query_parameter(self) -> None:
        """A token in ``?access_token=`` authenticates, on host and key endpoints."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.client.get(WHOAMI, token=alice.token, query_token=True)
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["user_id"], alice.user_id)
        resp = await self.client.post(
            UPLOAD,
            {"device_keys": alice.device_keys()},
            token=alice.token,
            query_token=True,
        )
        self.assertEqual(resp.code, 200, resp)

    async def test_each_token_is_its_own_user(self) -> None:
        """Two users' tokens identify each user, not the other."""
        alice = await self.user_with_device("alice", "ADEV")
        bob = await self.user_with_device("bob", "BDEV")
        for user in (alice, bob):
            resp = await self.client.get(WHOAMI, token=user.token)
            self.assertEqual(
                (resp.json["user_id"], resp.json["device_id"]),
                (user.user_id, user.device_id),
            )

    async def test_missing_token(self) -> None:
        """No token at all is 401 M_MISSING_TOKEN."""
        for method, path in (("GET", WHOAMI), ("POST", UPLOAD)):
            resp = await self.client.request(method, path, body={})
            self.assertEqual(resp.code, 401, resp)
            self.assertEqual(resp.json["errcode"], "M_MISSING_TOKEN")

    async def test_malformed_authorization_header(self) -> None:
        """An Authorization header that is not ``Bearer <token>`` is 401 M_MISSING_TOKEN."""
        alice = await self.user_with_device("alice")
        for value in (f"Basic {alice.token}", "Bearer ", "Bearer", alice.token):
            resp = await self.client.get(WHOAMI, headers={"Authorization": value})
            self.assertEqual(resp.code, 401, (value, resp))
            self.assertEqual(resp.json["errcode"], "M_MISSING_TOKEN")

    async def test_bearer_scheme_is_case_insensitive(self) -> None:
        """``bearer`` in lower case is accepted."""
        alice = await self.user_with_device("alice")
        resp = await self.client.get(
            WHOAMI, headers={"Authorization": f"bearer {alice.token}"}
        )
        self.assertEqual(resp.code, 200, resp)

    async def test_unknown_token(self) -> None:
        """A token that was never issued is 401 M_UNKNOWN_TOKEN, by header or query."""
        await self.user_with_device("alice")
        for query in (False, True):
            resp = await self.client.get(WHOAMI, token="xst_nope", query_token=query)
            self.assertEqual(resp.code, 401, resp)
            self.assertEqual(resp.json["errcode"], "M_UNKNOWN_TOKEN")
        resp = await self.client.post(UPLOAD, {}, token="xst_nope")
        self.assertEqual((resp.code, resp.json["errcode"]), (401, "M_UNKNOWN_TOKEN"))

    async def test_token_revoked_by_logout(self) -> None:
        """After logout the token is 401 M_UNKNOWN_TOKEN; other tokens still work."""
        alice = await self.user_with_device("alice", "ADEV")
        token2, _ = await self.login(alice.user_id, "ADEV2")
        resp = await self.client.post(
            "/_matrix/client/v3/logout", {}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        resp = await self.client.get(WHOAMI, token=alice.token)
        self.assertEqual((resp.code, resp.json["errcode"]), (401, "M_UNKNOWN_TOKEN"))
        resp = await self.client.post(UPLOAD, {}, token=alice.token)
        self.assertEqual((resp.code, resp.json["errcode"]), (401, "M_UNKNOWN_TOKEN"))
        resp = await self.client.get(WHOAMI, token=token2)
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["device_id"], "ADEV2")


class StoredSecretsTest(HostTestCase):
    """Tokens and passwords never reach the database in the clear."""

    def dump_database(self) -> list[tuple[str, Any]]:
        """Every value of every row of every table of the module."""
        values: list[tuple[str, Any]] = []
        with self.db.engine.connect() as conn:
            for table in metadata.sorted_tables:
                for row in conn.execute(select(table)):
                    values.extend((table.name, v) for v in row)
        return values

    async def test_token_stored_hashed(self) -> None:
        """Only the SHA-256 of an access token is stored."""
        alice = await self.user_with_device("alice", "ADEV")
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(host_access_tokens)).all()
        self.assertEqual(len(rows), 1)
        row = rows[0]
        self.assertEqual(
            row.token_hash, hashlib.sha256(alice.token.encode()).hexdigest()
        )
        self.assertEqual((row.user_id, row.device_id), (alice.user_id, "ADEV"))
        for table, value in self.dump_database():
            self.assertNotIn(alice.token, str(value), table)
            # Not even the random part without its prefix.
            self.assertNotIn(alice.token[4:], str(value), table)

    async def test_password_stored_hashed(self) -> None:
        """A password is stored only as a salted scrypt hash."""
        await self.make_user("alice")
        await self.make_user("bob")
        with self.db.engine.connect() as conn:
            hashes = dict(
                conn.execute(
                    select(host_users.c.user_id, host_users.c.password_hash)
                ).all()
            )
        self.assertEqual(len(hashes), 2)
        for stored in hashes.values():
            self.assertTrue(stored.startswith("scrypt$"), stored)
            self.assertNotIn(PASSWORD, stored)
        # Same password, different salts: different hashes.
        self.assertNotEqual(hashes["@alice:test.local"], hashes["@bob:test.local"])
        for table, value in self.dump_database():
            self.assertNotIn(PASSWORD, str(value), table)

    async def test_logins_leave_no_clear_secret(self) -> None:
        """After two logins neither the password nor any token is stored in the clear."""
        alice = await self.user_with_device("alice", "ADEV")
        token2, _ = await self.login(alice.user_id, "OTHER", password=PASSWORD)
        for table, value in self.dump_database():
            for secret in (PASSWORD, alice.token, token2):
                self.assertNotIn(secret, str(value), table)
