"""The workloads W1-W7: what each request is, what answer is correct, and how
the keys are read back and verified after each cell.

=====  ==============================  =====================================
W1     ``keys/upload``                 a fresh device's signed device keys and
                                       ``--otks`` signed one-time keys
W2     ``keys/device_signing/upload``  first master/SSK/USK of a fresh user
W3     ``keys/device_signing/upload``  the identical W2 body again (200 {})
W4     ``keys/signatures/upload``      the SSK signs K of the user's devices
W5     ``keys/signatures/upload``      the USK signs M other users' masters
W6     ``keys/query``                  Q users with device and cross-signing keys
W7     ``keys/claim``                  one-time keys of ``--claim-devices`` devices
=====  ==============================  =====================================
"""

from __future__ import annotations

import math
import time
from typing import Any

from signedjson.sign import SignatureVerifyException, verify_signed_json

from bench.fixtures import KEYS, BenchUser, Target, in_thread, say
from bench.http import Answer, RequestFailed, encode
from bench.keys import (
    MASTER,
    OTK_ALGORITHM,
    Identity,
    JsonDict,
    add_signature,
    make_device_keys,
    make_one_time_keys,
    verify_key,
)
from bench.runner import CycleSource, Feed, QueueSource, Unit, UnitSource
from bench.settings import Settings
from bench.verify import Expect, Problems

#: W1: fresh devices per fresh user.
DEVICES_PER_USER = 10
#: W7: one-time keys per upload request while topping up.
OTK_UPLOAD_CHUNK = 1000


def _bad(answer: Answer, what: str) -> str:
    return f"{what}: {answer.describe()}"


class Workload(Feed):
    """One workload at one size.

    Attributes:
        key: ``W1`` ... ``W7``.
        endpoint: the path below ``/_matrix/client/v3/``.
        param_name: the size's name (``K``, ``M``, ``Q``, ``D``) or empty.
        item: what ``items/s`` counts.
    """

    key = ""
    endpoint = ""
    param_name = ""
    item = ""

    def __init__(self, target: Target, settings: Settings, param: int | None = None):
        self.target = target
        self.settings = settings
        self.param = param

    @property
    def path(self) -> str:
        """The request path."""
        return f"/_matrix/client/v3/{self.endpoint}"

    @property
    def items_per_request(self) -> int:
        """Items done by one correct request: the size (K signatures, M
        signatures, Q users, D keys) where the workload has one, else 1."""
        return self.param if self.param is not None else 1

    def label(self) -> str:
        """``W4 keys/signatures/upload K=50``."""
        size = f" {self.param_name}={self.param}" if self.param_name else ""
        return f"{self.key} {self.endpoint}{size}"

    async def setup(self) -> None:
        """Everything done once before this size's cells (not timed)."""

    def begin_cell(self, concurrency: int) -> None:
        """Reset per-cell bookkeeping."""

    async def verify(self) -> Problems:
        """Read the keys back and verify every signature (after each cell)."""
        raise NotImplementedError

    @property
    def max_concurrency(self) -> int:
        """The largest concurrency of the run."""
        return max(self.settings.concurrency)


