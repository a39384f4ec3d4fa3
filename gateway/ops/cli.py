"""The operator CLI: `agentpay [--config PATH] COMMAND ... [--json]`.

Every command is a thin wrapper over ``gateway.api.operations``; errors are one line and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from gateway import logs
from gateway.api.operations import Operations, iso
from gateway.config import GatewayConfig, load_config
from gateway.errors import GatewayError
from gateway.ledger import open_ledger, redact_url
from gateway.ledger.base import ExportRow
from gateway.ledger.dump import read_dump, write_dump
from gateway.logins import Login
from gateway.ops import payments_cli
from gateway.ops.moves import CONCERNS, carried_columns, check_carried_empty, export_carried, import_carried

DEFAULT_CONFIG = "config/gateway.yaml"


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--config",
        default=default,
        help=f"gateway config file (default: $AGENTPAY_CONFIG, else ./{DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--json", action="store_true", default=False if top else argparse.SUPPRESS, help="print one JSON document"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentpay", description="AgentPay: the payments gateway for MCP servers")
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, parent: Any = commands) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        _common(sub, top=False)
        return sub

    serve = command("serve", "run the gateway")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N gateway processes sharing the port (SO_REUSEPORT); about one per core",
    )
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set on each worker
    demo = command("demo", "run the gateway in front of a built-in demo MCP server, with a ready user and key")
    demo.add_argument("--upstream-port", type=int, default=9000)
    command("check-config", "validate the config and price table; exit non-zero on any problem")

    developers = command("developers", "developer accounts").add_subparsers(dest="action", required=True)
    command("create", "create a developer account", developers).add_argument("name")

    users = command("users", "user accounts").add_subparsers(dest="action", required=True)
    create = command("create", "create a user", users)
    create.add_argument("name")
    create.add_argument("--balance-cents", help="initial balance in cents, e.g. 500 or 2.5")
    topup = command("topup", "add money to a user's balance", users)
    topup.add_argument("name")
    topup.add_argument("cents", help="amount in cents, e.g. 500 or 2.5")
    topup.add_argument("--reference", help="idempotency reference: a repeated reference is applied once")
    command("show", "a user's balance, keys and recent charges", users).add_argument("name")

    keys = command("keys", "API keys").add_subparsers(dest="action", required=True)
    kcreate = command("create", "issue an API key for one user and one server (shown once)", keys)
    kcreate.add_argument("--user", required=True)
    kcreate.add_argument("--server", required=True)
    kcreate.add_argument("--expires", help="a duration (30d, 12h) or an ISO date")
    kcreate.add_argument("--spend-limit-cents", help="most this key may ever spend, in cents")
    kcreate.add_argument("--name", help="a name for the key, shown in lists (at most 100 printable characters)")
    command("list", "list keys (prefixes only)", keys).add_argument("--user")
    command("revoke", "revoke a key by id or unique prefix", keys).add_argument("id_or_prefix")

    tokens = command("tokens", "service tokens for developers' own servers").add_subparsers(
        dest="action", required=True
    )
    tcreate = command("create", "issue a service token (shown once)", tokens)
    tcreate.add_argument("--developer", required=True)
    tcreate.add_argument("--server", required=True, action="append", help="repeat for several servers")
    command("list", "list service tokens (prefixes only)", tokens).add_argument("--developer")
    command("revoke", "revoke a service token by id or unique prefix", tokens).add_argument("id_or_prefix")

    charges = command("charges", "charges").add_subparsers(dest="action", required=True)
    refund = command("refund", "refund a charge (proxy or service API) fully or partly", charges)
    refund.add_argument("charge_id")
    refund.add_argument("--amount-cents", help="partial refund amount (default: what is left of the charge)")
    refund.add_argument("--reference", help="idempotency reference: a repeated reference is applied once")

    payouts = command("payouts", "developer payouts").add_subparsers(dest="action", required=True)
    pcreate = command("create", "move earnings to payout clearing (pending)", payouts)
    pcreate.add_argument("developer")
    pcreate.add_argument("--amount-cents", help="default: all current earnings")
    psettle = command("settle", "mark a payout as paid", payouts)
    psettle.add_argument("payout_id")
    psettle.add_argument("--reference", required=True, help="the bank or transfer reference")
    command("fail", "mark a payout as failed: the money returns to the developer", payouts).add_argument("payout_id")
    command("list", "list payouts", payouts).add_argument("--developer")

    statement = command("statement", "a developer's statement of charges, refunds and payouts")
    statement.add_argument("developer")
    statement.add_argument("--csv", action="store_true", help="print CSV")

    usage = command("usage", "calls and amounts by user, server and tool")
    usage.add_argument("--user")
    usage.add_argument("--server")
    command("earnings", "a developer's earnings").add_argument("developer")

    logins = command("logins", "portal logins (e-mail + password) for user and developer accounts").add_subparsers(
        dest="action", required=True
    )
    invite = command(
        "invite", "print a one-time sign-in link that sets the password (creates the login or links accounts)", logins
    )
    invite.add_argument("email")
    invite.add_argument("--user", help="the user account to link (must exist; default: the e-mail's own)")
    invite.add_argument("--developer", help="the developer account to link (must exist)")
    command("list", "list logins", logins)
    command("disable", "disable a login and end its sessions", logins).add_argument("email")

    payments_cli.add_commands(command, commands, users, developers)
    ledger = command("ledger", "ledger maintenance").add_subparsers(dest="action", required=True)
    command("verify", "check every ledger invariant; exit non-zero on a violation", ledger)
    export = command("export", "dump every table of the ledger to a store-neutral JSON-lines file", ledger)
    export.add_argument("file", help="where to write the dump ('-' for standard output)")
    load = command("import", "load a dump into an empty ledger (one transaction, ids kept), then verify it", ledger)
    load.add_argument("file", help="a dump written by `agentpay ledger export` ('-' for standard input)")
    load.add_argument(
        "--into",
        metavar="URL",
        help="database URL to import into, e.g. postgresql://user@host/db?schema=NAME (default: the configured one)",
    )

    command("migrate", "apply the ledger's database migrations (the configured store); print the ones applied")
    return parser


def config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("AGENTPAY_CONFIG") or DEFAULT_CONFIG)


def _print(value: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(value, indent=2, ensure_ascii=False))
        return
    if isinstance(value, list):
        if not value:
            print("(none)")
        for item in value:
            print("  ".join(f"{k}={v}" for k, v in item.items() if v is not None))
        return
    for name, item in value.items():
        if isinstance(item, list):
            print(f"{name}:")
            for entry in item:
                print("  - " + "  ".join(f"{k}={v}" for k, v in entry.items() if v is not None))
        elif item is not None:
            print(f"{name}: {item}")


def _key_text(key: dict[str, Any]) -> dict[str, Any]:
    """A key as the text output shows it: its name quoted (a name with blanks or '=' cannot pass for
    other fields), ``last_used_at=never`` for a key no call has used (``--json`` keeps null)."""
    shown = dict(key)
    if shown.get("name") is not None:
        shown["name"] = json.dumps(shown["name"], ensure_ascii=False)
    if "last_used_at" in shown and shown["last_used_at"] is None:
        shown["last_used_at"] = "never"
    return shown


def _print_csv(rows: Any) -> None:
    fields = ["created_at", "kind", "amount_cents", "server", "name", "charge_id", "transfer_id"]
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


async def _with_ops(config: GatewayConfig, fn: Callable[[Operations], Awaitable[Any]]) -> Any:
    ledger = open_ledger(config.database)
    await ledger.open()
    try:
        return await fn(Operations(ledger, config))
    finally:
        await ledger.close()


def _action(args: argparse.Namespace) -> Callable[[Operations], Awaitable[Any]] | None:
    cmd, action = args.command, getattr(args, "action", None)
    table: dict[tuple[str, str | None], Callable[[Operations], Awaitable[Any]]] = {
        ("developers", "create"): lambda o: o.create_developer(args.name),
        ("users", "create"): lambda o: o.create_user(args.name, getattr(args, "balance_cents", None)),
        ("users", "topup"): lambda o: o.topup(args.name, args.cents, args.reference),
        ("users", "show"): lambda o: o.show_user(args.name),
        ("keys", "create"): lambda o: o.create_key(
            user=args.user,
            server=args.server,
            expires=args.expires,
            spend_limit_cents=args.spend_limit_cents,
            name=args.name,
        ),
        ("keys", "list"): lambda o: o.list_keys(args.user),
        ("keys", "revoke"): lambda o: o.revoke_key(args.id_or_prefix),
        ("tokens", "create"): lambda o: o.create_token(developer=args.developer, servers=args.server),
        ("tokens", "list"): lambda o: o.list_tokens(args.developer),
        ("tokens", "revoke"): lambda o: o.revoke_token(args.id_or_prefix),
        ("charges", "refund"): lambda o: o.refund(args.charge_id, args.amount_cents, args.reference),
        ("payouts", "create"): lambda o: o.create_payout(args.developer, args.amount_cents),
        ("payouts", "settle"): lambda o: o.settle_payout(args.payout_id, args.reference),
        ("payouts", "fail"): lambda o: o.fail_payout(args.payout_id),
        ("payouts", "list"): lambda o: o.list_payouts(args.developer),
        ("statement", None): lambda o: o.statement(args.developer),
        ("usage", None): lambda o: o.usage(args.user, args.server),
        ("earnings", None): lambda o: o.earnings(args.developer),
        ("ledger", "verify"): lambda o: o.verify(),
    }
    return table.get((cmd, action))


def _login_record(login: Login) -> dict[str, Any]:
    return {
        "id": login.id,
        "email": login.email,
        "user": login.user,
        "developer": login.developer,
        "verified": login.verified,
        "disabled": login.disabled,
        "has_password": login.has_password,
        "created_at": iso(login.created_at),
        "last_login_at": iso(login.last_login_at),
    }


async def _logins(config: GatewayConfig, args: argparse.Namespace) -> Any:
    """`logins invite|list|disable`, through the same LoginService the portal uses."""
    from gateway.app import login_service  # the gateway's own wiring, imported only for these commands

    ledger = open_ledger(config.database)
    await ledger.open()
    service = login_service(config, ledger)
    try:
        await service.open()
        if args.action == "invite":
            link = await service.invite(args.email, user=args.user, developer=args.developer)
            login = await service.find_login(link.email)
            return {
                "email": link.email,
                "user": login.user if login else None,
                "developer": login.developer if login else None,
                "url": link.url,
                "expires_at": iso(link.expires_at),
            }
        if args.action == "disable":
            return _login_record(await service.disable(args.email))
        return [_login_record(login) for login in await service.list_logins()]
    finally:
        await service.close()
        await ledger.close()


async def _migrate(database: str) -> dict[str, Any]:
    """The ledger's migrations, then those of every concern beside it (their tables too: a gateway
    whose database role may not create tables finds the whole schema in place)."""
    ledger = open_ledger(database)
    try:
        applied = await ledger.migrate()
        before = set(await ledger.applied_migrations())
        for concern in CONCERNS:
            side = concern.open_side(database)
            await side.open()  # opening applies what is missing (PostgreSQL: under an advisory lock)
            await side.close()
        current = await ledger.applied_migrations()
    finally:
        await ledger.close()
    applied += [name for name in current if name not in before]
    return {"database": redact_url(database), "applied": applied, "migrations": current}


async def _export_rows(database: str) -> list[ExportRow]:
    """The ledger's rows, then the rows the concerns beside it carry (``ops.moves``)."""
    ledger = open_ledger(database)
    await ledger.open()
    try:
        rows = await ledger.export_rows()
        applied = await ledger.applied_migrations()
    finally:
        await ledger.close()
    return [*rows, *await export_carried(database, applied)]


