"""Quick end-to-end checks of the harness itself."""

from __future__ import annotations

from tests.utils import HostTestCase


class HarnessTest(HostTestCase):
    async def test_login_whoami_upload_query(self) -> None:
        """A user logs in, uploads device keys and reads them back."""
        alice = await self.user_with_device("alice", "ADEV")
        resp = await self.client.get(
            "/_matrix/client/v3/account/whoami", token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json["user_id"], alice.user_id)
        dk = alice.device_keys()
        resp = await self.client.post(
            "/_matrix/client/v3/keys/upload", {"device_keys": dk}, token=alice.token
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(resp.json, {"one_time_key_counts": {"signed_curve25519": 0}})
        resp = await self.client.post(
            "/_matrix/client/v3/keys/query",
            {"device_keys": {alice.user_id: []}},
            token=alice.token,
        )
        self.assertEqual(resp.code, 200, resp)
        self.assertEqual(
            resp.json["device_keys"][alice.user_id]["ADEV"], {**dk, "unsigned": {}}
        )
