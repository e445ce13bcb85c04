"""User-interactive auth of the embedded host, with sessions in the database.

Sessions live in the module's database, so any process of a scaled-out
deployment can complete a session that another started. A session is bound to
its user, its endpoint (method and path) and its request body (without
``auth``), and expires after ``uia.session_timeout_ms``.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from sqlalchemy import Connection, delete, select, update

from twisted.internet import threads
from twisted.web.server import Request

from synapse_xsign_module.clock import Clock
from synapse_xsign_module.config import UIAConfig
from synapse_xsign_module.errors import (
    Codes,
    InteractiveAuthIncomplete,
    MatrixError,
    bad_json,
    forbidden,
)
from synapse_xsign_module.host import Requester
from synapse_xsign_module.hosts.embedded.accounts import AccountStore
from synapse_xsign_module.hosts.embedded.passwords import check_password
from synapse_xsign_module.jsonutil import body_hash
from synapse_xsign_module.storage.database import Database
from synapse_xsign_module.storage.schema import uia_sessions
from synapse_xsign_module.storage.uia_bindings import insert_session_txn

logger = logging.getLogger(__name__)

PASSWORD = "m.login.password"
DUMMY = "m.login.dummy"


def qualify_user(user: str, server_name: str) -> str:
    """A full user id from a user id or a bare localpart."""
    return user if user.startswith("@") else f"@{user}:{server_name}"


class UIASessions:
    """Runs UIA for the embedded host.

    Args:
        db: the module's database.
        accounts: the account store (password hashes).
        config: the UIA configuration.
        clock: the clock.
        server_name: the local server name.
    """

    def __init__(
        self,
        db: Database,
        accounts: AccountStore,
        config: UIAConfig,
        clock: Clock,
        server_name: str,
    ) -> None:
        self._db = db
        self._accounts = accounts
        self._config = config
        self._clock = clock
        self._server_name = server_name

    def flows(self) -> list[dict[str, list[str]]]:
        """The flows offered: password, and dummy when configured."""
        flows = [{"stages": [PASSWORD]}]
        if self._config.allow_dummy:
            flows.append({"stages": [DUMMY]})
        return flows

    def _challenge(
        self, session_id: str, completed: list[str], error: MatrixError | None = None
    ) -> InteractiveAuthIncomplete:
        body: dict[str, Any] = {
            "flows": self.flows(),
            "params": {},
            "session": session_id,
        }
        if completed:
            body["completed"] = completed
        if error is not None:
            body["completed"] = completed
            body.update(error.to_dict())
        return InteractiveAuthIncomplete(body)

    async def _create_session(
        self, user_id: str, method: str, uri: str, digest: str
    ) -> str:
        session_id = secrets.token_urlsafe(24)
        now = self._clock.time_msec()

        await self._db.run(
            "uia_create_session",
            insert_session_txn,
            session_id,
            user_id,
            method,
            uri,
            digest,
            now,
            self._config.session_timeout_ms,
        )
        return session_id

    async def _load(self, session_id: str) -> Any:
        def txn(conn: Connection) -> Any:
            return conn.execute(
                select(uia_sessions).where(uia_sessions.c.session_id == session_id)
            ).first()

        return await self._db.run_read("uia_get_session", txn)

    async def _consume(self, session_id: str) -> None:
        def txn(conn: Connection) -> None:
            conn.execute(
                delete(uia_sessions).where(uia_sessions.c.session_id == session_id)
            )

        await self._db.run("uia_consume_session", txn)

    async def _complete(self, session_id: str, completed: list[str]) -> None:
        def txn(conn: Connection) -> None:
            conn.execute(
                update(uia_sessions)
                .where(uia_sessions.c.session_id == session_id)
                .values(completed=json.dumps(completed))
            )

        await self._db.run("uia_complete_stage", txn)

    async def authenticate(
        self, request: Request, requester: Requester, body: dict[str, Any]
    ) -> None:
        """Return when the request has completed a flow; raise otherwise.

        Raises:
            InteractiveAuthIncomplete: 401 with the flows (and the failure).
            MatrixError: 400 for malformed or unknown sessions, 403 when the
                session or the credentials belong to someone else or the
                request changed.
        """
        method = request.method.decode("ascii")
        uri = request.path.decode("utf-8", "replace")
        digest = body_hash(body)
        user_id = requester.user_id
        auth = body.get("auth")
        if auth is None:
            session_id = await self._create_session(user_id, method, uri, digest)
            raise self._challenge(session_id, [])
        if not isinstance(auth, dict):
            raise bad_json("'auth' must be a JSON object")

        raw_session = auth.get("session")
        if raw_session is None:
            session_id = await self._create_session(user_id, method, uri, digest)
            completed: list[str] = []
        else:
            if not isinstance(raw_session, str):
                raise bad_json("'auth.session' must be a string")
            session_id = raw_session
            row = await self._load(session_id)
            if row is None or row.expires_ts <= self._clock.time_msec():
                raise MatrixError(
                    400, Codes.UNKNOWN, f"Unknown session ID: {session_id}"
                )
            if row.user_id != user_id:
                raise forbidden("This authentication session belongs to another user")
            if row.method != method or row.uri != uri:
                raise forbidden(
                    "Requested operation has changed during the UI authentication session."
                )
            if row.body_hash != digest:
                raise forbidden(
                    "The request body has changed during the UI authentication session."
                )
            completed = json.loads(row.completed)

        if self._flow_done(completed):
            return
        stage = auth.get("type")
        if stage is None:
            raise self._challenge(session_id, completed)
        if stage == PASSWORD:
            await self._check_password_stage(auth, user_id, session_id, completed)
        elif stage == DUMMY and self._config.allow_dummy:
            pass
        else:
            raise self._challenge(
                session_id,
                completed,
                MatrixError(401, Codes.UNRECOGNIZED, f"Unsupported auth type: {stage}"),
            )
        completed = [*completed, stage]
        if self._flow_done(completed):
            # Authorises this one request: the session is used up.
            await self._consume(session_id)
        else:
            await self._complete(session_id, completed)
        logger.info("UIA session %s of %s completed %s", session_id, user_id, stage)

    def _flow_done(self, completed: list[str]) -> bool:
        return any(all(s in completed for s in f["stages"]) for f in self.flows())

    async def _check_password_stage(
        self, auth: dict[str, Any], user_id: str, session_id: str, completed: list[str]
    ) -> None:
        identifier = auth.get("identifier")
        if identifier is not None:
            if not isinstance(identifier, dict):
                raise bad_json("'auth.identifier' must be a JSON object")
            if identifier.get("type") != "m.id.user":
                raise forbidden("Only m.id.user identifiers are supported")
            who = identifier.get("user")
        else:
            who = auth.get("user")  # the legacy flat form
        password = auth.get("password")
        if not isinstance(who, str) or not isinstance(password, str):
            raise bad_json("m.login.password needs a user identifier and a password")
        if qualify_user(who, self._server_name) != user_id:
            raise forbidden("The authenticated user does not match the access token")
        account = await self._accounts.get_user(user_id)
        stored = account.password_hash if account is not None else None
        ok = await threads.deferToThread(check_password, password, stored)
        if not ok:
            raise self._challenge(
                session_id,
                completed,
                MatrixError(401, Codes.FORBIDDEN, "Invalid username or password"),
            )