class W1UploadFreshDevice(Workload):
    """A fresh device uploads its signed device keys and one-time keys."""

    key = "W1"
    endpoint = "keys/upload"
    item = "keys"
    consumable = True

    def begin_cell(self, concurrency: int) -> None:
        """Forget the previous cell's devices."""
        self._sources: list[QueueSource] = []
        self._ok: dict[str, set[str]] = {}

    @property
    def items_per_request(self) -> int:
        """The device keys and the one-time keys."""
        return 1 + self.settings.otks

    async def prepare(self, n: int | None, concurrency: int) -> UnitSource:
        """``n`` fresh logged-in devices and their upload bodies."""
        assert n is not None
        otks = self.settings.otks
        users = await self.target.make_users(
            math.ceil(n / DEVICES_PER_USER), "w1", devices=DEVICES_PER_USER
        )
        todo = [(u, d) for u in users for d in u.devices][:n]

        def make() -> list[bytes]:
            bodies = []
            for user, device in todo:
                device.keys = make_device_keys(
                    user.user_id, device.device_id, device.key
                )
                body: JsonDict = {"device_keys": device.keys}
                if otks:
                    body["one_time_keys"] = make_one_time_keys(
                        user.user_id, device.device_id, device.key, otks, 0
                    )
                bodies.append(encode(body))
            return bodies

        bodies = await in_thread(make)
        units = []
        for (user, device), raw in zip(todo, bodies, strict=True):
            assert device.keys is not None
            self.target.book.add_device(user.user_id, device.device_id, device.keys)
            units.append(
                Unit(
                    self.path,
                    device.token,
                    raw,
                    self._checker(user.user_id, device.device_id),
                    (user.user_id, device.device_id),
                )
            )
        source = QueueSource(units)
        self._sources.append(source)
        return source

    def _checker(self, user_id: str, device_id: str) -> Any:
        want = self.settings.otks

        def check(answer: Answer) -> str | None:
            body = answer.body
            if answer.code != 200 or not isinstance(body, dict):
                return _bad(answer, "keys/upload")
            counts = body.get("one_time_key_counts")
            if not isinstance(counts, dict) or counts.get(OTK_ALGORITHM) != want:
                return _bad(answer, f"keys/upload: expected {want} one-time keys")
            self._ok.setdefault(user_id, set()).add(device_id)
            return None

        return check

    async def verify(self) -> Problems:
        """Every device that was answered 200 is served exactly as uploaded."""
        sent: dict[str, set[str]] = {}
        for source in self._sources:
            for unit in source.taken:
                user_id, device_id = unit.tag
                sent.setdefault(user_id, set()).add(device_id)
        expect = Expect(devices=self._ok, allowed=sent)
        return await self.target.read_back(self.target.watcher(), list(sent), expect)


class W2FirstCrossSigning(Workload):
    """A fresh user publishes master, SSK and USK (no UIA needed)."""

    key = "W2"
    endpoint = "keys/device_signing/upload"
    item = "keys"
    consumable = True

    @property
    def items_per_request(self) -> int:
        """Three keys."""
        return 3

    def begin_cell(self, concurrency: int) -> None:
        """Forget the previous cell's users."""
        self._ok: list[BenchUser] = []

    async def prepare(self, n: int | None, concurrency: int) -> UnitSource:
        """``n`` fresh users, logged in, with their identities made."""
        assert n is not None
        users = await self.target.make_users(n, "w2", devices=1)

        def make() -> list[bytes]:
            out = []
            for user in users:
                user.identity = Identity(user.user_id)
                out.append(encode(user.identity.upload_body()))
            return out

        bodies = await in_thread(make)
        units = []
        for user, raw in zip(users, bodies, strict=True):
            assert user.identity is not None
            self.target.book.add_identity(user.identity)
            units.append(Unit(self.path, user.token, raw, self._checker(user)))
        return QueueSource(units)

    def _checker(self, user: BenchUser) -> Any:
        def check(answer: Answer) -> str | None:
            if answer.code != 200 or answer.body != {}:
                return _bad(answer, "device_signing/upload (first)")
            self._ok.append(user)
            return None

        return check

    async def verify(self) -> Problems:
        """Each new user reads its own keys: master, SSK and USK, all signed."""
        return await verify_own_identities(self.target, self._ok)


async def verify_own_identities(target: Target, users: list[BenchUser]) -> Problems:
    """Each user queries itself; master, SSK and USK must be there and valid."""
    problems = Problems()

    async def one(user: BenchUser) -> Problems:
        expect = Expect(cross_signing={user.user_id}, own_usk=True)
        return await target.read_back(user, [user.user_id], expect)

    for p in await target.gather(users, one):
        problems.extend(p)
    return problems


