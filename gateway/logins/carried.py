"""What a move to another store (``agentpay ledger export`` / ``import``) carries of the logins: each
login (e-mail, password hash, its user or developer, verified, disabled). Web sessions, sign-in and
reset links and failed sign-ins stay behind: after a move everyone signs in again."""

from __future__ import annotations

from gateway.logins.postgres import POSTGRES_MIGRATIONS
from gateway.logins.sqlite import SQLITE_MIGRATIONS
from gateway.storage.carry import Carried, CarriedTable

CARRIED = Carried(
    concern="logins",
    sqlite_migrations=SQLITE_MIGRATIONS,
    postgres_migrations=POSTGRES_MIGRATIONS,
    tables=(
        CarriedTable(
            "logins",
            (
                ("id", "text"),
                ("email", "text"),
                ("user_name", "text"),
                ("developer_name", "text"),
                ("password_hash", "text"),
                ("verified", "bool"),
                ("disabled_at", "float"),
                ("created_at", "float"),
                ("last_login_at", "float"),
            ),
            order_by=("id",),
        ),
    ),
)