def _export(database: str, file: str) -> dict[str, Any]:
    rows = asyncio.run(_export_rows(database))
    source = database.split(":", 1)[0]
    carried = carried_columns()
    if file == "-":
        counts = write_dump(rows, sys.stdout, source=source, carried=carried)
        sys.stdout.flush()
    else:
        path = Path(file)
        partial = path.with_name(path.name + ".partial")
        try:
            # Owner-only: the dump holds password hashes and the hashes of keys and tokens.
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(descriptor, "w", encoding="utf-8") as out:
                counts = write_dump(rows, out, source=source, carried=carried)
                out.flush()
                os.fsync(out.fileno())
            partial.replace(path)  # never a half-written dump under the real name
        except OSError as exc:
            raise GatewayError(f"cannot write the dump to {file}: {exc}") from None
    return {"database": redact_url(database), "file": file, "rows": counts}


async def _import_rows(database: str, rows: list[ExportRow]) -> tuple[dict[str, int], list[str]]:
    """The ledger's rows in one transaction, verified, then each carried concern's in one of its own.
    Every carried table of the target is checked empty first, so a full target is refused before
    anything is written."""
    carried_names = set(carried_columns())
    ledger_rows = [row for row in rows if row[0] not in carried_names]
    await check_carried_empty(database)
    ledger = open_ledger(database)
    await ledger.open()
    try:
        counts = await ledger.import_rows(ledger_rows)
        problems = await ledger.verify()
    finally:
        await ledger.close()
    counts.update(await import_carried(database, [row for row in rows if row[0] in carried_names]))
    return counts, problems


