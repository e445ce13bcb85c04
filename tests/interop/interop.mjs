// Interoperability driver: matrix-rust-sdk's crypto engine (through
// @matrix-org/matrix-sdk-crypto-wasm) against a running synapse-xsign
// embedded host, over real HTTP.
//
// Usage:
//   XSIGN_INTEROP_CREDENTIALS='{"alice":"pw","bob":"pw","carol":"pw"}' \
//     node interop.mjs http://127.0.0.1:PORT
//
// The script plays three clients. alice and bob each run an OlmMachine: they
// log in, upload device and one-time keys, bootstrap cross-signing, upload
// the self-signatures and query each other. alice then verifies bob's
// identity and uploads the signature. carol also runs an OlmMachine and resets
// her cross-signing keys once, which the server must guard with UIA. Finally
// some raw /keys/query calls check what each user may see.
//
// Progress goes to stderr. The outcome is one line on stdout:
//   XSIGN_INTEROP_RESULT {...json...}
// and the exit status is 0 when the scenario ran to its end (the assertions
// on the reported values are made by tests/interop/test_rust_sdk.py), 1 when
// a step failed (the line then holds {"ok": false, "error": ...}).

import {
    initAsync,
    DeviceId,
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    OlmMachine,
    SignatureUploadRequest,
    UserId,
} from "@matrix-org/matrix-sdk-crypto-wasm";

const RESULT_MARKER = "XSIGN_INTEROP_RESULT ";
const CLIENT_PREFIX = "/_matrix/client/v3";
const REQUEST_TIMEOUT_MS = 20_000;

const baseUrl = (process.argv[2] || "").replace(/\/+$/, "");
const credentials = JSON.parse(process.env.XSIGN_INTEROP_CREDENTIALS || "{}");

function log(...args) {
    console.error("[interop]", ...args);
}

class StepError extends Error {}

