"""What the modules of the PostgreSQL ledger share: the connection and row types, the system
accounts' name, the column lists several concerns select, the database errors the machinery sorts
(connection lost, retryable, timed out), the exceptions raised inside a transaction to steer it
(``_Rollback``, ``_RaceLost``, ``_WouldGoNegative``), and the operations a group-commit batch
carries (``_HoldOp``, ``_CaptureOp``, ``_VoidOp``, ``_RenewOp``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import asyncpg

from gateway.ledger.base import AccountKind, HoldRequest

T = TypeVar("T")
Conn: TypeAlias = "asyncpg.Connection[Any]"
Row: TypeAlias = asyncpg.Record

SYSTEM_NAME = "system"
_SYSTEM_KINDS = (AccountKind.WORLD, AccountKind.PLATFORM_FEE, AccountKind.PAYOUT_CLEARING)

_KEY_COLUMNS = """
    k.id, a.name, k.server, k.prefix, k.created_at, k.expires_at, k.revoked_at,
    k.spend_limit, k.spent, k.held, k.name, k.last_used_at
    FROM keys k JOIN accounts a ON a.id = k.user_account_id
"""
_CHARGE_COLUMNS = """
    c.id, c.call_id, u.name, d.name, h.server, h.method, h.name, c.amount, c.fee, c.refunded,
    c.created_at, c.balance_after
    FROM charges c
    JOIN holds h ON h.call_id = c.call_id
    JOIN accounts u ON u.id = c.user_account_id
    JOIN accounts d ON d.id = c.developer_account_id
"""

# A new hold's HoldRequest fields, in the order the batch statement (``batch_tx._LOCK_BATCH``) and the
# lone hold function (``lone._LONE_HOLD``) take them.
_HOLD_FIELDS = ("call_id", "key_id", "user", "developer", "server", "method", "name", "amount", "fee", "owner")

# The connection is gone or the server refuses work: the outcome of an in-flight COMMIT is unknown.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08, including ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # 57: admin shutdown (pg_terminate_backend), cancel
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing"
    asyncpg.exceptions.InternalClientError,  # e.g. "cannot switch to state 15" releasing a killed connection
    OSError,
    TimeoutError,
)
_RETRYABLE = (asyncpg.exceptions.SerializationError, asyncpg.exceptions.DeadlockDetectedError)
# The server gave up waiting (lock_timeout, statement_timeout) and rolled the transaction back.
_TIMED_OUT = (asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.QueryCanceledError)


class _Rollback(Exception):
    """Raised inside a transaction to roll it back and still return ``result``."""

    def __init__(self, result: object) -> None:
        super().__init__("rollback")
        self.result = result


class _RaceLost(Exception):
    """A concurrent transaction committed the same idempotency key first: roll back and re-run
    (the re-run reads the winner)."""


class _WouldGoNegative(Exception):
    def __init__(self, account_id: int) -> None:
        super().__init__(f"account {account_id} would go negative")
        self.account_id = account_id


# --- group commit: the operations a batch carries ------------------------------------------------
@dataclass(eq=False, slots=True)
class _HoldOp:
    req: HoldRequest
    future: asyncio.Future[Any]


@dataclass(eq=False, slots=True)
class _CaptureOp:
    call_id: str
    amount: int | None
    future: asyncio.Future[Any]


@dataclass(eq=False, slots=True)
class _VoidOp:
    call_id: str
    future: asyncio.Future[Any]


@dataclass(eq=False, slots=True)
class _RenewOp:
    call_ids: tuple[str, ...]
    lease_s: float
    future: asyncio.Future[Any]


_Op: TypeAlias = _HoldOp | _CaptureOp | _VoidOp | _RenewOp


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