class W3RepeatCrossSigning(Workload):
    """The identical first-upload body again: 200 ``{}`` without UIA."""

    key = "W3"
    endpoint = "keys/device_signing/upload"
    item = "keys"

    @property
    def items_per_request(self) -> int:
        """Three keys."""
        return 3

    async def setup(self) -> None:
        """Two users per worker of the largest concurrency, keys uploaded."""
        self._users = await self.target.make_users(
            2 * self.max_concurrency, "w3", devices=1, identity=True
        )
        self._units = [
            Unit(
                self.path, u.token, encode(_identity(u).upload_body()), _expect_empty, u
            )
            for u in self._users
        ]

    def begin_cell(self, concurrency: int) -> None:
        """Remember which users this cell uses."""
        self._lists = [self._units[w::concurrency] for w in range(concurrency)]

    async def prepare(self, n: int | None, concurrency: int) -> UnitSource:
        """Worker ``w`` repeats users ``w``, ``w + c``, ..."""
        return CycleSource(self._lists)

    async def verify(self) -> Problems:
        """The keys are unchanged and valid."""
        used = [u.tag for units in self._lists for u in units]
        return await verify_own_identities(self.target, used)


def _identity(user: BenchUser) -> Identity:
    assert user.identity is not None
    return user.identity


def _expect_empty(answer: Answer) -> str | None:
    if answer.code != 200 or answer.body != {}:
        return _bad(answer, "device_signing/upload (repeat)")
    return None


def _expect_no_failures(answer: Answer) -> str | None:
    if (
        answer.code != 200
        or not isinstance(answer.body, dict)
        or answer.body.get("failures") != {}
    ):
        return _bad(answer, "signatures/upload")
    return None


class W4SignOwnDevices(Workload):
    """The self-signing key signs K of the user's own devices.

    Every request carries new signatures: before each one (not timed) the
    user's self-signing key is replaced (inside an admin-opened replacement
    window, or with password UIA on Synapse), so the server must verify all K. Signing the same devices with the
    same key again would send identical (ed25519 is deterministic) signatures,
    which a server may recognise as already stored and not verify at all.

    So that the replacements stay out of the timed segments, a segment sends
    one request per user, each with the user's new key. Each worker has
    ``w4_users`` users: a segment then holds ``w4_users`` requests per worker,
    taken from one queue, and the pipeline runs down (fewer than
    ``concurrency`` requests in flight, while the last ones finish) once per
    segment rather than after every round of one request per worker.
    """

    key = "W4"
    endpoint = "keys/signatures/upload"
    param_name = "K"
    item = "signatures"
    consumable = True

    async def setup(self) -> None:
        """``w4_users`` users per worker with max(K) devices with keys, and an
        identity."""
        k_max = max(self.settings.k_sizes)
        users: list[BenchUser] | None = self.target.shared.get("w4")
        if users is None:
            started = time.monotonic()
            users = await self.target.make_users(
                self.max_concurrency * self.settings.w4_users,
                "w4",
                devices=k_max,
                device_keys=True,
                identity=True,
            )
            self.target.shared["w4"] = users
            say(
                f"  setup: {len(users)} users x {k_max} devices with keys in "
                f"{time.monotonic() - started:.1f} s"
            )
        self._users = users

    def begin_cell(self, concurrency: int) -> None:
        """The cell uses ``w4_users`` users per worker; nobody has signed with a
        new key yet."""
        self._used = self._users[: concurrency * self.settings.w4_users]
        #: user id -> the SSK public key whose signatures were answered 200.
        self._signed: dict[str, str] = {}

    def first_batch(self, concurrency: int) -> int:
        """One request per user of the cell (each has one new key at a time)."""
        return len(self._used)

    async def prepare(self, n: int | None, concurrency: int) -> UnitSource:
        """A new SSK for up to ``n`` of the cell's users, then one request each
        that signs the user's first K devices with it."""
        assert n is not None
        users = self._used[: max(1, min(n, len(self._used)))]
        target = self.target
        k = self.items_per_request

        async def replace(user: BenchUser) -> None:
            assert user.identity is not None
            body = user.identity.replace_self_signing()
            target.book.add_identity(user.identity)
            await target.provider.allow_key_replacement(user.user_id)
            auth = target.provider.replacement_auth(user.user_id)
            if auth is not None:
                body["auth"] = auth
            await target.upload_cross_signing(user, body, "new self-signing key")

        await target.gather(users, replace)

        def make() -> list[bytes]:
            out = []
            for user in users:
                assert user.identity is not None
                ssk = user.identity.self_signing
                body = {
                    user.user_id: {
                        d.device_id: add_signature(d.keys or {}, user.user_id, ssk)
                        for d in user.devices[:k]
                    }
                }
                out.append(encode(body))
            return out

        bodies = await in_thread(make)
        return QueueSource(
            [
                Unit(self.path, u.token, raw, self._checker(u), u)
                for u, raw in zip(users, bodies, strict=True)
            ]
        )

    def _checker(self, user: BenchUser) -> Any:
        assert user.identity is not None
        ssk_pub = user.identity.ssk_pub

        def check(answer: Answer) -> str | None:
            problem = _expect_no_failures(answer)
            if problem is None:
                self._signed[user.user_id] = ssk_pub
            return problem

        return check

    async def verify(self) -> Problems:
        """Each user reads itself back: after an accepted request the first K
        devices carry the current SSK's signature, and every signature (device,
        SSK, master) verifies."""
        k = self.items_per_request
        problems = Problems()

        async def one(user: BenchUser) -> Problems:
            assert user.identity is not None
            ssk_pub = user.identity.ssk_pub
            signatures = set()
            if self._signed.get(user.user_id) == ssk_pub:
                signatures = {
                    (user.user_id, d.device_id, user.user_id, f"ed25519:{ssk_pub}")
                    for d in user.devices[:k]
                }
            expect = Expect(
                devices={user.user_id: {d.device_id for d in user.devices}},
                cross_signing={user.user_id},
                own_usk=True,
                signatures=signatures,
            )
            return await self.target.read_back(user, [user.user_id], expect)

        for p in await self.target.gather(self._used, one):
            problems.extend(p)
        return problems


