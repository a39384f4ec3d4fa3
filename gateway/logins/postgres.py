"""The logins' tables in the ledger's PostgreSQL database (``storage.PostgresSide``: its own pool)."""

from __future__ import annotations

from typing import Any

import asyncpg

from gateway.errors import EmailTaken
from gateway.logins.models import LinkPurpose, LinkRow, Login, LoginRow
from gateway.storage import Migration, PostgresSide
from gateway.storage.postgres import Conn

_INITIAL = """
CREATE TABLE logins (
    id             TEXT COLLATE "C" PRIMARY KEY,
    email          TEXT COLLATE "C" NOT NULL UNIQUE,
    user_name      TEXT COLLATE "C",
    developer_name TEXT COLLATE "C",
    password_hash  TEXT,
    verified       BOOLEAN NOT NULL DEFAULT FALSE,
    disabled_at    DOUBLE PRECISION,
    created_at     DOUBLE PRECISION NOT NULL,
    last_login_at  DOUBLE PRECISION
);
CREATE INDEX logins_user ON logins (user_name) WHERE user_name IS NOT NULL;

CREATE TABLE web_sessions (
    id         TEXT COLLATE "C" PRIMARY KEY,
    token_hash TEXT COLLATE "C" NOT NULL UNIQUE,  -- SHA-256 of the cookie token, hex
    login_id   TEXT COLLATE "C" NOT NULL REFERENCES logins (id) ON DELETE CASCADE,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX web_sessions_login ON web_sessions (login_id);

CREATE TABLE login_links (
    token_hash TEXT COLLATE "C" PRIMARY KEY,      -- SHA-256 of the link's token, hex
    purpose    TEXT COLLATE "C" NOT NULL CHECK (purpose IN ('invite', 'reset', 'verify')),
    login_id   TEXT COLLATE "C" NOT NULL REFERENCES logins (id) ON DELETE CASCADE,
    email      TEXT COLLATE "C" NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    used_at    DOUBLE PRECISION
);
CREATE INDEX login_links_login ON login_links (login_id, purpose, created_at);

CREATE TABLE login_failures (
    id  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key TEXT COLLATE "C" NOT NULL,                -- SHA-256 of the e-mail tried (known or not)
    at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX login_failures_key ON login_failures (key, at);
CREATE INDEX login_failures_at ON login_failures (at);
"""

POSTGRES_MIGRATIONS: tuple[Migration, ...] = (("logins_0001_initial", _INITIAL),)
_ATTEMPT_LOCK_CLASS = 0x41504C54  # pg_advisory_xact_lock(classid, objid): "APLT", hashtext(the e-mail's hash)

_LOGIN_COLUMNS = (
    "l.id, l.email, l.user_name, l.developer_name, l.password_hash, l.verified, l.disabled_at, l.created_at, "
    "l.last_login_at"
)


def _login(row: Any, offset: int = 0) -> Login:
    return Login(
        id=row[offset],
        email=row[offset + 1],
        user=row[offset + 2],
        developer=row[offset + 3],
        verified=bool(row[offset + 5]),
        disabled=row[offset + 6] is not None,
        has_password=row[offset + 4] is not None,
        created_at=row[offset + 7],
        last_login_at=row[offset + 8],
    )


async def _get(conn: Conn, where: str, value: str) -> Any:
    return await conn.fetchrow(f"SELECT {_LOGIN_COLUMNS} FROM logins l WHERE {where} = $1", value)


