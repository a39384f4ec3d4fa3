"""Moving a gateway to another store carries more than the money (``gateway.ops.moves``): the logins,
OAuth clients, grants and tokens, and the payment provider's records go with the ledger through
`agentpay ledger export` / `import`, so people can still sign in, connected clients keep working,
and a card refund still finds the top-up it claws back."""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from gateway.keys import display_prefix, generate_secret, hash_secret
from gateway.logins.models import Login
from gateway.logins.passwords import Passwords
from gateway.logins.store import open_login_store
from gateway.oauth.models import Client, Grant
from gateway.oauth.store import open_store
from gateway.payments.store import PaymentsStore
from tests.harness import agentpay_cli, write_config
from tests.ledger.conftest import FakeClock, StoreSpec, run_sync
from tests.logins.conftest import cheap_passwords, database_url

T0 = 1_700_000_000.25
PASSWORD = "correct horse battery staple"
_Store = TypeVar("_Store", bound=Any)


@asynccontextmanager
async def opened(store: _Store) -> AsyncIterator[_Store]:
    """``store`` opened for the block, closed after (any of the concerns' stores)."""
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextmanager
def passwords() -> Iterator[Passwords]:
    hasher = cheap_passwords()
    try:
        yield hasher
    finally:
        hasher.close()


async def fill(spec: StoreSpec) -> str:
    """A user with a login, an OAuth grant paying with her key, tokens, a Stripe customer, a
    credited top-up, a notice and a handled webhook event; returns the key's id."""
    url = database_url(spec)
    async with spec.open(FakeClock(T0)) as ledger:
        await ledger.create_user("alice@example.com")
        await ledger.topup("alice@example.com", 500_000, reference="stripe:checkout:cs_1")
        secret = generate_secret()
        key = await ledger.create_key(
            user="alice@example.com",
            server="weather",
            key_hash=hash_secret(secret),
            prefix=display_prefix(secret),
            expires_at=None,
            spend_limit=None,
        )
    async with opened(open_login_store(url)) as logins:
        login = Login("lgn_1", "alice@example.com", "alice@example.com", None, True, False, True, T0, T0 + 1.5)
        with passwords() as hasher:
            await logins.insert_login(login, await hasher.hash(PASSWORD))
    async with opened(open_store(url)) as oauth:
        await oauth.save_client(Client("cl_1", "Claude", ("https://claude.ai/cb",), "none", "dcr", T0 + 2.125))
        grant = Grant(
            "gnt_1", "cl_1", "Claude", "alice@example.com", "lgn_1", "weather", "http://127.0.0.1/weather/mcp",
            "mcp", key.id, "hash-of-nothing", "ap_x", None, T0 + 3.0, None,
        )  # fmt: skip
        await oauth.save_grant(grant)
        await oauth.save_tokens(
            grant_id="gnt_1",
            client_id="cl_1",
            access_hash="at-hash",
            access_expires_at=T0 + 3600,
            refresh_hash="rt-hash",
            refresh_expires_at=T0 + 86_400,
        )
    async with opened(PaymentsStore.for_database(url, clock=FakeClock(T0))) as payments:
        await payments.remember_customer("alice@example.com", "cus_1")
        await payments.create_topup("tu_1", "alice@example.com", "checkout", 5_00, "usd")
        await payments.session_created("tu_1", "cs_1", "https://checkout.stripe.com/c/cs_1")
        await payments.link_payment_intent("tu_1", "pi_1")
        await payments.add_notice("alice@example.com", "topup", "5.00 USD added")
        await payments.log_event("checkout", "evt_1", "checkout.session.completed", "credited")
    return key.id


async def check_moved(spec: StoreSpec, key_id: str) -> None:
    """What the moved gateway must still find, through each concern's own store."""
    url = database_url(spec)
    async with opened(open_login_store(url)) as logins:
        row = await logins.login_by_email("alice@example.com")
        assert row is not None and row.login.verified and row.login.user == "alice@example.com"
        with passwords() as hasher:
            assert (await hasher.verify(row.password_hash, PASSWORD))[0]  # she signs in with her password
    async with opened(open_store(url)) as oauth:
        client = await oauth.get_client("cl_1")
        assert client is not None and client.redirect_uris == ("https://claude.ai/cb",)
        grant = await oauth.get_grant("gnt_1")
        assert grant is not None and grant.key_id == key_id and grant.created_at == T0 + 3.0
        assert await oauth.find_access_token("at-hash") is not None
        assert await oauth.find_refresh("rt-hash") is not None
    async with opened(PaymentsStore.for_database(url, clock=FakeClock(T0 + 10))) as payments:
        assert await payments.customer("alice@example.com") == ("cus_1", None)
        topup = await payments.topup_by(payment_intent="pi_1")
        assert topup is not None and topup.id == "tu_1" and topup.user == "alice@example.com"
        await payments.add_notice("alice@example.com", "topup", "a notice written after the move")
        notices = await payments.notices("alice@example.com")
        assert sorted(n.message for n in notices) == ["5.00 USD added", "a notice written after the move"]
        assert len({n.id for n in notices}) == 2  # the new notice did not reuse the carried one's id


