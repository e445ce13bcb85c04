"""Users, devices and keys made before a cell is timed, concurrently.

A :class:`Target` is one homeserver under test: its client, its user provider,
the :class:`~bench.keys.KeyBook` of everything uploaded to it, and the shared
"population" of users with full keys (device keys, cross-signing keys, the SSK
signature over the device and the device's signature over the master key) that
W5, W6 and W7 work on.
"""

from __future__ import annotations

import itertools
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attr

from twisted.internet import threads

from bench.http import JsonClient, RequestFailed, gather_limited
from bench.keys import (
    MASTER,
    Identity,
    JsonDict,
    KeyBook,
    add_signature,
    make_device_keys,
    new_signing_key,
)
from bench.providers import UserProvider
from bench.verify import Expect, Problems, Verifier

T = TypeVar("T")

KEYS = "/_matrix/client/v3/keys"
#: Users per ``/keys/query`` when reading keys back.
QUERY_CHUNK = 250


@attr.s(auto_attribs=True, slots=True)
class Device:
    """A logged-in device and its ed25519 key (version = device id)."""

    device_id: str
    token: str
    key: Any
    keys: JsonDict | None = None


@attr.s(auto_attribs=True, slots=True)
class BenchUser:
    """An account made by the bench."""

    user_id: str
    devices: list[Device] = attr.Factory(list)
    identity: Identity | None = None

    @property
    def token(self) -> str:
        """The first device's access token."""
        return self.devices[0].token


