"""Keys' names and last use (migration 0010), on both stores: a name round-trips through every read,
a bad one is refused, ``touch_keys`` only ever moves a key's last use forward, the migration applies
to a database that already holds keys, and a dump carries both columns."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from gateway.errors import InvalidInput
from gateway.ledger.base import KEY_NAME_MAX
from gateway.ledger.dump import read_dump, write_dump
from gateway.ledger.interfaces import Ledger

from .conftest import STORES, FakeClock, StoreSpec

MIGRATION = "0009_key_names_and_last_use"


async def _key(ledger: Ledger, key_hash: str, name: str | None = None) -> str:
    record = await ledger.create_key(
        user="alice",
        server="weather",
        key_hash=key_hash,
        prefix="ap_" + key_hash.ljust(8, "0"),
        expires_at=None,
        spend_limit=None,
        name=name,
    )
    return record.id


async def test_a_key_name_is_stored_and_read_back_by_every_read_of_keys(ledger: Ledger, clock: FakeClock) -> None:
    name = "Laptop — café ☕ <b>&'\""
    named = await ledger.create_key(
        user="alice", server="weather", key_hash="h1", prefix="ap_h1", expires_at=None, spend_limit=None, name=name
    )
    clock.advance(1)  # listed by creation time
    unnamed = await ledger.create_key(
        user="alice", server="weather", key_hash="h2", prefix="ap_h2", expires_at=None, spend_limit=None
    )
    assert named.name == name and unnamed.name is None
    assert named.last_used_at is None and unnamed.last_used_at is None
    found = await ledger.find_key("h1")
    assert found is not None and found.name == name
    assert [k.name for k in await ledger.list_keys("alice")] == [name, None]
    assert [k.name for k in (await ledger.user_summary("alice")).keys] == [name, None]
    assert (await ledger.revoke_key(named.id)).name == name


async def test_a_key_name_of_the_longest_length_is_kept_whole(ledger: Ledger) -> None:
    key_id = await _key(ledger, "h1", "n" * KEY_NAME_MAX)
    (record,) = await ledger.list_keys("alice")
    assert record.id == key_id and record.name == "n" * KEY_NAME_MAX


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "n" * (KEY_NAME_MAX + 1),
        "two\nlines",
        "tab\there",
        "\x1b[31mred",  # a terminal escape
        "evil\u202etxt.exe",  # a right-to-left override
        "zero\u200bwidth",
        "nul\x00",
    ],
)
async def test_a_key_name_that_is_empty_too_long_or_unprintable_is_refused_and_no_key_is_made(
    ledger: Ledger, bad: str
) -> None:
    with pytest.raises(InvalidInput, match="key name"):
        await _key(ledger, "h1", bad)
    assert await ledger.list_keys() == []


async def test_touch_keys_sets_each_keys_last_use_and_ignores_unknown_ids(ledger: Ledger) -> None:
    first, second = await _key(ledger, "h1"), await _key(ledger, "h2")
    await ledger.touch_keys({first: 1_700_000_100.5, second: 1_700_000_200.25, "key_unknown": 1_700_000_300.0})
    used = {k.id: k.last_used_at for k in await ledger.list_keys()}
    assert used == {first: 1_700_000_100.5, second: 1_700_000_200.25}
    await ledger.touch_keys({})  # nothing to write


async def test_an_older_last_use_never_overwrites_a_newer_one(ledger: Ledger) -> None:
    key_id = await _key(ledger, "h1")
    await ledger.touch_keys({key_id: 1_700_000_500.0})
    await ledger.touch_keys({key_id: 1_700_000_400.0})  # another process's late flush
    found = await ledger.find_key("h1")
    assert found is not None and found.last_used_at == 1_700_000_500.0
    await ledger.touch_keys({key_id: 1_700_000_600.0})
    found = await ledger.find_key("h1")
    assert found is not None and found.last_used_at == 1_700_000_600.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "yesterday", True])
async def test_touch_keys_refuses_a_time_that_is_not_unix_seconds(ledger: Ledger, bad: object) -> None:
    key_id = await _key(ledger, "h1")
    with pytest.raises(InvalidInput, match="unix seconds"):
        await ledger.touch_keys({key_id: bad})  # type: ignore[dict-item]
    found = await ledger.find_key("h1")
    assert found is not None and found.last_used_at is None


async def test_the_migration_adds_both_columns_to_a_database_that_already_holds_keys(
    store: StoreSpec, clock: FakeClock
) -> None:
    async with store.open(clock) as ledger:
        await ledger.create_user("alice")
        await ledger.create_developer("acme")
        old_key = await _key(ledger, "h1")
    # the keys table as it was before 0010 (the columns gone, the migration not recorded)
    await store.execute("ALTER TABLE keys DROP COLUMN name")
    await store.execute("ALTER TABLE keys DROP COLUMN last_used_at")
    await store.execute("DELETE FROM schema_migrations WHERE name = ?", MIGRATION)

    async with store.open(clock) as ledger:  # applies 0010 to that table
        assert MIGRATION in await ledger.applied_migrations()
        (record,) = await ledger.list_keys("alice")
        assert record.id == old_key and record.name is None and record.last_used_at is None
        await ledger.touch_keys({old_key: 1_700_000_100.0})
        new_key = await _key(ledger, "h2", "named after the upgrade")
        assert {k.id: (k.name, k.last_used_at) for k in await ledger.list_keys("alice")} == {
            old_key: (None, 1_700_000_100.0),
            new_key: ("named after the upgrade", None),
        }
        assert await ledger.verify() == []


async def test_the_database_refuses_a_key_name_over_the_limit_written_around_the_ledger(
    ledger: Ledger, store: StoreSpec
) -> None:
    key_id = await _key(ledger, "h1")
    with pytest.raises((sqlite3.IntegrityError, asyncpg.CheckViolationError), match=r"(?i)check"):
        await store.execute("UPDATE keys SET name = ? WHERE id = ?", "n" * (KEY_NAME_MAX + 1), key_id)


@pytest.mark.parametrize("target_kind", STORES)
async def test_a_dump_carries_key_names_and_last_uses_and_an_older_dump_imports_them_as_null(
    tmp_path: Path, target_kind: str
) -> None:
    clock = FakeClock()
    source_spec = StoreSpec.fresh("sqlite", tmp_path, "source")
    async with source_spec.open(clock) as source:
        await source.create_user("alice")
        await source.create_developer("acme")
        named = await _key(source, "h1", "CI runner ☕")
        await source.touch_keys({named: 1_700_000_123.456789})
        out = io.StringIO()
        write_dump(await source.export_rows(), out, source="sqlite")
    lines = out.getvalue().splitlines(keepends=True)
    assert json.loads(lines[0])["version"] == 4

    # a version 2 dump: written before 0010, its keys have neither column
    older = [json.dumps({**json.loads(lines[0]), "version": 2}) + "\n"]
    for line in lines[1:]:
        item = json.loads(line)
        if item.get("table") == "keys":
            item["row"] = {k: v for k, v in item["row"].items() if k not in ("name", "last_used_at")}
        older.append(json.dumps(item) + "\n")

    for dump, expected in ((lines, ("CI runner ☕", 1_700_000_123.456789)), (older, (None, None))):
        target_spec = StoreSpec.fresh(target_kind, tmp_path, f"target{len(expected[0] or '')}")
        try:
            async with target_spec.open(clock) as target:
                await target.import_rows(read_dump(dump))
                (record,) = await target.list_keys("alice")
                assert (record.name, record.last_used_at) == expected
                assert await target.verify() == []
        finally:
            await target_spec.drop()


async def test_replicas_flushing_the_same_keys_at_once_in_any_order_keep_the_newest_time(
    ledger: Ledger, store: StoreSpec, clock: FakeClock
) -> None:
    ids = [await _key(ledger, f"h{i}") for i in range(8)]
    replica = store.open(clock)
    await replica.open()
    try:
        flushes = []
        for round_ in range(10):
            # each replica saw every key; one lists them forwards, the other backwards
            forwards = {key_id: 1_700_000_000.0 + round_ * 10 + i for i, key_id in enumerate(ids)}
            backwards = {key_id: 1_700_000_000.0 + round_ * 10 + 5 - i for i, key_id in reversed(list(enumerate(ids)))}
            flushes += [ledger.touch_keys(forwards), replica.touch_keys(backwards)]
        await asyncio.gather(*flushes)
    finally:
        await replica.close()
    last = {k.id: k.last_used_at for k in await ledger.list_keys()}
    assert last == {key_id: 1_700_000_090.0 + max(i, 5 - i) for i, key_id in enumerate(ids)}
