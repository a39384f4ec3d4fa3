"""The logins' tables in the ledger's SQLite file (``storage.SqliteSide``: its own connection)."""

from __future__ import annotations

import sqlite3
from typing import Any

from gateway.errors import EmailTaken
from gateway.logins.models import LinkPurpose, LinkRow, Login, LoginRow
from gateway.storage import Migration, SqliteSide

_INITIAL = """
CREATE TABLE logins (
    id             TEXT PRIMARY KEY,
    email          TEXT NOT NULL UNIQUE,
    user_name      TEXT,
    developer_name TEXT,
    password_hash  TEXT,
    verified       INTEGER NOT NULL DEFAULT 0 CHECK (verified IN (0, 1)),
    disabled_at    REAL,
    created_at     REAL NOT NULL,
    last_login_at  REAL
);
CREATE INDEX logins_user ON logins (user_name) WHERE user_name IS NOT NULL;

CREATE TABLE web_sessions (
    id         TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,  -- SHA-256 of the cookie token, hex
    login_id   TEXT NOT NULL REFERENCES logins (id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX web_sessions_login ON web_sessions (login_id);

CREATE TABLE login_links (
    token_hash TEXT PRIMARY KEY,      -- SHA-256 of the link's token, hex
    purpose    TEXT NOT NULL CHECK (purpose IN ('invite', 'reset', 'verify')),
    login_id   TEXT NOT NULL REFERENCES logins (id) ON DELETE CASCADE,
    email      TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at    REAL
);
CREATE INDEX login_links_login ON login_links (login_id, purpose, created_at);

CREATE TABLE login_failures (
    id  INTEGER PRIMARY KEY,
    key TEXT NOT NULL,                -- SHA-256 of the e-mail tried (known or not)
    at  REAL NOT NULL
);
CREATE INDEX login_failures_key ON login_failures (key, at);
CREATE INDEX login_failures_at ON login_failures (at);
"""

SQLITE_MIGRATIONS: tuple[Migration, ...] = (("logins_0001_initial", _INITIAL),)

_LOGIN_COLUMNS = (
    "l.id, l.email, l.user_name, l.developer_name, l.password_hash, l.verified, l.disabled_at, l.created_at, "
    "l.last_login_at"
)


def _login(row: Any) -> Login:
    return Login(
        id=row[0],
        email=row[1],
        user=row[2],
        developer=row[3],
        verified=bool(row[5]),
        disabled=row[6] is not None,
        has_password=row[4] is not None,
        created_at=row[7],
        last_login_at=row[8],
    )


def _login_row(row: Any) -> LoginRow:
    return LoginRow(login=_login(row), password_hash=row[4])


def _get(conn: sqlite3.Connection, where: str, value: str) -> Any:
    return conn.execute(f"SELECT {_LOGIN_COLUMNS} FROM logins l WHERE {where} = ?", (value,)).fetchone()