class W5SignOthersMasters(Workload):
    """The user-signing key signs M other users' master keys."""

    key = "W5"
    endpoint = "keys/signatures/upload"
    param_name = "M"
    item = "signatures"

    async def setup(self) -> None:
        """max(M) signed users, and one signer per worker."""
        m = self.items_per_request
        self._targets = await self.target.ensure_population(max(self.settings.m_sizes))
        signers: list[BenchUser] | None = self.target.shared.get("w5")
        if signers is None:
            signers = await self.target.make_users(
                self.max_concurrency, "w5", devices=1, device_keys=True, identity=True
            )
            self.target.shared["w5"] = signers
        self._signers = signers
        targets = self._targets[:m]

        def make() -> list[bytes]:
            out = []
            for signer in signers:
                assert signer.identity is not None
                body: JsonDict = {}
                for t in targets:
                    assert t.identity is not None
                    body[t.user_id] = {
                        t.identity.master_pub: add_signature(
                            t.identity.objects[MASTER],
                            signer.user_id,
                            signer.identity.user_signing,
                        )
                    }
                out.append(encode(body))
            return out

        bodies = await in_thread(make)
        self._units = [
            Unit(self.path, s.token, raw, _expect_no_failures, s)
            for s, raw in zip(signers, bodies, strict=True)
        ]

    def begin_cell(self, concurrency: int) -> None:
        """Worker ``w`` is signer ``w``."""
        self._used = self._units[:concurrency]

    async def prepare(self, n: int | None, concurrency: int) -> UnitSource:
        """Each signer signs the same M masters, again and again."""
        return CycleSource([[u] for u in self._used])

    async def verify(self) -> Problems:
        """Each signer reads the M users back and sees its USK's signature on
        every master key (and no other signer's); every signature verifies."""
        m = self.items_per_request
        targets = self._targets[:m]
        problems = Problems()

        async def one(unit: Unit) -> Problems:
            signer: BenchUser = unit.tag
            assert signer.identity is not None
            usk_id = f"ed25519:{signer.identity.usk_pub}"
            expect = Target.population_expect(targets, signer, Expect())
            expect.signatures |= {
                (t.user_id, MASTER, signer.user_id, usk_id) for t in targets
            }
            return await self.target.read_back(
                signer, [t.user_id for t in targets], expect
            )

        for p in await self.target.gather(self._used, one):
            problems.extend(p)
        return problems