def test_a_move_from_sqlite_to_postgresql_and_back_carries_logins_oauth_and_payment_records(tmp_path: Path) -> None:
    sqlite_spec = StoreSpec("sqlite", str(tmp_path / "ledger.db"))
    config = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})
    pg_spec = StoreSpec.fresh("postgres", tmp_path)
    back_spec = StoreSpec.fresh("sqlite", tmp_path, "back")
    try:
        key_id = run_sync(fill(sqlite_spec))
        dump = tmp_path / "move.jsonl"
        done = agentpay_cli(config, "ledger", "export", str(dump), "--json")
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)["rows"]
        assert rows["logins"] == 1 and rows["oauth_grants"] == 1 and rows["oauth_refresh_tokens"] == 1
        assert rows["stripe_topups"] == 1 and rows["stripe_events"] == 1 and rows["stripe_notices"] == 1

        done = agentpay_cli(config, "ledger", "import", str(dump), "--into", database_url(pg_spec), "--json")
        assert done.returncode == 0, done.stderr
        imported = json.loads(done.stdout)
        assert imported["ok"] is True and imported["rows"] == rows
        run_sync(check_moved(pg_spec, key_id))

        (tmp_path / "pg").mkdir()
        pg_config = write_config(tmp_path / "pg", {"weather": "http://127.0.0.1:9/mcp"}, database=database_url(pg_spec))
        back = tmp_path / "back.jsonl"
        done = agentpay_cli(pg_config, "ledger", "export", str(back))
        assert done.returncode == 0, done.stderr
        done = agentpay_cli(config, "ledger", "import", str(back), "--into", database_url(back_spec))
        assert done.returncode == 0, done.stderr
        # the PostgreSQL side wrote one more notice (check_moved); everything else is the same bytes
        first = [ln for ln in dump.read_text().splitlines()[1:] if '"stripe_notices"' not in ln]
        second = [ln for ln in back.read_text().splitlines()[1:] if '"stripe_notices"' not in ln]
        assert first[:-1] == second[:-1]
    finally:
        run_sync(pg_spec.drop())


def test_a_dump_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})
    run_sync(fill(StoreSpec("sqlite", str(tmp_path / "ledger.db"))))
    dump = tmp_path / "secret.jsonl"
    done = agentpay_cli(config, "ledger", "export", str(dump))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600  # it holds password and token hashes


def test_an_import_into_a_target_whose_logins_exist_is_refused_before_the_ledger_is_written(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})
    run_sync(fill(StoreSpec("sqlite", str(tmp_path / "ledger.db"))))
    dump = tmp_path / "move.jsonl"
    assert agentpay_cli(config, "ledger", "export", str(dump)).returncode == 0
    target = StoreSpec.fresh("sqlite", tmp_path, "target")

    async def a_login_only() -> None:
        async with opened(open_login_store(database_url(target))) as logins:
            bob = Login("lgn_9", "bob@example.com", None, None, False, False, False, T0, None)
            await logins.insert_login(bob, None)

    async def ledger_rows() -> int:
        async with target.open() as ledger:
            return len(await ledger.export_rows())

    run_sync(a_login_only())
    empty = run_sync(ledger_rows())
    done = agentpay_cli(config, "ledger", "import", str(dump), "--into", database_url(target))
    assert done.returncode == 1
    assert "not empty" in done.stderr and "logins" in done.stderr and "Traceback" not in done.stderr
    assert run_sync(ledger_rows()) == empty  # nothing of the ledger was written


def test_a_dump_whose_carried_row_was_edited_to_a_wrong_type_is_refused_naming_its_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})
    run_sync(fill(StoreSpec("sqlite", str(tmp_path / "ledger.db"))))
    dump = tmp_path / "move.jsonl"
    assert agentpay_cli(config, "ledger", "export", str(dump)).returncode == 0
    lines = dump.read_text().splitlines()
    number = next(i for i, ln in enumerate(lines) if '"table": "logins"' in ln)
    item = json.loads(lines[number])
    item["row"]["verified"] = "yes"
    lines[number] = json.dumps(item)
    dump.write_text("\n".join(lines) + "\n")
    target = StoreSpec.fresh("sqlite", tmp_path, "target")
    done = agentpay_cli(config, "ledger", "import", str(dump), "--into", database_url(target))
    assert done.returncode == 1
    assert f"line {number + 1}" in done.stderr and "logins.verified must be of type bool" in done.stderr
    assert not Path(target.location).exists()  # refused before the target was touched


def test_exporting_a_ledger_that_no_portal_ever_opened_adds_no_tables_to_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})
    spec = StoreSpec("sqlite", str(tmp_path / "ledger.db"))

    async def only_a_ledger() -> None:
        async with spec.open() as ledger:
            await ledger.create_user("bob")

    def tables() -> list[str]:
        with sqlite3.connect(spec.location) as conn:
            return sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'"))

    run_sync(only_a_ledger())
    before = tables()
    done = agentpay_cli(config, "ledger", "export", str(tmp_path / "d.jsonl"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"]["logins"] == 0
    assert tables() == before and "logins" not in before