class SqliteLoginStore:
    def __init__(self, side: SqliteSide) -> None:
        self.side = side

    async def open(self) -> None:
        await self.side.open()

    async def close(self) -> None:
        await self.side.close()

    async def applied_migrations(self) -> list[str]:
        return await self.side.applied_migrations()

    # --- logins ----------------------------------------------------------------------------------
    async def insert_login(self, login: Login, password_hash: str | None) -> None:
        def tx(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO logins (id, email, user_name, developer_name, password_hash, verified, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    login.id,
                    login.email,
                    login.user,
                    login.developer,
                    password_hash,
                    int(login.verified),
                    login.created_at,
                ),
            )

        try:
            await self.side.write(tx)
        except sqlite3.IntegrityError as exc:
            raise EmailTaken(f"{login.email} already has a login") from exc

    async def delete_login(self, login_id: str) -> None:
        await self.side.write(lambda c: c.execute("DELETE FROM logins WHERE id = ?", (login_id,)))

    async def login_by_email(self, email: str) -> LoginRow | None:
        row = await self.side.read(lambda c: _get(c, "l.email", email))
        return None if row is None else _login_row(row)

    async def login_by_id(self, login_id: str) -> LoginRow | None:
        row = await self.side.read(lambda c: _get(c, "l.id", login_id))
        return None if row is None else _login_row(row)

    async def list_logins(self) -> list[Login]:
        rows = await self.side.read(
            lambda c: c.execute(f"SELECT {_LOGIN_COLUMNS} FROM logins l ORDER BY l.email").fetchall()
        )
        return [_login(row) for row in rows]

    async def signed_in(self, login_id: str, at: float, new_hash: str | None) -> None:
        def tx(c: sqlite3.Connection) -> None:
            c.execute("UPDATE logins SET last_login_at = ? WHERE id = ?", (at, login_id))
            if new_hash is not None:
                c.execute("UPDATE logins SET password_hash = ? WHERE id = ?", (new_hash, login_id))

        await self.side.write(tx)

    async def set_password(self, login_id: str, password_hash: str) -> int:
        def tx(c: sqlite3.Connection) -> int:
            c.execute("UPDATE logins SET password_hash = ? WHERE id = ?", (password_hash, login_id))
            return c.execute("DELETE FROM web_sessions WHERE login_id = ?", (login_id,)).rowcount

        return await self.side.write(tx)

    async def link_accounts(
        self, login_id: str, user: str | None, developer: str | None, *, enable: bool
    ) -> Login | None:
        def tx(c: sqlite3.Connection) -> Any:
            c.execute(
                "UPDATE logins SET user_name = COALESCE(?, user_name), developer_name = COALESCE(?, developer_name), "
                "disabled_at = CASE WHEN ? THEN NULL ELSE disabled_at END WHERE id = ?",
                (user, developer, int(enable), login_id),
            )
            return _get(c, "l.id", login_id)

        row = await self.side.write(tx)
        return None if row is None else _login(row)

    async def disable(self, email: str, at: float) -> tuple[Login, int] | None:
        def tx(c: sqlite3.Connection) -> tuple[Any, int] | None:
            c.execute("UPDATE logins SET disabled_at = COALESCE(disabled_at, ?) WHERE email = ?", (at, email))
            row = _get(c, "l.email", email)
            if row is None:
                return None
            closed = c.execute("DELETE FROM web_sessions WHERE login_id = ?", (row[0],)).rowcount
            return row, closed

        result = await self.side.write(tx)
        return None if result is None else (_login(result[0]), result[1])

    # --- sessions --------------------------------------------------------------------------------
    async def insert_session(
        self, session_id: str, token_hash: str, login_id: str, at: float, expires_at: float
    ) -> None:
        def tx(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM web_sessions WHERE login_id = ? AND expires_at <= ?", (login_id, at))
            c.execute(
                "INSERT INTO web_sessions (id, token_hash, login_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (session_id, token_hash, login_id, at, expires_at),
            )

        await self.side.write(tx)

    async def touch_session(
        self, token_hash: str, now: float, ttl_s: float, max_s: float
    ) -> tuple[str, Login, float, float] | None:
        def find(c: sqlite3.Connection) -> Any:
            return c.execute(
                f"SELECT s.id, s.created_at, s.expires_at, {_LOGIN_COLUMNS} FROM web_sessions s "
                "JOIN logins l ON l.id = s.login_id "
                "WHERE s.token_hash = ? AND s.expires_at > ? AND l.disabled_at IS NULL",
                (token_hash, now),
            ).fetchone()

        row = await self.side.read(find)
        if row is None:
            return None
        session_id, created_at, expires_at = row[0], row[1], row[2]
        slid = min(now + ttl_s, created_at + max_s)
        if slid - expires_at > 60:  # at most one write a minute per session, however busy
            await self.side.write(
                lambda c: c.execute(
                    "UPDATE web_sessions SET expires_at = ? WHERE id = ? AND expires_at < ?", (slid, session_id, slid)
                )
            )
            expires_at = slid
        return session_id, _login(row[3:]), created_at, expires_at

    async def session_live(self, session_id: str, login_id: str, now: float) -> bool:
        def find(c: sqlite3.Connection) -> Any:
            return c.execute(
                "SELECT 1 FROM web_sessions s JOIN logins l ON l.id = s.login_id "
                "WHERE s.id = ? AND s.login_id = ? AND s.expires_at > ? AND l.disabled_at IS NULL",
                (session_id, login_id, now),
            ).fetchone()

        return await self.side.read(find) is not None

    async def delete_session(self, token_hash: str) -> None:
        await self.side.write(lambda c: c.execute("DELETE FROM web_sessions WHERE token_hash = ?", (token_hash,)))

    async def delete_sessions(self, login_id: str) -> int:
        return await self.side.write(
            lambda c: c.execute("DELETE FROM web_sessions WHERE login_id = ?", (login_id,)).rowcount
        )

    # --- one-time links --------------------------------------------------------------------------
    async def insert_link(
        self, token_hash: str, purpose: LinkPurpose, login_id: str, email: str, at: float, expires_at: float
    ) -> None:
        await self.side.write(
            lambda c: c.execute(
                "INSERT INTO login_links (token_hash, purpose, login_id, email, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (token_hash, purpose, login_id, email, at, expires_at),
            )
        )

    async def link(self, token_hash: str) -> LinkRow | None:
        row = await self.side.read(
            lambda c: c.execute(
                "SELECT purpose, login_id, email, created_at, expires_at, used_at FROM login_links "
                "WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
        )
        return None if row is None else LinkRow(*row)

    async def links_since(self, login_id: str, purpose: LinkPurpose, since: float) -> int:
        count: int = await self.side.read(
            lambda c: c.execute(
                "SELECT COUNT(*) FROM login_links WHERE login_id = ? AND purpose = ? AND created_at >= ?",
                (login_id, purpose, since),
            ).fetchone()[0]
        )
        return count

    async def redeem_link(self, token_hash: str, now: float, password_hash: str | None) -> Login | None:
        def tx(c: sqlite3.Connection) -> Any:
            row = c.execute(
                "UPDATE login_links SET used_at = ? WHERE token_hash = ? AND used_at IS NULL AND expires_at > ? "
                "RETURNING login_id",
                (now, token_hash, now),
            ).fetchone()
            if row is None:
                return None
            login_id = row[0]
            c.execute("UPDATE logins SET verified = 1 WHERE id = ?", (login_id,))
            if password_hash is not None:
                c.execute("UPDATE logins SET password_hash = ? WHERE id = ?", (password_hash, login_id))
                c.execute("DELETE FROM web_sessions WHERE login_id = ?", (login_id,))
                c.execute(
                    "UPDATE login_links SET used_at = ? WHERE login_id = ? AND used_at IS NULL "
                    "AND purpose IN ('invite', 'reset')",
                    (now, login_id),
                )
            return _get(c, "l.id", login_id)

        row = await self.side.write(tx)
        return None if row is None else _login(row)

    # --- failed sign-ins -------------------------------------------------------------------------
    async def count_attempt(self, key: str, at: float, window_s: float, limit: int) -> list[float]:
        def tx(c: sqlite3.Connection) -> list[float]:  # BEGIN IMMEDIATE: one writer at a time
            c.execute("DELETE FROM login_failures WHERE at <= ?", (at - window_s,))  # every key's old ones
            times = [r[0] for r in c.execute("SELECT at FROM login_failures WHERE key = ? ORDER BY at", (key,))]
            if len(times) >= limit:
                return times
            c.execute("INSERT INTO login_failures (key, at) VALUES (?, ?)", (key, at))
            return []

        return await self.side.write(tx)

    async def clear_failures(self, key: str) -> None:
        await self.side.write(lambda c: c.execute("DELETE FROM login_failures WHERE key = ?", (key,)))