def _import(database: str, file: str) -> dict[str, Any]:
    carried = carried_columns()
    try:
        if file == "-":
            rows = list(read_dump(sys.stdin, carried=carried))
        else:
            with Path(file).open(encoding="utf-8") as lines:
                rows = list(read_dump(lines, carried=carried))  # the whole dump is checked before the target is touched
    except (OSError, UnicodeDecodeError) as exc:
        raise GatewayError(f"cannot read the dump {file}: {exc}") from None
    counts, problems = asyncio.run(_import_rows(database, rows))
    return {"database": redact_url(database), "file": file, "rows": counts, "ok": not problems, "problems": problems}


def _maintenance(args: argparse.Namespace) -> int:
    """`migrate`, `ledger export` and `ledger import` (the last needs no config with --into)."""
    into = getattr(args, "into", None)
    database = into if into else load_config(config_path(args.config)).database
    if args.command == "migrate":
        result = asyncio.run(_migrate(database))
        if args.json:
            _print(result, True)
        else:
            for name in result["applied"]:
                print(f"applied {name}")
            print(f"{result['database']}: schema up to date ({', '.join(result['migrations'])})")
        return 0
    if args.action == "export":
        result = _export(database, args.file)
        summary = (
            f"exported {sum(result['rows'].values())} rows to {args.file} ("
            + ", ".join(f"{table} {count}" for table, count in result["rows"].items())
            + ")"
        )
        if args.json:
            print(json.dumps(result, indent=2), file=sys.stderr if args.file == "-" else sys.stdout)
        else:
            print(summary, file=sys.stderr if args.file == "-" else sys.stdout)
        return 0
    result = _import(database, args.file)
    if args.json:
        _print(result, True)
    else:
        print(
            f"imported {sum(result['rows'].values())} rows into {result['database']} ("
            + ", ".join(f"{table} {count}" for table, count in result["rows"].items())
            + ")"
        )
        print("ledger verify: ok" if result["ok"] else "ledger verify: FAILED")
        for problem in result["problems"]:
            print(f"  - {problem}")
    return 0 if result["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "migrate" or (args.command == "ledger" and args.action in ("export", "import")):
            return _maintenance(args)
        config = load_config(config_path(args.config))
        if args.command == "serve":
            if args.workers < 1:
                raise GatewayError(f"--workers must be at least 1, got {args.workers}")
            if args.workers > 1:
                from gateway.ops.workers import run_workers

                return run_workers(str(config.path), args.workers)
            from gateway.ops.serve import serve

            return serve(config, reuse_port=args.reuse_port)
        if args.command == "demo":
            from gateway.ops.demo import run_demo

            return run_demo(config, upstream_port=args.upstream_port)
        # Every one-shot command below answers on stdout: its log events (a missed webhook found
        # by reconcile, say) go to stderr, never into the answer (`--json` stays parseable).
        logs.configure(config.log_format, level=logging.WARNING, cache=False)
        if args.command == "check-config":
            from gateway.ops.serve import check

            result = asyncio.run(check(config))
            _print(result, args.json)
            return 0
        if args.command == "logins":
            _print(asyncio.run(_logins(config, args)), args.json)
            return 0
        if payments_cli.handles(args, config):
            _print(asyncio.run(payments_cli.run(config, args)), args.json)
            return 0
        action = _action(args)
        if action is None:  # pragma: no cover - argparse rejects unknown commands first
            raise GatewayError(f"unknown command {args.command}")
        result = asyncio.run(_with_ops(config, action))
        if args.command == "statement" and args.csv:
            _print_csv(result)
            return 0
        if args.command == "keys" and not args.json:
            keys: Any = result
            _print([_key_text(k) for k in keys] if isinstance(keys, list) else _key_text(keys), False)
            return 0
        _print(result, args.json)
        if args.command == "ledger" and not result["ok"]:
            return 1
        return 0
    except GatewayError as exc:
        print(f"agentpay: error: {exc.text()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