class PostgresLoginStore:
    def __init__(self, side: PostgresSide) -> None:
        self.side = side

    async def open(self) -> None:
        await self.side.open()

    async def close(self) -> None:
        await self.side.close()

    async def applied_migrations(self) -> list[str]:
        return await self.side.applied_migrations()

    # --- logins ----------------------------------------------------------------------------------
    async def insert_login(self, login: Login, password_hash: str | None) -> None:
        async def tx(c: Conn) -> None:
            await c.execute(
                "INSERT INTO logins (id, email, user_name, developer_name, password_hash, verified, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                login.id,
                login.email,
                login.user,
                login.developer,
                password_hash,
                login.verified,
                login.created_at,
            )

        try:
            await self.side.transaction(tx)
        except asyncpg.UniqueViolationError as exc:
            raise EmailTaken(f"{login.email} already has a login") from exc

    async def delete_login(self, login_id: str) -> None:
        async def tx(c: Conn) -> None:
            await c.execute("DELETE FROM logins WHERE id = $1", login_id)

        await self.side.transaction(tx)

    async def login_by_email(self, email: str) -> LoginRow | None:
        row = await self.side.transaction(lambda c: _get(c, "l.email", email))
        return None if row is None else LoginRow(_login(row), row[4])

    async def login_by_id(self, login_id: str) -> LoginRow | None:
        row = await self.side.transaction(lambda c: _get(c, "l.id", login_id))
        return None if row is None else LoginRow(_login(row), row[4])

    async def list_logins(self) -> list[Login]:
        async def tx(c: Conn) -> list[Any]:
            return list(await c.fetch(f"SELECT {_LOGIN_COLUMNS} FROM logins l ORDER BY l.email"))

        return [_login(row) for row in await self.side.transaction(tx)]

    async def signed_in(self, login_id: str, at: float, new_hash: str | None) -> None:
        async def tx(c: Conn) -> None:
            await c.execute(
                "UPDATE logins SET last_login_at = $1, password_hash = COALESCE($2, password_hash) WHERE id = $3",
                at,
                new_hash,
                login_id,
            )

        await self.side.transaction(tx)

    async def set_password(self, login_id: str, password_hash: str) -> int:
        async def tx(c: Conn) -> int:
            await c.execute("UPDATE logins SET password_hash = $1 WHERE id = $2", password_hash, login_id)
            return _count(await c.execute("DELETE FROM web_sessions WHERE login_id = $1", login_id))

        return await self.side.transaction(tx)

    async def link_accounts(
        self, login_id: str, user: str | None, developer: str | None, *, enable: bool
    ) -> Login | None:
        async def tx(c: Conn) -> Any:
            await c.execute(
                "UPDATE logins SET user_name = COALESCE($1, user_name), developer_name = COALESCE($2, developer_name), "
                "disabled_at = CASE WHEN $3 THEN NULL ELSE disabled_at END WHERE id = $4",
                user,
                developer,
                enable,
                login_id,
            )
            return await _get(c, "l.id", login_id)

        row = await self.side.transaction(tx)
        return None if row is None else _login(row)

    async def disable(self, email: str, at: float) -> tuple[Login, int] | None:
        async def tx(c: Conn) -> tuple[Any, int] | None:
            await c.execute("UPDATE logins SET disabled_at = COALESCE(disabled_at, $1) WHERE email = $2", at, email)
            row = await _get(c, "l.email", email)
            if row is None:
                return None
            closed = _count(await c.execute("DELETE FROM web_sessions WHERE login_id = $1", row[0]))
            return row, closed

        result = await self.side.transaction(tx)
        return None if result is None else (_login(result[0]), result[1])

    # --- sessions --------------------------------------------------------------------------------
    async def insert_session(
        self, session_id: str, token_hash: str, login_id: str, at: float, expires_at: float
    ) -> None:
        async def tx(c: Conn) -> None:
            await c.execute("DELETE FROM web_sessions WHERE login_id = $1 AND expires_at <= $2", login_id, at)
            await c.execute(
                "INSERT INTO web_sessions (id, token_hash, login_id, created_at, expires_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                session_id,
                token_hash,
                login_id,
                at,
                expires_at,
            )

        await self.side.transaction(tx)

    async def touch_session(
        self, token_hash: str, now: float, ttl_s: float, max_s: float
    ) -> tuple[str, Login, float, float] | None:
        async def find(c: Conn) -> Any:
            return await c.fetchrow(
                f"SELECT s.id, s.created_at, s.expires_at, {_LOGIN_COLUMNS} FROM web_sessions s "
                "JOIN logins l ON l.id = s.login_id "
                "WHERE s.token_hash = $1 AND s.expires_at > $2 AND l.disabled_at IS NULL",
                token_hash,
                now,
            )

        row = await self.side.transaction(find)
        if row is None:
            return None
        session_id, created_at, expires_at = row[0], row[1], row[2]
        slid = min(now + ttl_s, created_at + max_s)
        if slid - expires_at > 60:  # at most one write a minute per session, however busy

            async def slide(c: Conn) -> None:
                await c.execute(
                    "UPDATE web_sessions SET expires_at = $1 WHERE id = $2 AND expires_at < $1", slid, session_id
                )

            await self.side.transaction(slide)
            expires_at = slid
        return session_id, _login(row, 3), created_at, expires_at

    async def session_live(self, session_id: str, login_id: str, now: float) -> bool:
        async def find(c: Conn) -> Any:
            return await c.fetchrow(
                "SELECT 1 FROM web_sessions s JOIN logins l ON l.id = s.login_id "
                "WHERE s.id = $1 AND s.login_id = $2 AND s.expires_at > $3 AND l.disabled_at IS NULL",
                session_id,
                login_id,
                now,
            )

        return await self.side.transaction(find) is not None

    async def delete_session(self, token_hash: str) -> None:
        async def tx(c: Conn) -> None:
            await c.execute("DELETE FROM web_sessions WHERE token_hash = $1", token_hash)

        await self.side.transaction(tx)

    async def delete_sessions(self, login_id: str) -> int:
        async def tx(c: Conn) -> int:
            return _count(await c.execute("DELETE FROM web_sessions WHERE login_id = $1", login_id))

        return await self.side.transaction(tx)

    # --- one-time links --------------------------------------------------------------------------
    async def insert_link(
        self, token_hash: str, purpose: LinkPurpose, login_id: str, email: str, at: float, expires_at: float
    ) -> None:
        async def tx(c: Conn) -> None:
            await c.execute(
                "INSERT INTO login_links (token_hash, purpose, login_id, email, created_at, expires_at) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                token_hash,
                purpose,
                login_id,
                email,
                at,
                expires_at,
            )

        await self.side.transaction(tx)

    async def link(self, token_hash: str) -> LinkRow | None:
        async def tx(c: Conn) -> Any:
            return await c.fetchrow(
                "SELECT purpose, login_id, email, created_at, expires_at, used_at FROM login_links "
                "WHERE token_hash = $1",
                token_hash,
            )

        row = await self.side.transaction(tx)
        return None if row is None else LinkRow(row[0], row[1], row[2], row[3], row[4], row[5])

    async def links_since(self, login_id: str, purpose: LinkPurpose, since: float) -> int:
        async def tx(c: Conn) -> int:
            count = await c.fetchval(
                "SELECT COUNT(*) FROM login_links WHERE login_id = $1 AND purpose = $2 AND created_at >= $3",
                login_id,
                purpose,
                since,
            )
            return int(count)

        return await self.side.transaction(tx)

    async def redeem_link(self, token_hash: str, now: float, password_hash: str | None) -> Login | None:
        async def tx(c: Conn) -> Any:
            login_id = await c.fetchval(
                "UPDATE login_links SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 "
                "RETURNING login_id",
                now,
                token_hash,
            )
            if login_id is None:
                return None
            await c.execute(
                "UPDATE logins SET verified = TRUE, password_hash = COALESCE($1, password_hash) WHERE id = $2",
                password_hash,
                login_id,
            )
            if password_hash is not None:
                await c.execute("DELETE FROM web_sessions WHERE login_id = $1", login_id)
                await c.execute(
                    "UPDATE login_links SET used_at = $1 WHERE login_id = $2 AND used_at IS NULL "
                    "AND purpose IN ('invite', 'reset')",
                    now,
                    login_id,
                )
            return await _get(c, "l.id", login_id)

        row = await self.side.transaction(tx)
        return None if row is None else _login(row)

    # --- failed sign-ins -------------------------------------------------------------------------
    async def count_attempt(self, key: str, at: float, window_s: float, limit: int) -> list[float]:
        async def tx(c: Conn) -> list[float]:
            # one attempt per e-mail at a time, across replicas: counted and recorded together
            await c.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _ATTEMPT_LOCK_CLASS, key)
            await c.execute("DELETE FROM login_failures WHERE key = $1 AND at <= $2", key, at - window_s)
            rows = await c.fetch("SELECT at FROM login_failures WHERE key = $1 ORDER BY at", key)
            if len(rows) >= limit:
                return [float(r[0]) for r in rows]
            await c.execute("INSERT INTO login_failures (key, at) VALUES ($1, $2)", key, at)
            await c.execute(  # other e-mails' old failures, a few at a time, never waiting for a lock
                "DELETE FROM login_failures WHERE id IN (SELECT id FROM login_failures WHERE at <= $1 "
                "LIMIT 100 FOR UPDATE SKIP LOCKED)",
                at - window_s,
            )
            return []

        return await self.side.transaction(tx)

    async def clear_failures(self, key: str) -> None:
        async def tx(c: Conn) -> None:
            await c.execute("DELETE FROM login_failures WHERE key = $1", key)

        await self.side.transaction(tx)


def _count(status: str) -> int:
    """The row count of a command tag such as ``DELETE 3``."""
    return int(status.rsplit(" ", 1)[-1])