class W6Query(Workload):
    """``keys/query`` for Q users with device and cross-signing keys."""

    key = "W6"
    endpoint = "keys/query"
    param_name = "Q"
    item = "users"

    async def setup(self) -> None:
        """max(Q) users with full keys; the first ones also ask."""
        q = self.items_per_request
        population = await self.target.ensure_population(
            max(max(self.settings.q_sizes), self.max_concurrency)
        )
        self._users = population[:q]
        expected = []
        for user in self._users:
            assert user.identity is not None
            expected.append(
                (
                    user.user_id,
                    user.devices[0].device_id,
                    user.identity.objects[MASTER]["keys"],
                    user.identity.objects["self_signing"]["keys"],
                )
            )
        raw = encode({"device_keys": {u.user_id: [] for u in self._users}})

        def check(answer: Answer) -> str | None:
            body = answer.body
            if answer.code != 200 or not isinstance(body, dict):
                return _bad(answer, "keys/query")
            try:
                dk = body["device_keys"]
                mk = body["master_keys"]
                sk = body["self_signing_keys"]
                for user_id, device_id, master, ssk in expected:
                    if device_id not in dk[user_id]:
                        return f"keys/query: {user_id}/{device_id} missing"
                    if mk[user_id]["keys"] != master:
                        return f"keys/query: wrong master key of {user_id}"
                    if sk[user_id]["keys"] != ssk:
                        return f"keys/query: wrong self-signing key of {user_id}"
            except (KeyError, TypeError) as e:
                return f"keys/query: missing {e}"
            return None

        self._askers = [
            Unit(self.path, u.token, raw, check, u)
            for u in population[: self.max_concurrency]
        ]

    def begin_cell(self, concurrency: int) -> None:
        """Worker ``w`` asks as population user ``w``."""
        self._used = self._askers[:concurrency]

    async def prepare(self, n: int | None, concurrency: int) -> UnitSource:
        """The same query, again and again."""
        return CycleSource([[u] for u in self._used])

    async def verify(self) -> Problems:
        """The Q users read back (as the first asker), every signature verified."""
        asker: BenchUser = self._used[0].tag
        expect = Target.population_expect(self._users, asker, Expect())
        return await self.target.read_back(
            asker, [u.user_id for u in self._users], expect
        )


#: Unclaimed one-time keys per device the bench keeps at most: Synapse 1.163
#: refuses an upload that would leave a device more than 500 (the module keeps
#: the newest 1000).
MAX_UNCLAIMED = 500