/** One HTTP call; returns {status, json, text}. */
async function call(method, path, { token, body } = {}) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    let payload;
    if (body !== undefined) {
        headers["Content-Type"] = "application/json";
        payload = typeof body === "string" ? body : JSON.stringify(body);
    }
    const res = await fetch(baseUrl + path, {
        method,
        headers,
        body: payload,
        signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
    const text = await res.text();
    let json = null;
    try {
        json = JSON.parse(text);
    } catch {
        // left null: callers that need JSON check for it
    }
    return { status: res.status, json, text };
}

function expectOk(what, res) {
    if (res.status !== 200 || res.json === null || typeof res.json !== "object") {
        throw new StepError(`${what}: HTTP ${res.status} ${res.text.slice(0, 500)}`);
    }
    return res;
}

/** A logged-in user with an OlmMachine. */
class Client {
    constructor(localpart) {
        this.localpart = localpart;
        this.password = credentials[localpart];
        if (typeof this.password !== "string") {
            throw new StepError(`no password for ${localpart} in XSIGN_INTEROP_CREDENTIALS`);
        }
        this.signatureFailures = [];
        this.requestsSent = {};
        this.uiaRounds = 0;
    }

    async login() {
        const res = expectOk(
            `login ${this.localpart}`,
            await call("POST", `${CLIENT_PREFIX}/login`, {
                body: {
                    type: "m.login.password",
                    identifier: { type: "m.id.user", user: this.localpart },
                    password: this.password,
                    initial_device_display_name: `${this.localpart}'s rust-sdk device`,
                },
            }),
        );
        this.userId = res.json.user_id;
        this.deviceId = res.json.device_id;
        this.token = res.json.access_token;
        const who = expectOk(
            `whoami ${this.localpart}`,
            await call("GET", `${CLIENT_PREFIX}/account/whoami`, { token: this.token }),
        );
        if (who.json.user_id !== this.userId || who.json.device_id !== this.deviceId) {
            throw new StepError(`whoami of ${this.localpart} disagrees: ${who.text}`);
        }
        log(`${this.userId} logged in on ${this.deviceId}`);
    }

    async startMachine() {
        this.machine = await OlmMachine.initialize(
            new UserId(this.userId),
            new DeviceId(this.deviceId),
        );
    }

    post(path, body) {
        return call("POST", `${CLIENT_PREFIX}${path}`, { token: this.token, body });
    }

    /** Send one outgoing request of the machine and feed the answer back. */
    async send(req) {
        let path;
        let kind;
        if (req instanceof KeysUploadRequest) {
            [path, kind] = ["/keys/upload", "keys_upload"];
        } else if (req instanceof KeysQueryRequest) {
            [path, kind] = ["/keys/query", "keys_query"];
        } else if (req instanceof KeysClaimRequest) {
            [path, kind] = ["/keys/claim", "keys_claim"];
        } else if (req instanceof SignatureUploadRequest) {
            [path, kind] = ["/keys/signatures/upload", "signatures_upload"];
        } else {
            throw new StepError(
                `${this.localpart}: unexpected outgoing request ${req.constructor.name}`,
            );
        }
        const res = expectOk(`${this.localpart} ${kind}`, await this.post(path, req.body));
        this.requestsSent[kind] = (this.requestsSent[kind] || 0) + 1;
        if (kind === "signatures_upload") {
            const failures = res.json.failures || {};
            if (Object.keys(failures).length > 0) {
                this.signatureFailures.push(failures);
                log(`${this.localpart}: signature upload failures`, JSON.stringify(failures));
            }
        }
        if (req.id !== undefined && req.id !== null) {
            await this.machine.markRequestAsSent(req.id, req.type, res.text);
        }
        return res;
    }

    /** Send outgoing requests until the machine has none left. */
    async drain() {
        for (let round = 0; round < 20; round++) {
            const reqs = await this.machine.outgoingRequests();
            if (reqs.length === 0) return;
            for (const req of reqs) await this.send(req);
        }
        throw new StepError(`${this.localpart}: outgoing requests never drained`);
    }

    /** Upload the cross-signing keys, answering a UIA challenge if one comes. */
    async uploadSigningKeys(req) {
        const body = JSON.parse(req.body);
        let res = await this.post("/keys/device_signing/upload", body);
        if (res.status === 401) {
            const flows = (res.json && res.json.flows) || [];
            const session = res.json && res.json.session;
            const passwordFlow = flows.some(
                (f) => Array.isArray(f.stages) && f.stages.includes("m.login.password"),
            );
            if (!passwordFlow || typeof session !== "string") {
                throw new StepError(`${this.localpart}: unusable UIA challenge ${res.text}`);
            }
            this.uiaRounds += 1;
            res = await this.post("/keys/device_signing/upload", {
                ...body,
                auth: {
                    type: "m.login.password",
                    identifier: { type: "m.id.user", user: this.localpart },
                    password: this.password,
                    session,
                },
            });
        }
        expectOk(`${this.localpart} device_signing/upload`, res);
    }

    /** bootstrapCrossSigning(true), sending its requests in the prescribed order. */
    async bootstrap() {
        const reqs = await this.machine.bootstrapCrossSigning(true);
        if (reqs.uploadKeysRequest) await this.send(reqs.uploadKeysRequest);
        await this.uploadSigningKeys(reqs.uploadSigningKeysRequest);
        await this.send(reqs.uploadSignaturesRequest);
        log(`${this.userId} bootstrapped cross-signing`);
    }

    /** Re-query every tracked user (standing in for a sync's device_lists). */
    async refresh() {
        await this.machine.markAllTrackedUsersAsDirty();
        await this.drain();
    }

    async track(...others) {
        await this.machine.updateTrackedUsers(others.map((c) => new UserId(c.userId)));
        await this.drain();
    }

    async ownDeviceTrusted() {
        const device = await this.machine.getDevice(
            new UserId(this.userId),
            new DeviceId(this.deviceId),
        );
        return device ? device.isCrossSigningTrusted() : null;
    }

    async crossSigningStatus() {
        const s = await this.machine.crossSigningStatus();
        return {
            has_master: s.hasMaster,
            has_self_signing: s.hasSelfSigning,
            has_user_signing: s.hasUserSigning,
        };
    }

    async identityOf(other) {
        return this.machine.getIdentity(new UserId(other.userId));
    }

    async deviceOf(other) {
        return this.machine.getDevice(new UserId(other.userId), new DeviceId(other.deviceId));
    }

    async rawQuery(...users) {
        const deviceKeys = {};
        for (const u of users) deviceKeys[u.userId] = [];
        const res = expectOk(
            `${this.localpart} raw keys/query`,
            await this.post("/keys/query", { device_keys: deviceKeys }),
        );
        return res.json;
    }

    report() {
        return {
            user_id: this.userId,
            device_id: this.deviceId,
            requests_sent: this.requestsSent,
            signature_upload_failures: this.signatureFailures,
            uia_rounds: this.uiaRounds,
        };
    }
}

/** The signatures a user made on another user's master key, from a raw query. */
function masterSignaturesBy(query, target, signer) {
    const master = (query.master_keys || {})[target.userId];
    if (!master) return null;
    return Object.keys((master.signatures || {})[signer.userId] || {});
}

/** Whether a raw query shows the user's device signed by their self-signing key. */
function deviceSignedBySsk(query, user) {
    const ssk = (query.self_signing_keys || {})[user.userId];
    const device = ((query.device_keys || {})[user.userId] || {})[user.deviceId];
    if (!ssk || !device) return false;
    const sskId = Object.keys(ssk.keys)[0];
    return typeof ((device.signatures || {})[user.userId] || {})[sskId] === "string";
}

async function scenario() {
    if (!baseUrl) throw new StepError("usage: node interop.mjs BASE_URL");
    await initAsync();

    const versions = expectOk("versions", await call("GET", "/_matrix/client/versions"));
    log("server versions", versions.json.versions.join(" "));

    const alice = new Client("alice");
    const bob = new Client("bob");
    const carol = new Client("carol");
    for (const c of [alice, bob, carol]) {
        await c.login();
        await c.startMachine();
    }

    // Device keys and one-time keys (and the machine's own first key query).
    for (const c of [alice, bob]) await c.drain();
    const otkCounts = {};
    for (const c of [alice, bob]) {
        const res = expectOk(`${c.localpart} otk count`, await c.post("/keys/upload", {}));
        otkCounts[c.localpart] = res.json.one_time_key_counts;
    }

    // Cross-signing, first publication: no UIA expected.
    for (const c of [alice, bob]) await c.bootstrap();
    const firstUploadUia = { alice: alice.uiaRounds, bob: bob.uiaRounds };

    // Own keys again (now with the self-signatures), then each other's.
    for (const c of [alice, bob]) await c.refresh();
    await alice.track(bob);
    await bob.track(alice);

    const bobIdentityBefore = await alice.identityOf(bob);
    const bobDeviceSeenByAlice = await alice.deviceOf(bob);
    const aliceDeviceSeenByBob = await bob.deviceOf(alice);
    const before = {
        alice_sees_bob_identity: Boolean(bobIdentityBefore),
        bob_identity_verified_for_alice: bobIdentityBefore
            ? bobIdentityBefore.isVerified()
            : null,
        bob_device_known_to_alice: Boolean(bobDeviceSeenByAlice),
        bob_device_cross_signed_by_owner: bobDeviceSeenByAlice
            ? bobDeviceSeenByAlice.isCrossSignedByOwner()
            : null,
        bob_device_trusted_by_alice: bobDeviceSeenByAlice
            ? bobDeviceSeenByAlice.isCrossSigningTrusted()
            : null,
        bob_device_display_name: bobDeviceSeenByAlice
            ? bobDeviceSeenByAlice.displayName ?? null
            : null,
        alice_device_cross_signed_by_owner: aliceDeviceSeenByBob
            ? aliceDeviceSeenByBob.isCrossSignedByOwner()
            : null,
        bob_master_key_seen_by_alice: bobIdentityBefore ? bobIdentityBefore.masterKey : null,
    };

    // An Olm session from alice to bob: /keys/claim of a signed one-time key,
    // whose signature the SDK checks against bob's device key.
    const claim = await alice.machine.getMissingSessions([new UserId(bob.userId)]);
    if (claim) await alice.send(claim);
    const claimAgain = await alice.machine.getMissingSessions([new UserId(bob.userId)]);
    const olm = {
        claim_request_made: Boolean(claim),
        session_established: !claimAgain,
    };

    // alice verifies bob's identity with her user-signing key.
    if (!bobIdentityBefore) throw new StepError("alice does not know bob's identity");
    const verifyRequest = await bobIdentityBefore.verify();
    await alice.send(verifyRequest);
    const verifiedBeforeRequery = (await alice.identityOf(bob)).isVerified();
    await alice.refresh();
    const bobIdentityAfter = await alice.identityOf(bob);
    const bobDeviceAfter = await alice.deviceOf(bob);

    // carol publishes cross-signing keys, then resets them: UIA the second time.
    await carol.drain();
    await carol.bootstrap();
    const carolFirstUia = carol.uiaRounds;
    await carol.bootstrap();
    await carol.refresh();

    const trusted = {};
    const status = {};
    const ownIdentityVerified = {};
    for (const c of [alice, bob, carol]) {
        trusted[c.localpart] = await c.ownDeviceTrusted();
        status[c.localpart] = await c.crossSigningStatus();
        const own = await c.identityOf(c);
        ownIdentityVerified[c.localpart] = own ? own.isVerified() : null;
    }

    // What the server shows each user.
    const bobQueriesAlice = await bob.rawQuery(alice);
    const bobQueriesSelf = await bob.rawQuery(bob);
    const carolQueriesBob = await carol.rawQuery(bob);
    const aliceQueriesBob = await alice.rawQuery(bob);
    const aliceUsk = (await alice.identityOf(alice)).userSigningKey;

    return {
        ok: true,
        sdk: "@matrix-org/matrix-sdk-crypto-wasm",
        one_time_key_counts: otkCounts,
        first_upload_uia_rounds: { ...firstUploadUia, carol: carolFirstUia },
        reset_uia_rounds: { carol: carol.uiaRounds - carolFirstUia },
        own_device_cross_signing_trusted: trusted,
        own_identity_verified: ownIdentityVerified,
        cross_signing_status: status,
        before_verification: before,
        olm,
        after_verification: {
            // The SDK only trusts bob once it reads alice's signature back.
            bob_identity_verified_before_requery: verifiedBeforeRequery,
            bob_identity_verified_for_alice: bobIdentityAfter
                ? bobIdentityAfter.isVerified()
                : null,
            bob_device_trusted_by_alice: bobDeviceAfter
                ? bobDeviceAfter.isCrossSigningTrusted()
                : null,
        },
        alice_user_signing_key: aliceUsk,
        raw: {
            bob_queries_alice: {
                user_signing_keys_users: Object.keys(bobQueriesAlice.user_signing_keys || {}),
                has_alice_master: Boolean((bobQueriesAlice.master_keys || {})[alice.userId]),
                has_alice_self_signing: Boolean(
                    (bobQueriesAlice.self_signing_keys || {})[alice.userId],
                ),
            },
            bob_queries_self: {
                user_signing_keys_users: Object.keys(bobQueriesSelf.user_signing_keys || {}),
                device_signed_by_self_signing_key: deviceSignedBySsk(bobQueriesSelf, bob),
                alice_signatures_on_bob_master: masterSignaturesBy(bobQueriesSelf, bob, alice),
            },
            carol_queries_bob: {
                user_signing_keys_users: Object.keys(carolQueriesBob.user_signing_keys || {}),
                has_bob_master: Boolean((carolQueriesBob.master_keys || {})[bob.userId]),
                alice_signatures_on_bob_master: masterSignaturesBy(carolQueriesBob, bob, alice),
            },
            alice_queries_bob: {
                has_bob_master: Boolean((aliceQueriesBob.master_keys || {})[bob.userId]),
                alice_signatures_on_bob_master: masterSignaturesBy(aliceQueriesBob, bob, alice),
            },
        },
        clients: { alice: alice.report(), bob: bob.report(), carol: carol.report() },
    };
}

try {
    const result = await scenario();
    process.stdout.write(RESULT_MARKER + JSON.stringify(result) + "\n");
    process.exit(0);
} catch (e) {
    log(e && e.stack ? e.stack : String(e));
    const error = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
    process.stdout.write(RESULT_MARKER + JSON.stringify({ ok: false, error }) + "\n");
    process.exit(1);
}
