"""What a move to another store (``agentpay ledger export`` / ``import``) carries of the payment
provider's records: every table. Without them a moved gateway would not know which Stripe customer
pays for which user (automatic recharge), which top-up a card refund or dispute claws back, which
connected account a developer is paid to, or which webhook events it has already handled."""

from __future__ import annotations

from gateway.payments.schema import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from gateway.storage.carry import Carried, CarriedTable, Kind

_UPDATED: tuple[str, Kind] = ("updated_at", "float")

CARRIED = Carried(
    concern="payments",
    sqlite_migrations=SQLITE_MIGRATIONS,
    postgres_migrations=POSTGRES_MIGRATIONS,
    tables=(
        CarriedTable(
            "stripe_customers",
            (("user_name", "text"), ("customer_id", "text"), ("payment_method", "text"), ("created_at", "float")),
            order_by=("user_name",),
        ),
        CarriedTable(
            "stripe_topups",
            (
                ("id", "text"),
                ("user_name", "text"),
                ("kind", "text"),
                ("amount_cents", "int"),
                ("currency", "text"),
                ("state", "text"),
                ("session_id", "text"),
                ("payment_intent", "text"),
                ("url", "text"),
                ("refunded_cents", "int"),
                ("detail", "text"),
                ("created_at", "float"),
                _UPDATED,
            ),
            order_by=("id",),
        ),
        CarriedTable(
            "stripe_recharge",
            (
                ("user_name", "text"),
                ("enabled", "int"),
                ("threshold_cents", "int"),
                ("amount_cents", "int"),
                ("monthly_cap_cents", "int"),
                ("paused_reason", "text"),
                ("failures", "int"),
                ("inflight", "text"),
                _UPDATED,
            ),
            order_by=("user_name",),
        ),
        CarriedTable(
            "stripe_alerts",
            (("user_name", "text"), ("threshold_cents", "int"), ("armed", "int"), _UPDATED),
            order_by=("user_name",),
        ),
        CarriedTable(
            "stripe_notices",
            (("id", "int"), ("user_name", "text"), ("kind", "text"), ("message", "text"), ("created_at", "float")),
            order_by=("id",),
            identity=True,
        ),
        CarriedTable(
            "stripe_accounts",
            (("developer", "text"), ("account_id", "text"), ("payouts_enabled", "int"), _UPDATED),
            order_by=("developer",),
        ),
        CarriedTable(
            "stripe_payouts",
            (
                ("payout_id", "text"),
                ("developer", "text"),
                ("account_id", "text"),
                ("amount_cents", "int"),
                ("transfer_id", "text"),
                ("state", "text"),
                ("detail", "text"),
                ("created_at", "float"),
                _UPDATED,
            ),
            order_by=("payout_id",),
        ),
        CarriedTable(
            "stripe_events",
            (
                ("handler", "text"),
                ("event_id", "text"),
                ("type", "text"),
                ("outcome", "text"),
                ("received_at", "float"),
            ),
            order_by=("handler", "event_id"),
        ),
    ),
)