def device_id_for(index: int) -> str:
    """The bench's device ids: ``BD0000``, ``BD0001``, ..."""
    return f"BD{index:04d}"


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run CPU work (signing releases the GIL) off the reactor thread."""
    result: T = await threads.deferToThread(fn, *args)
    return result


def say(text: str) -> None:
    """A progress line on stderr."""
    print(text, file=sys.stderr, flush=True)


class Target:
    """One homeserver under test.

    Args:
        name: the label in the report.
        client: its HTTP client.
        provider: how accounts are made.
        setup_concurrency: requests in flight while preparing.
    """

    def __init__(
        self,
        name: str,
        client: JsonClient,
        provider: UserProvider,
        setup_concurrency: int = 16,
    ) -> None:
        self.name = name
        self.client = client
        self.provider = provider
        self.setup_concurrency = setup_concurrency
        self.book = KeyBook()
        self.verifier = Verifier(self.book)
        self.run_id = "b" + secrets.token_hex(3)
        self._counter = itertools.count()
        self.population: list[BenchUser] = []
        self.observer: BenchUser | None = None
        self.shared: dict[str, Any] = {}
        #: The server's process when the bench started it (CPU accounting).
        self.server_pid: int | None = None
        #: Its PostgreSQL database, when on this machine (CPU accounting).
        self.database: str | None = None

    async def start(self) -> None:
        """Prepare the provider and make the observer (a user that reads keys)."""
        await self.provider.prepare()
        (self.observer,) = await self.make_users(1, "obs", devices=1)

    def watcher(self) -> BenchUser:
        """The observer."""
        assert self.observer is not None
        return self.observer

    async def gather(self, jobs: list[Any], fn: Any) -> list[Any]:
        """Run setup jobs concurrently."""
        return await gather_limited(jobs, self.setup_concurrency, fn)

    async def make_users(
        self,
        n: int,
        tag: str,
        devices: int = 1,
        device_keys: bool = False,
        identity: bool = False,
        cross_sign: bool = False,
    ) -> list[BenchUser]:
        """Make ``n`` users with ``devices`` logged-in devices each.

        Args:
            n: how many users.
            tag: part of the localparts (``<run>-<tag>-<n>``).
            devices: devices per user.
            device_keys: upload signed device keys for every device.
            identity: upload master, SSK and USK.
            cross_sign: also have the SSK sign the first device and the first
                device sign the master key (needs both of the above).
        """
        if n <= 0:
            return []
        localparts = [f"{self.run_id}-{tag}-{next(self._counter)}" for _ in range(n)]
        user_ids: list[str] = await self.gather(localparts, self.provider.create_user)
        users = [BenchUser(u) for u in user_ids]
        pairs = [(u, device_id_for(i)) for u in users for i in range(devices)]

        async def login(pair: tuple[BenchUser, str]) -> Device:
            user, device_id = pair
            token = await self.provider.login(user.user_id, device_id)
            return Device(device_id, token, new_signing_key(device_id))

        for (user, _), device in zip(
            pairs, await self.gather(pairs, login), strict=True
        ):
            user.devices.append(device)
        if device_keys:
            await self.upload_device_keys(users)
        if identity:
            await self.upload_identities(users)
        if cross_sign:
            await self.cross_sign(users)
        return users

    async def upload_device_keys(self, users: list[BenchUser]) -> None:
        """Upload signed device keys for every device of ``users``."""
        todo = [(u, d) for u in users for d in u.devices]

        def make() -> None:
            for user, device in todo:
                device.keys = make_device_keys(
                    user.user_id, device.device_id, device.key
                )

        await in_thread(make)

        async def upload(pair: tuple[BenchUser, Device]) -> None:
            user, device = pair
            assert device.keys is not None
            self.book.add_device(user.user_id, device.device_id, device.keys)
            await self.client.must(
                "POST",
                f"{KEYS}/upload",
                {"device_keys": device.keys},
                token=device.token,
                what=f"keys/upload for {user.user_id}/{device.device_id}",
            )

        await self.gather(todo, upload)

    async def upload_identities(self, users: list[BenchUser]) -> None:
        """Make and upload master, SSK and USK for each of ``users``."""
        for user in users:
            user.identity = Identity(user.user_id)

        async def upload(user: BenchUser) -> None:
            assert user.identity is not None
            self.book.add_identity(user.identity)
            await self.upload_cross_signing(
                user, user.identity.upload_body(), "device_signing/upload"
            )

        await self.gather(users, upload)

    async def post_keys(
        self, user: BenchUser, endpoint: str, body: JsonDict, what: str
    ) -> JsonDict:
        """``POST /keys/<endpoint>`` as ``user``'s first device; the 200 body."""
        return await self.client.must(
            "POST",
            f"{KEYS}/{endpoint}",
            body,
            token=user.token,
            what=f"{what} for {user.user_id}",
        )

    async def upload_cross_signing(
        self, user: BenchUser, body: JsonDict, what: str
    ) -> None:
        """``POST /keys/device_signing/upload`` as ``user``; it must answer {}."""
        answer = await self.post_keys(user, "device_signing/upload", body, what)
        if answer != {}:
            raise RequestFailed(f"device_signing/upload answered {answer}")

    async def cross_sign(self, users: list[BenchUser]) -> None:
        """SSK over the first device and first device over the master key."""

        async def sign(user: BenchUser) -> None:
            identity, device = user.identity, user.devices[0]
            assert identity is not None and device.keys is not None
            body = {
                user.user_id: {
                    device.device_id: add_signature(
                        device.keys, user.user_id, identity.self_signing
                    ),
                    identity.master_pub: add_signature(
                        identity.objects[MASTER], user.user_id, device.key
                    ),
                }
            }
            answer = await self.post_keys(
                user, "signatures/upload", body, "signatures/upload"
            )
            if answer.get("failures"):
                raise RequestFailed(f"signatures/upload failed: {answer['failures']}")

        await self.gather(users, sign)

    async def ensure_population(self, n: int) -> list[BenchUser]:
        """At least ``n`` users with full keys; returns the first ``n``."""
        missing = n - len(self.population)
        if missing > 0:
            started = time.monotonic()
            self.population += await self.make_users(
                missing,
                "pop",
                devices=1,
                device_keys=True,
                identity=True,
                cross_sign=True,
            )
            say(
                f"  setup: {missing} users with device and cross-signing keys "
                f"in {time.monotonic() - started:.1f} s"
            )
        return self.population[:n]

    @staticmethod
    def population_expect(
        users: list[BenchUser], requester: BenchUser, expect: Expect
    ) -> Expect:
        """Add what the population's users must show ``requester`` to ``expect``.

        The device's signature over its own master key is required only when
        the owner asks: Synapse shows it to the owner alone, the module to
        everyone (either way, when present it must verify).
        """
        for user in users:
            identity = user.identity
            assert identity is not None
            device = user.devices[0].device_id
            expect.devices.setdefault(user.user_id, set()).add(device)
            expect.cross_signing.add(user.user_id)
            expect.signatures.add(
                (user.user_id, device, user.user_id, f"ed25519:{identity.ssk_pub}")
            )
            if user.user_id == requester.user_id:
                expect.signatures.add(
                    (user.user_id, MASTER, user.user_id, f"ed25519:{device}")
                )
        return expect

    async def query(self, token: str, user_ids: list[str]) -> JsonDict:
        """``/keys/query`` for ``user_ids`` (one request)."""
        return await self.client.must(
            "POST",
            f"{KEYS}/query",
            {"device_keys": {u: [] for u in user_ids}},
            token=token,
            what="keys/query (read back)",
        )

    async def read_back(
        self, requester: BenchUser, user_ids: list[str], expect: Expect
    ) -> Problems:
        """Query ``user_ids`` as ``requester`` (in chunks) and verify everything."""
        problems = Problems()
        chunks = [
            user_ids[i : i + QUERY_CHUNK] for i in range(0, len(user_ids), QUERY_CHUNK)
        ]

        async def one(chunk: list[str]) -> Problems:
            answer = await self.query(requester.token, chunk)
            return await in_thread(
                self.verifier.check_query, answer, requester.user_id, chunk, expect
            )

        for p in await gather_limited(chunks, 4, one):
            problems.extend(p)
        return problems
