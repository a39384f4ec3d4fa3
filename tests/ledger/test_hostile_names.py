"""Text that means something to SQL (quotes, comment and statement terminators, LIKE wildcards,
backslashes, NUL-free Unicode) goes into the ledger as data on both stores: stored and read back
exactly, matching only itself, and every table still there afterwards."""

from __future__ import annotations

import pytest

from gateway.errors import NotFound
from gateway.keys import hash_secret
from gateway.ledger.base import AccountKind, HoldRequest
from gateway.ledger.interfaces import Ledger

HOSTILE = (
    "x'); DROP TABLE accounts;--",
    'robert"; DELETE FROM postings; --',
    "50%_off\\",
    "' OR '1'='1",
    "名前 ☃ ﷽",
    "$1 $$ :name ? %s {}",
)


@pytest.mark.parametrize("name", HOSTILE)
async def test_a_name_full_of_sql_is_stored_and_found_as_itself_only(ledger: Ledger, name: str) -> None:
    await ledger.create_user(name)
    await ledger.create_developer(name)
    await ledger.topup(name, 10_000, reference=f"ref {name}")
    replay = await ledger.topup(name, 10_000, reference=f"ref {name}")
    assert replay.replayed  # the reference matched itself, byte for byte

    key = await ledger.create_key(
        user=name,
        server=name,
        key_hash=hash_secret(name),
        prefix=name[:8],
        expires_at=None,
        spend_limit=None,
        name=name,
    )
    result = await ledger.charge(
        HoldRequest(f"call {name}", key.id, name, name, name, "tools/call", name, 1_000, 100, 30.0, name)
    )
    assert result.charge is not None
    refund = await ledger.refund(result.charge.id, 500, reference=name)
    assert (await ledger.refund(result.charge.id, 500, reference=name)).id == refund.id

    account = await ledger.get_account(AccountKind.USER, name)
    assert account.name == name and account.balance == 10_000 - 1_000 + 500
    (stored,) = await ledger.list_keys(name)
    assert (stored.name, stored.server, stored.user) == (name, name, name)
    assert (await ledger.find_key(hash_secret(name))) is not None
    (charge,) = await ledger.list_charges(user=name)
    assert (charge.server, charge.name) == (name, name)

    # a wildcard or a quote never matches another account, and the other tables are all still there
    with pytest.raises(NotFound):
        await ledger.get_account(AccountKind.USER, name + "%")
    assert (await ledger.get_account(AccountKind.USER, "alice")).balance == 0
    assert await ledger.verify() == []
