"""``POST /_matrix/client/{r0,v3,unstable}/keys/query`` through the HTTP layer."""

from __future__ import annotations

import threading
from typing import Any

from signedjson.key import generate_signing_key
from sqlalchemy import Connection, event

from synapse_xsign_module.storage.device_keys import upload_txn
from synapse_xsign_module.storage.schema import host_devices, host_users
from tests.utils import (
    SERVER_NAME,
    HostTestCase,
    Response,
    TestUser,
    make_device_keys,
)

TOP_LEVEL = (
    "device_keys",
    "master_keys",
    "self_signing_keys",
    "user_signing_keys",
    "failures",
)


class KeysQueryTest(HostTestCase):
    """``/keys/query``: request validation, response shape and device objects."""

    async def query(
        self, user: TestUser, body: Any, version: str = "v3", path_suffix: str = ""
    ) -> Response:
        """POST ``body`` to ``/keys/query`` as ``user``."""
        return await self.client.post(
            f"/_matrix/client/{version}/keys/query{path_suffix}", body, token=user.token
        )

    async def upload_device_keys(self, user: TestUser) -> dict[str, Any]:
        """Upload the user's signed device keys; returns what was sent."""
        dk = user.device_keys()
        resp = await self.client.post(
            "/_matrix/client/v3/keys/upload", {"device_keys": dk}, token=user.token
        )
        self.assertEqual(resp.code, 200, resp)
        return dk

    async def login_device(
        self, user_id: str, device_id: str, display_name: str | None = None
    ) -> TestUser:
        """Log in over HTTP on a new device, optionally naming it."""
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user_id},
            "password": "correct horse battery staple",
            "device_id": device_id,
        }
        if display_name is not None:
            body["initial_device_display_name"] = display_name
        resp = await self.client.post("/_matrix/client/v3/login", body)
        self.assertEqual(resp.code, 200, resp)
        return TestUser(user_id, resp.json["device_id"], resp.json["access_token"])

    def assert_shape(self, resp: Response) -> None:
        """A 200 whose body has exactly the five top-level objects."""
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(set(resp.json), set(TOP_LEVEL), resp)
        for name in TOP_LEVEL:
            self.assertIsInstance(resp.json[name], dict, name)

    def assert_bad_json(self, resp: Response) -> None:
        """400 ``M_BAD_JSON`` with an error message."""
        self.assertEqual(resp.code, 400, resp)
        self.assertEqual(resp.json["errcode"], "M_BAD_JSON", resp)
        self.assertIsInstance(resp.json["error"], str, resp)

    # --- request validation ----------------------------------------------------

    async def test_missing_device_keys_is_rejected(self) -> None:
        """A body without device_keys gets 400 M_BAD_JSON."""
        alice = await self.user_with_device("alice", "ADEV")
        bodies: list[dict[str, Any]] = [{}, {"timeout": 10000}, {"one_time_keys": {}}]
        for body in bodies:
            self.assert_bad_json(await self.query(alice, body))

    async def test_malformed_device_keys_are_rejected(self) -> None:
        """device_keys or its values of the wrong type get 400 M_BAD_JSON."""
        alice = await self.user_with_device("alice", "ADEV")
        await self.upload_device_keys(alice)
        uid = alice.user_id
        bad: list[Any] = [
            None,
            [uid],
            uid,
            {uid: "ADEV"},
            {uid: {"ADEV": []}},
            {uid: {}},
            {uid: ["ADEV", 7]},
            {uid: [None]},
            {uid: [["ADEV"]]},
            {uid: None},
            {uid: [], "@bob:test.local": "BDEV"},
        ]
        for device_keys in bad:
            resp = await self.query(alice, {"device_keys": device_keys})
            self.assert_bad_json(resp)

    async def test_non_user_ids_are_ignored(self) -> None:
        """Keys that are not user ids are dropped without an error or a failure."""
        alice = await self.user_with_device("alice", "ADEV")
        dk = await self.upload_device_keys(alice)
        body: dict[str, Any] = {
            "device_keys": {
                "not-a-user": [],
                "@nocolon": [],
                "alice": [],
                f"#room:{SERVER_NAME}": [],
                "": [],
                alice.user_id: [],
            }
        }
        resp = await self.query(alice, body)
        self.assert_shape(resp)
        self.assertEqual(
            resp.json["device_keys"],
            {alice.user_id: {alice.device_id: {**dk, "unsigned": {}}}},
        )
        self.assertEqual(resp.json["failures"], {})

    async def test_timeout_is_accepted(self) -> None:
        """timeout in the body (and as a query parameter) is accepted."""
        alice = await self.user_with_device("alice", "ADEV")
        dk = await self.upload_device_keys(alice)
        expected = {alice.user_id: {alice.device_id: {**dk, "unsigned": {}}}}
        for timeout in (0, 10000):
            resp = await self.query(
                alice, {"device_keys": {alice.user_id: []}, "timeout": timeout}
            )
            self.assert_shape(resp)
            self.assertEqual(resp.json["device_keys"], expected)
        resp = await self.query(
            alice, {"device_keys": {alice.user_id: []}}, path_suffix="?timeout=10000"
        )
        self.assert_shape(resp)
        self.assertEqual(resp.json["device_keys"], expected)

    # --- response ----------------------------------------------------------------

    async def test_response_always_has_all_top_level_objects(self) -> None:
        """device_keys, the three cross-signing maps and failures are always there."""
        alice = await self.user_with_device("alice", "ADEV")
        bodies: list[dict[str, Any]] = [
            {"device_keys": {}},
            {"device_keys": {alice.user_id: []}},
            {"device_keys": {"@bob:other.example": []}},
        ]
        for body in bodies:
            for version in ("r0", "v3", "unstable"):
                self.assert_shape(await self.query(alice, body, version=version))

    async def test_every_local_user_is_present(self) -> None:
        """Each queried local user appears in device_keys, as {} when keyless."""
        alice = await self.user_with_device("alice", "ADEV")
        await self.user_with_device("bob", "BDEV")  # a device, but no keys
        dk = await self.upload_device_keys(alice)
        bob_id = f"@bob:{SERVER_NAME}"
        ghost = f"@ghost:{SERVER_NAME}"  # no account at all
        resp = await self.query(
            alice, {"device_keys": {alice.user_id: [], bob_id: [], ghost: ["X"]}}
        )
        self.assert_shape(resp)
        self.assertEqual(
            resp.json["device_keys"],
            {
                alice.user_id: {alice.device_id: {**dk, "unsigned": {}}},
                bob_id: {},
                ghost: {},
            },
        )

    async def test_device_objects_are_as_uploaded_plus_unsigned(self) -> None:
        """A device is returned verbatim plus unsigned, with its login display name."""
        await self.make_user("alice")
        uid = f"@alice:{SERVER_NAME}"
        named = await self.login_device(uid, "NAMED", "Alice's phone")
        plain = await self.login_device(uid, "PLAIN")
        named_dk = named.device_keys()
        named_dk["org.example.extra"] = {"anything": [1, 2, 3]}
        resp = await self.client.post(
            "/_matrix/client/v3/keys/upload",
            {"device_keys": named_dk},
            token=named.token,
        )
        self.assertEqual(resp.code, 200, resp)
        plain_dk = await self.upload_device_keys(plain)

        resp = await self.query(plain, {"device_keys": {uid: []}})
        self.assert_shape(resp)
        self.assertEqual(
            resp.json["device_keys"][uid],
            {
                "NAMED": {
                    **named_dk,
                    "unsigned": {"device_display_name": "Alice's phone"},
                },
                "PLAIN": {**plain_dk, "unsigned": {}},
            },
        )

    async def test_specific_devices_and_unknown_devices(self) -> None:
        """A device list returns only those devices; unknown ids are omitted."""
        await self.make_user("alice")
        uid = f"@alice:{SERVER_NAME}"
        dks: dict[str, dict[str, Any]] = {}
        for device_id in ("D1", "D2", "D3"):
            user = await self.login_device(uid, device_id)
            dks[device_id] = await self.upload_device_keys(user)
        keyless = await self.login_device(uid, "NOKEYS")

        cases: list[tuple[list[str], list[str]]] = [
            (["D1", "D3"], ["D1", "D3"]),
            (["D2"], ["D2"]),
            (["D1", "NOPE", "D1"], ["D1"]),
            (["NOPE"], []),
            (["NOKEYS"], []),
            ([], ["D1", "D2", "D3"]),
        ]
        for asked, expected in cases:
            resp = await self.query(keyless, {"device_keys": {uid: asked}})
            self.assert_shape(resp)
            self.assertEqual(
                resp.json["device_keys"],
                {uid: {d: {**dks[d], "unsigned": {}} for d in expected}},
                asked,
            )

    async def test_remote_users_are_reported_under_failures(self) -> None:
        """Remote users give a failures entry per server, never a drop or a 500."""
        alice = await self.user_with_device("alice", "ADEV")
        dk = await self.upload_device_keys(alice)
        resp = await self.query(
            alice,
            {
                "device_keys": {
                    "@bob:other.example": [],
                    "@carol:other.example": ["CDEV"],
                    "@dave:third.example:8448": ["DDEV"],
                    alice.user_id: [],
                }
            },
        )
        self.assert_shape(resp)
        self.assertEqual(
            set(resp.json["failures"]), {"other.example", "third.example:8448"}
        )
        for failure in resp.json["failures"].values():
            self.assertIsInstance(failure, dict)
        self.assertEqual(
            resp.json["device_keys"],
            {alice.user_id: {alice.device_id: {**dk, "unsigned": {}}}},
        )

        resp = await self.query(alice, {"device_keys": {"@bob:other.example": []}})
        self.assert_shape(resp)
        self.assertEqual(list(resp.json["failures"]), ["other.example"])
        self.assertEqual(resp.json["device_keys"], {})

    # --- many users --------------------------------------------------------------

    async def _make_users_with_keys(self, count: int) -> dict[str, dict[str, Any]]:
        """``count`` users, one device each with real signed keys; every third named.

        Returns:
            user id -> the device object ``/keys/query`` must return.
        """
        now = self.service.clock.time_msec()
        expected: dict[str, dict[str, Any]] = {}
        device_rows = []
        uploads = []
        for i in range(count):
            user_id = f"@user{i:04d}:{SERVER_NAME}"
            device_id = f"DEV{i:04d}"
            dk = make_device_keys(user_id, device_id, generate_signing_key(device_id))
            name = f"Device {i}" if i % 3 == 0 else None
            device_rows.append(
                {
                    "user_id": user_id,
                    "device_id": device_id,
                    "display_name": name,
                    "created_ts": now,
                }
            )
            uploads.append((user_id, device_id, dk))
            unsigned = {"device_display_name": name} if name is not None else {}
            expected[user_id] = {device_id: {**dk, "unsigned": unsigned}}

        def txn(conn: Connection) -> None:
            conn.execute(
                host_users.insert(),
                [
                    {
                        "user_id": r["user_id"],
                        "password_hash": None,
                        "is_admin": False,
                        "deactivated": False,
                        "created_ts": now,
                    }
                    for r in device_rows
                ],
            )
            conn.execute(host_devices.insert(), device_rows)
            for user_id, device_id, dk in uploads:
                upload_txn(conn, user_id, device_id, dk, [], [], now)

        await self.db.run("make_users", txn)
        return expected

    async def _count_statements(self, user: TestUser, body: dict[str, Any]) -> int:
        """SQL statements executed while answering one query (must succeed)."""
        count = 0
        lock = threading.Lock()

        def on_execute(*_args: Any) -> None:
            nonlocal count
            with lock:
                count += 1

        event.listen(self.db.engine, "before_cursor_execute", on_execute)
        try:
            resp = await self.query(user, body)
        finally:
            event.remove(self.db.engine, "before_cursor_execute", on_execute)
        self.assert_shape(resp)
        return count

    async def test_query_for_300_users(self) -> None:
        """300 users with keys are all answered, in as many statements as 10 users."""
        expected = await self._make_users_with_keys(300)
        alice = await self.user_with_device("alice", "ADEV")
        everyone = sorted(expected)

        resp = await self.query(alice, {"device_keys": {u: [] for u in everyone}})
        self.assert_shape(resp)
        self.assertEqual(resp.json["device_keys"], expected)
        self.assertEqual(resp.json["failures"], {})

        few = await self._count_statements(
            alice, {"device_keys": {u: [] for u in everyone[:10]}}
        )
        many = await self._count_statements(
            alice, {"device_keys": {u: [] for u in everyone}}
        )
        self.assertGreater(few, 0)
        self.assertEqual(few, many)

        # Asking for named devices scales the same way.
        few = await self._count_statements(
            alice,
            {"device_keys": {u: list(expected[u]) for u in everyone[:10]}},
        )
        many = await self._count_statements(
            alice, {"device_keys": {u: list(expected[u]) for u in everyone}}
        )
        self.assertEqual(few, many)
