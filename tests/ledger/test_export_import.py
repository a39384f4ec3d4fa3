"""`agentpay ledger export` / `import`: a SQLite ledger moves into PostgreSQL (and back) with every
row, id and value intact, `ledger verify` clean on both sides, and the target usable afterwards."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import Conflict, InvalidInput
from gateway.ledger.base import AccountKind, ExportRow, HoldRequest, developer_reference, operator_reference
from gateway.ledger.dump import read_dump, write_dump
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.sqlite import SqliteLedger
from tests.harness import agentpay_cli, write_config
from tests.ledger.conftest import FakeClock, StoreSpec, run_sync

AnyLedger = SqliteLedger | PostgresLedger
USERS = ("alice", "bob")
DEVELOPERS = ("acme", "rival")
KEY_HASHES = ("hash-alice-weather", "hash-alice-maps", "hash-bob-weather", "hash-bob-old")
TOKEN_HASHES = ("tokhash-acme", "tokhash-rival")


def req(call_id: str, amount: int, *, user: str = "alice", developer: str = "acme", **kw: Any) -> HoldRequest:
    fields: dict[str, Any] = {
        "key_id": None,
        "server": "weather",
        "method": "tools/call",
        "name": "forecast",
        "fee": amount // 10,
        "lease_s": 30.0,
        "owner": "export-test",
    }
    fields.update(kw)
    return HoldRequest(call_id=call_id, user=user, developer=developer, amount=amount, **fields)


async def populate(ledger: AnyLedger, clock: FakeClock) -> None:
    """Users, developers, keys, tokens, top-ups, holds in every state, one-step charges, refunds,
    payouts in every state: something of everything, at times that are not round numbers."""

    def tick() -> None:
        clock.advance(0.1 + 1 / 3)  # times with many significant digits: they must survive exactly

    for name in USERS:
        await ledger.create_user(name)
        tick()
    for name in DEVELOPERS:
        await ledger.create_developer(name)
        tick()
    await ledger.topup("alice", 1_000_000, reference="stripe-1")
    tick()
    await ledger.topup("bob", 250_000)
    tick()
    await ledger.topup("alice", 123_457)
    tick()
    k1 = await ledger.create_key(
        user="alice", server="weather", key_hash=KEY_HASHES[0], prefix="ap_a1", expires_at=None, spend_limit=None
    )
    tick()
    k2 = await ledger.create_key(
        user="alice",
        server="maps",
        key_hash=KEY_HASHES[1],
        prefix="ap_a2",
        expires_at=clock.now + 86_400.25,
        spend_limit=400_000,
    )
    tick()
    k3 = await ledger.create_key(
        user="bob", server="weather", key_hash=KEY_HASHES[2], prefix="ap_b1", expires_at=None, spend_limit=None
    )
    tick()
    k4 = await ledger.create_key(
        user="bob", server="weather", key_hash=KEY_HASHES[3], prefix="ap_b2", expires_at=None, spend_limit=10
    )
    tick()
    await ledger.revoke_key(k4.id)
    tick()
    await ledger.create_service_token(
        developer="acme", servers=["weather", "maps"], token_hash=TOKEN_HASHES[0], prefix="apst_a"
    )
    tick()
    token = await ledger.create_service_token(
        developer="rival", servers=["news"], token_hash=TOKEN_HASHES[1], prefix="apst_r"
    )
    await ledger.revoke_service_token(token.id)
    tick()

    # holds: captured (fully and partly), voided, pending (one lapsed, one live)
    for i in range(6):
        assert (await ledger.hold(req(f"cap-{i}", 5_000 + i, key_id=k1.id))).ok
        tick()
        await ledger.capture(f"cap-{i}", None if i % 2 else 4_000)
        tick()
    assert (await ledger.hold(req("maps-1", 7_777, key_id=k2.id, server="maps", name="route"))).ok
    await ledger.capture("maps-1")
    tick()
    assert (await ledger.hold(req("void-1", 3_000, key_id=k1.id))).ok
    await ledger.void("void-1")
    tick()
    assert (await ledger.hold(req("pending-1", 2_500, key_id=k1.id, lease_s=0.5))).ok
    tick()
    assert (await ledger.hold(req("pending-2", 9_999, user="bob", key_id=k3.id, lease_s=3600.0))).ok
    tick()
    # one-step charges (the service API), one to each developer
    assert (await ledger.charge(req("svc-1", 20_000, developer="acme", method="service", name="ocr"))).ok
    tick()
    svc2 = await ledger.charge(req("svc-2", 50_000, user="bob", developer="rival", method="service", name="llm"))
    assert svc2.charge is not None
    tick()
    # refunds: partial with a reference, then the rest; a full one
    await ledger.refund("ch_cap-1", 1_000, reference="refund-ref-1")
    tick()
    await ledger.refund("ch_cap-1")
    tick()
    await ledger.refund(svc2.charge.id, 12_345)
    tick()
    # payouts: settled, failed, pending
    p1 = await ledger.create_payout("acme", 3_000)
    tick()
    await ledger.settle_payout(p1.id, "bank-123")
    tick()
    p2 = await ledger.create_payout("acme", 2_000)
    tick()
    await ledger.fail_payout(p2.id)
    tick()
    await ledger.create_payout("rival", 1_111)
    tick()
    await ledger.create_payout("acme")  # everything left
    tick()
    assert await ledger.sweep() == 1  # pending-1's lease lapsed: voided by the sweeper
    tick()


async def snapshot(ledger: AnyLedger) -> dict[str, Any]:
    """Everything the ledger answers through its interface, as plain data."""
    out: dict[str, Any] = {}
    for name in USERS:
        out[f"user:{name}"] = asdict(await ledger.get_account(AccountKind.USER, name))
        out[f"summary:{name}"] = asdict(await ledger.user_summary(name, recent=100))
        out[f"charges:{name}"] = [asdict(c) for c in await ledger.list_charges(user=name, limit=1000)]
        out[f"usage:{name}"] = [asdict(u) for u in await ledger.usage(user=name)]
        out[f"keys:{name}"] = [asdict(k) for k in await ledger.list_keys(name)]
    for name in DEVELOPERS:
        out[f"developer:{name}"] = asdict(await ledger.get_account(AccountKind.DEVELOPER, name))
        out[f"statement:{name}"] = [asdict(line) for line in await ledger.statement(name, limit=1000)]
        out[f"earnings:{name}"] = asdict(await ledger.earnings(name))
        out[f"breakdown:{name}"] = [asdict(b) for b in await ledger.earnings_breakdown(name)]
        out[f"payouts:{name}"] = [asdict(p) for p in await ledger.list_payouts(name)]
        out[f"tokens:{name}"] = [asdict(t) for t in await ledger.list_service_tokens(name)]
    for kind in (AccountKind.WORLD, AccountKind.PLATFORM_FEE, AccountKind.PAYOUT_CLEARING):
        out[f"system:{kind.value}"] = asdict(await ledger.get_account(kind, "system"))
    for key_hash in KEY_HASHES:
        found = await ledger.find_key(key_hash)
        assert found is not None
        out[f"key:{key_hash}"] = asdict(found)
    for token_hash in TOKEN_HASHES:
        token = await ledger.find_service_token(token_hash)
        assert token is not None
        out[f"token:{token_hash}"] = asdict(token)
    for call_id in ("cap-0", "cap-1", "maps-1", "void-1", "pending-1", "pending-2", "svc-1", "svc-2"):
        out[f"hold:{call_id}"] = asdict(await ledger.get_hold(call_id))
    out["charges:all"] = [asdict(c) for c in await ledger.list_charges(limit=1000)]
    out["developers"] = sorted(await ledger.developer_names())
    return out


async def use_after_import(ledger: AnyLedger) -> None:
    """The imported ledger keeps working: new accounts, postings and charges get fresh ids."""
    await ledger.create_user("carol")
    await ledger.topup("carol", 10_000)
    assert (await ledger.hold(req("after-1", 4_000, user="carol"))).ok
    charge = await ledger.capture("after-1")
    assert charge.balance_after == 6_000
    before = (await ledger.get_account(AccountKind.USER, "alice")).balance
    replay = await ledger.topup("alice", 1_000_000, reference="stripe-1")  # an imported reference deduplicates
    assert replay.replayed
    assert (await ledger.get_account(AccountKind.USER, "alice")).balance == before
    assert (await ledger.list_charges(user="carol"))[0].id == "ch_after-1"
    assert await ledger.verify() == []


def through_file(rows: list[ExportRow], tmp_path: Path, source: str) -> list[ExportRow]:
    path = tmp_path / f"dump-{source}.jsonl"
    with path.open("w", encoding="utf-8") as out:
        counts = write_dump(rows, out, source=source)
    assert sum(counts.values()) == len(rows)
    with path.open(encoding="utf-8") as lines:
        return list(read_dump(lines))


@pytest.mark.parametrize(("source_kind", "target_kind"), [("sqlite", "postgres"), ("postgres", "sqlite")])
async def test_a_ledger_moves_between_stores_intact(tmp_path: Path, source_kind: str, target_kind: str) -> None:
    clock = FakeClock(1_700_000_000.123456)
    source_spec = StoreSpec.fresh(source_kind, tmp_path, "source")
    target_spec = StoreSpec.fresh(target_kind, tmp_path, "target")
    source, target = source_spec.open(clock), target_spec.open(clock)
    try:
        await source.open()
        await target.open()
        await populate(source, clock)
        assert await source.verify() == []
        exported = await source.export_rows()
        tables = {table for table, _ in exported}
        assert tables == {
            "accounts",
            "transfers",
            "postings",
            "keys",
            "holds",
            "charges",
            "service_tokens",
            "payouts",
        }
        states = {row["state"] for table, row in exported if table == "holds"}
        assert states == {"pending", "captured", "voided"}

        counts = await target.import_rows(through_file(exported, tmp_path, source_kind))
        assert sum(counts.values()) == len(exported)
        assert await target.verify() == []
        assert await source.verify() == []
        # the same rows, ids and values (floats bit for bit) on the other store
        assert await target.export_rows() == exported
        assert await snapshot(target) == await snapshot(source)

        # an import never lands on a ledger that already has data: nothing changes
        before = await target.export_rows()
        with pytest.raises(Conflict, match="not empty"):
            await target.import_rows(exported)
        assert await target.export_rows() == before

        await use_after_import(target)
    finally:
        await source.close()
        await target.close()
        await source_spec.drop()
        await target_spec.drop()


def dump_text(rows: list[ExportRow]) -> list[str]:
    out = io.StringIO()
    write_dump(rows, out, source="test")
    return out.getvalue().splitlines(keepends=True)


async def test_a_broken_dump_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    clock = FakeClock()
    spec = StoreSpec.fresh("sqlite", tmp_path, "source")
    async with spec.open(clock) as source:
        await source.create_user("alice")
        await source.topup("alice", 5_000)
        lines = dump_text(await source.export_rows())
    with pytest.raises(InvalidInput, match="truncated"):
        list(read_dump(lines[:-1]))
    with pytest.raises(InvalidInput, match="not an AgentPay ledger dump"):
        list(read_dump(lines[1:]))
    tampered = [line.replace('"balance": 5000', '"balance": 5000.5') for line in lines]
    with pytest.raises(InvalidInput, match=r"accounts\.balance must be of type int"):
        list(read_dump(tampered))
    reordered = [lines[0], *reversed(lines[1:-1]), lines[-1]]
    with pytest.raises(InvalidInput, match="out of order"):
        list(read_dump(reordered))

    # rows that do not fit the schema (a posting on a missing account) roll back the whole import
    rows = list(read_dump(lines))
    bad = [*rows, ("postings", {"id": 99, "transfer_id": "tr_missing", "account_id": 4242, "amount": 1})]
    for kind in ("sqlite", "postgres"):
        target_spec = StoreSpec.fresh(kind, tmp_path, "bad-target")
        try:
            async with target_spec.open(clock) as target:
                with pytest.raises(InvalidInput, match="not fit"):
                    await target.import_rows(bad)
                assert [table for table, _ in await target.export_rows()] == ["accounts"] * 3  # system only
                await target.import_rows(rows)  # the failed attempt left nothing behind
                assert await target.get_account(AccountKind.USER, "alice") == await _alice(spec, clock)
                assert await target.verify() == []
        finally:
            await target_spec.drop()


@pytest.mark.parametrize("target_kind", ["sqlite", "postgres"])
async def test_a_dump_written_before_refund_namespaces_imports_with_each_refund_key_in_its_actors_namespace(
    tmp_path: Path, target_kind: str
) -> None:
    """A version 1 dump (before migration 0006) holds refund references as the service API ("<developer>:<key>")
    and the operator (the bare key) wrote them: the import namespaces them as the migration does."""
    clock = FakeClock()
    spec = StoreSpec.fresh("sqlite", tmp_path, "source")
    async with spec.open(clock) as source:
        await source.create_user("alice")
        await source.create_developer("acme")
        await source.topup("alice", 10_000)
        charge = (await source.charge(req("c-1", 1_000))).charge
        assert charge is not None
        by_developer = await source.refund(charge.id, 100, reference="acme:k1")  # as the previous version stored it
        by_operator = await source.refund(charge.id, 200, reference="k2")
        lines = dump_text(await source.export_rows())
    header = json.loads(lines[0])
    assert header["version"] == 4
    lines[0] = json.dumps({**header, "version": 1}) + "\n"

    target_spec = StoreSpec.fresh(target_kind, tmp_path, "target")
    try:
        async with target_spec.open(clock) as target:
            await target.import_rows(read_dump(lines))
            references = {
                row["id"]: row["reference"] for table, row in await target.export_rows() if table == "transfers"
            }
            assert references[by_developer.id] == developer_reference("acme", "k1") == "dev:acme:k1"
            assert references[by_operator.id] == operator_reference("k2") == "admin:k2"
            assert (await target.refund(charge.id, 100, reference=developer_reference("acme", "k1"))).replayed
            assert (await target.refund(charge.id, 200, reference=operator_reference("k2"))).replayed
            assert await target.verify() == []
    finally:
        await target_spec.drop()


async def _alice(spec: StoreSpec, clock: FakeClock) -> Any:
    async with spec.open(clock) as ledger:
        return await ledger.get_account(AccountKind.USER, "alice")


def test_the_cli_exports_sqlite_and_imports_into_postgres_and_back(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})
    clock = FakeClock(1_700_000_000.5)
    sqlite_spec = StoreSpec("sqlite", str(tmp_path / "ledger.db"))  # the configured database
    pg_spec = StoreSpec.fresh("postgres", tmp_path)
    back_spec = StoreSpec.fresh("sqlite", tmp_path, "back")
    pg_url = f"{pg_spec.location}?schema={pg_spec.schema}"

    async def fill() -> dict[str, Any]:
        async with sqlite_spec.open(clock) as ledger:
            await populate(ledger, clock)
            return await snapshot(ledger)

    try:
        expected = run_sync(fill())
        dump = tmp_path / "ledger.jsonl"
        done = agentpay_cli(config, "ledger", "export", str(dump), "--json")
        assert done.returncode == 0, done.stderr
        exported = json.loads(done.stdout)
        assert exported["rows"]["charges"] == 9 and exported["rows"]["payouts"] == 4
        assert not (tmp_path / "ledger.jsonl.partial").exists()

        done = agentpay_cli(config, "ledger", "import", str(dump), "--into", pg_url, "--json")
        assert done.returncode == 0, done.stderr
        imported = json.loads(done.stdout)
        assert imported["ok"] is True and imported["problems"] == []
        assert imported["rows"] == exported["rows"]

        async def check(spec: StoreSpec) -> dict[str, Any]:
            async with spec.open(clock) as ledger:
                assert await ledger.verify() == []
                return await snapshot(ledger)

        assert run_sync(check(pg_spec)) == expected

        # a second import into the same (now full) target is refused with a clear message
        done = agentpay_cli(config, "ledger", "import", str(dump), "--into", pg_url)
        assert done.returncode == 1
        assert "not empty" in done.stderr and "Traceback" not in done.stderr

        # PostgreSQL -> SQLite through the CLI: export with --config pointing at PostgreSQL
        (tmp_path / "pg").mkdir()
        pg_config = write_config(tmp_path / "pg", {"weather": "http://127.0.0.1:9/mcp"}, database=pg_url)
        dump2 = tmp_path / "from-pg.jsonl"
        done = agentpay_cli(pg_config, "ledger", "export", str(dump2))
        assert done.returncode == 0, done.stderr
        assert "exported" in done.stdout
        done = agentpay_cli(config, "ledger", "import", str(dump2), "--into", f"sqlite:///{back_spec.location}")
        assert done.returncode == 0, done.stderr
        assert "ledger verify: ok" in done.stdout
        assert run_sync(check(back_spec)) == expected
        assert dump.read_text().splitlines()[1:] == dump2.read_text().splitlines()[1:]  # same rows, byte for byte

        # a missing file is one line of error, not a traceback
        done = agentpay_cli(config, "ledger", "import", str(tmp_path / "nope.jsonl"), "--into", pg_url)
        assert done.returncode == 1 and "cannot read the dump" in done.stderr
    finally:
        run_sync(pg_spec.drop())