class W7Claim(Workload):
    """``keys/claim`` of one signed one-time key from each of D devices."""

    key = "W7"
    endpoint = "keys/claim"
    param_name = "D"
    item = "keys"
    consumable = True

    def first_batch(self, concurrency: int) -> int:
        """Claims cost a one-time key per device: start smaller."""
        return max(4 * concurrency, 25)

    async def setup(self) -> None:
        """D users with full keys; the observer claims."""
        self._owners = await self.target.ensure_population(self.items_per_request)
        state = self.target.shared.setdefault(
            "w7", {"next_id": {}, "claimed": set(), "left": {}}
        )
        self._next_id: dict[str, int] = state["next_id"]
        self._claimed_ever: set[tuple[str, str, str]] = state["claimed"]
        self._left: dict[str, int] = state["left"]
        self._raw = encode(
            {
                "one_time_keys": {
                    u.user_id: {u.devices[0].device_id: OTK_ALGORITHM}
                    for u in self._owners
                }
            }
        )

    def begin_cell(self, concurrency: int) -> None:
        """Forget the previous cell's claims."""
        self._claimed: list[tuple[str, str, str, JsonDict]] = []

    async def prepare(self, n: int | None, concurrency: int) -> UnitSource:
        """Top every device up to ``n`` (+ slack) unclaimed keys; ``n`` claims.

        At most :data:`MAX_UNCLAIMED` keys per device at once: a server that
        caps unclaimed keys would otherwise drop keys the batch counts on, or
        refuse the upload. The runner prepares again when a batch
        runs out before the cell's time is up.
        """
        assert n is not None
        n = min(n, MAX_UNCLAIMED - 2 * concurrency)
        want = n + 2 * concurrency
        uploads: list[tuple[BenchUser, int, int]] = []
        for user in self._owners:
            missing = want - self._left.get(user.user_id, 0)
            first = self._next_id.get(user.user_id, 0)
            while missing > 0:
                count = min(missing, OTK_UPLOAD_CHUNK)
                uploads.append((user, first, count))
                first += count
                missing -= count
            self._next_id[user.user_id] = first

        def make() -> list[JsonDict]:
            out = []
            for user, first, count in uploads:
                d = user.devices[0]
                out.append(
                    make_one_time_keys(user.user_id, d.device_id, d.key, count, first)
                )
            return out

        key_sets = await in_thread(make)

        async def upload(job: tuple[BenchUser, JsonDict]) -> None:
            user, keys = job
            d = user.devices[0]
            self.target.book.add_otks(user.user_id, d.device_id, keys)
            body = await self.target.client.must(
                "POST",
                f"{KEYS}/upload",
                {"one_time_keys": keys},
                token=d.token,
                what="keys/upload (one-time keys for W7)",
            )
            count = (body.get("one_time_key_counts") or {}).get(OTK_ALGORITHM)
            if not isinstance(count, int):
                raise RequestFailed(f"keys/upload answered {body}")
            self._left[user.user_id] = count

        await self.target.gather(
            [(u, k) for (u, _, _), k in zip(uploads, key_sets, strict=True)], upload
        )
        watcher = self.target.watcher()
        return QueueSource(
            [Unit(self.path, watcher.token, self._raw, self._check) for _ in range(n)]
        )

    def _check(self, answer: Answer) -> str | None:
        body = answer.body
        if answer.code != 200 or not isinstance(body, dict):
            return _bad(answer, "keys/claim")
        got = body.get("one_time_keys")
        if not isinstance(got, dict):
            return _bad(answer, "keys/claim: no one_time_keys")
        book = self.target.book.otks
        problem = None
        for user in self._owners:
            device_id = user.devices[0].device_id
            entry = (got.get(user.user_id) or {}).get(device_id)
            if not isinstance(entry, dict) or len(entry) != 1:
                problem = problem or f"keys/claim: no single key for {user.user_id}"
                continue
            ((full_id, obj),) = entry.items()
            ref = (user.user_id, device_id, full_id)
            self._left[user.user_id] = self._left.get(user.user_id, 0) - 1
            if book.get(ref) != obj:
                problem = problem or f"keys/claim: {full_id} is not a key uploaded"
            elif ref in self._claimed_ever:
                problem = problem or f"keys/claim: {full_id} handed out twice"
            else:
                self._claimed_ever.add(ref)
                self._claimed.append((user.user_id, device_id, full_id, obj))
        return problem

    async def verify(self) -> Problems:
        """Every claimed key's signature verifies under its device's key, and
        the devices read back intact."""
        claimed = list(self._claimed)
        signing_keys = self.target.book.signing_keys

        def check_claims() -> Problems:
            p = Problems()
            for user_id, device_id, full_id, obj in claimed:
                key_id = f"ed25519:{device_id}"
                p.signatures_checked += 1
                try:
                    verify_signed_json(
                        obj,
                        user_id,
                        verify_key(key_id, signing_keys[(user_id, key_id)]),
                    )
                except (SignatureVerifyException, ValueError, TypeError) as e:
                    p.add(f"claimed {user_id}/{device_id} {full_id}: {e}")
            return p

        problems = await in_thread(check_claims)
        watcher = self.target.watcher()
        expect = Target.population_expect(self._owners, watcher, Expect())
        problems.extend(
            await self.target.read_back(
                watcher, [u.user_id for u in self._owners], expect
            )
        )
        return problems


WORKLOADS: dict[str, type[Workload]] = {
    "W1": W1UploadFreshDevice,
    "W2": W2FirstCrossSigning,
    "W3": W3RepeatCrossSigning,
    "W4": W4SignOwnDevices,
    "W5": W5SignOthersMasters,
    "W6": W6Query,
    "W7": W7Claim,
}


def sizes_of(key: str, settings: Settings) -> list[int | None]:
    """The sizes a workload runs at."""
    if key == "W4":
        return list(settings.k_sizes)
    if key == "W5":
        return list(settings.m_sizes)
    if key == "W6":
        return list(settings.q_sizes)
    if key == "W7":
        return [settings.claim_devices]
    return [None]
