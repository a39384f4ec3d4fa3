"""The results as markdown: one table per upstream, the side runs, and the issue's targets."""

from __future__ import annotations

from typing import Any


def _f(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def _cell(value: float | None, ref: float | None, direct: float | None, digits: int = 2) -> str:
    r, d = _ratio(value, ref), _ratio(value, direct)
    return f"{_f(value, digits)} ({_f(r)}× / {_f(d)}×)"


def by_key(phase: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["key"]: c for c in phase.get("contenders", [])}


def phase_table(phase: dict[str, Any]) -> str:
    cs = by_key(phase)
    ref, direct = cs.get("reference", {}), cs.get("direct", {})
    lines = [
        "| contender | req/s @32 | p50 @1 (ms) | added p50 @1 vs direct | p99 @1 (ms) | p50 @32 (ms) | p99 @32 (ms) "
        "| peak RSS (MB) | CPU @32 | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in phase.get("contenders", []):
        if "unavailable" in c:
            lines.append(f"| {c['label']} | unavailable | | | | | | | | {c['unavailable']} |")
            continue

        def cell(name: str, digits: int = 2, row: dict[str, Any] = c) -> str:
            return _cell(row.get(name), ref.get(name), direct.get(name), digits)

        added = c["p50_c1_ms"] - direct["p50_c1_ms"] if direct.get("p50_c1_ms") is not None else None
        rss = f"{_f(c['peak_rss_mb'], 1)}{' (upstream)' if c.get('rss_is_upstream') else ''}"
        note = c.get("note", "")
        if c.get("not_ok"):
            note = f"{note}; {c['not_ok']} responses not ok".strip("; ")
        lines.append(
            f"| {c['label']} | {cell('rps_c32', 0)} | {cell('p50_c1_ms', 3)} | {_f(added, 3)} ms "
            f"| {cell('p99_c1_ms', 3)} | {cell('p50_c32_ms')} | {cell('p99_c32_ms')} "
            f"| {rss} ({_f(_ratio(c['peak_rss_mb'], ref.get('peak_rss_mb')))}× / "
            f"{_f(_ratio(c['peak_rss_mb'], direct.get('peak_rss_mb')))}×) | {_f(c.get('cpu_pct_c32'), 0)}% | {note} |"
        )
    return "\n".join(lines)


def verification(phase: dict[str, Any]) -> str:
    out = []
    for key, v in (phase.get("verification") or {}).items():
        e = v["exact_check"]
        out.append(
            f"- `{key}`: `agentpay ledger verify` {'clean' if v['ledger_verify_ok'] else 'FAILED'}"
            f"{' (' + v['ledger_verify']['note'] + ')' if v['ledger_verify'].get('note') else ''}; "
            f"charged calls {v['charged_calls']:,} vs successful calls {v['successful_calls']:,} "
            f"(requests sent {v['requests_sent']:,}; wrk cuts calls off mid-flight at the end of each run, so "
            f"successful ≤ charged ≤ sent): {'consistent' if v['consistent'] else 'INCONSISTENT'}; exact check "
            f"({e['calls']} calls, none cut off): {e['ok']} successful, {e['receipts']} receipts, {e['charged']} "
            f"charged — {'equal' if e['exact'] else 'MISMATCH'}"
        )
    return "\n".join(out)


def ledger_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| database | callers | captures/s | hold p50 / p99 (ms) | capture p50 / p99 (ms) "
        "| hold+capture p50 / p99 (ms) | verify |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['database']} | {r['callers']} | unavailable: {r['unavailable']} | | | | |")
            continue
        if r.get("mode") == "grants":  # issue 19: in-memory holds, captures written in batches
            lines.append(
                f"| {r['database']}, credit grants | {r['callers']} | {_f(r['captures_per_s'], 0)} | "
                f"{r['hold_p50_ms']} / {r['hold_p99_ms']} (in memory) | {r['calls_per_flush']} calls per "
                f"batch | | {'clean' if r['verify_ok'] else 'VIOLATIONS'} |"
            )
            continue
        lines.append(
            f"| {r['database']} | {r['callers']} | {_f(r['captures_per_s'], 0)} | {r['hold_p50_ms']} / "
            f"{r['hold_p99_ms']} | {r['capture_p50_ms']} / {r['capture_p99_ms']} | {r['pair_p50_ms']} / "
            f"{r['pair_p99_ms']} | {'clean' if r['verify_ok'] else 'VIOLATIONS'} |"
        )
    return "\n".join(lines)


def relay_table(relay: dict[str, Any]) -> str:
    lines = [
        "| contender | concurrent streams | events | p50 delay (ms) | p99 delay (ms) | max (ms) | failures |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in relay.get("runs", []):
        lines.append(
            f"| {r['contender']} | {r['concurrency']} | {r['events']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['max_ms']} | {r['failures']} |"
        )
    return "\n".join(lines)


def memory_table(mem: dict[str, Any]) -> str:
    lines = [
        "| contender | streams open | RSS before (MB) | RSS with streams open (MB) | KB per stream "
        "| extrapolated to 10,000 (MB) | failed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in mem.get("runs", []):
        lines.append(
            f"| {r['contender']} | {r['opened']:,} | {r['rss_before_mb']} | {r['rss_open_mb']} | {r['kb_per_stream']} "
            f"| {r['rss_at_10k_mb_extrapolated']} | {r['failed']} {r['failure_reasons'] or ''} |"
        )
    return "\n".join(lines)


def scale_table(sc: dict[str, Any]) -> str:
    lines = [
        "| database | postings | keys | fill (s) | p50 @1 empty → large (ms) | p99 @1 empty → large (ms) "
        "| req/s @32 empty → large | p50 ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sc.get("runs", []):
        filled = r.get("filled", {})
        if "unavailable" in r:
            lines.append(f"| {r['database']} | {filled.get('postings')} | | | unavailable: {r['unavailable']} | | | |")
            continue
        e, g = r["empty"], r["large"]
        lines.append(
            f"| {r['database']} | {filled['postings']:,} | {filled['keys']:,} | {r['fill_seconds']:.0f} "
            f"| {e['p50_c1_ms']} → {g['p50_c1_ms']} | {e['p99_c1_ms']} → {g['p99_c1_ms']} "
            f"| {_f(e['rps_c32'], 0)} → {_f(g['rps_c32'], 0)} | {r['p50_ratio']}× |"
        )
    return "\n".join(lines)


def profile_section(prof: dict[str, Any] | None, top: int = 15) -> str:
    if not prof:
        return "_not run_"
    if "unavailable" in prof:
        return f"_unavailable: {prof['unavailable']}_"
    lines = [
        f"py-spy (non-blocking, {prof['samples']:,} samples of busy threads) on the gateway while wrk drove 32 "
        f"connections ({_f(prof.get('rps_while_profiled'), 0)} req/s while profiled). Busy time by thread: "
        + ", ".join(f"{t['thread']} {100 * t['share']:.0f}%" for t in prof.get("threads", [])[:4])
        + f". {prof.get('note', '')}",
        "",
        "| event-loop thread, self | % of samples | | gateway functions, inclusive | % of samples |",
        "| --- | --- | --- | --- | --- |",
    ]
    selfs, incl = prof.get("self_main", [])[:top], prof.get("inclusive_gateway", [])[:top]

    def pair(rows: list[dict[str, Any]], i: int) -> str:
        if i >= len(rows):
            return " | "
        return f"`{rows[i]['function']}` | {100 * rows[i]['share']:.1f}"

    for i in range(max(len(selfs), len(incl))):
        lines.append(f"| {pair(selfs, i)} | | {pair(incl, i)} |")
    others = prof.get("self_other_threads", [])[:5]
    if others:
        lines += ["", "Other threads, self: " + "; ".join(f"`{o['function']}` {100 * o['share']:.1f}%" for o in others)]
    return "\n".join(lines)


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("**met**" if ok else "**not met**")


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, target, measured, met) rows for the issue's table."""
    rows: list[tuple[str, str, str, str]] = []
    a, f = by_key(results.get("aiohttp") or {}), by_key(results.get("fastmcp") or {})

    def get(cs: dict[str, Any], key: str, name: str) -> float | None:
        c = cs.get(key) or {}
        v = c.get(name)
        return float(v) if v is not None else None

    def ratio(cs: dict[str, Any], key: str, base: str, name: str = "rps_c32") -> float | None:
        return _ratio(get(cs, key, name), get(cs, base, name))

    pa_ref, pf_ref = ratio(a, "agentpay_sqlite", "reference"), ratio(f, "agentpay_sqlite", "reference")
    pf_dir = ratio(f, "agentpay_sqlite", "direct")
    pf_fm, pf_ll = ratio(f, "agentpay_sqlite", "fastmcp_proxy"), ratio(f, "agentpay_sqlite", "litellm")
    measured = (
        f"{_f(pa_ref)}× reference (aiohttp upstream), {_f(pf_ref)}× reference, {_f(pf_dir)}× direct, "
        f"{_f(pf_fm)}× FastMCP proxy, {_f(pf_ll)}× LiteLLM (FastMCP upstream)"
    )
    checks = [pa_ref, pf_ref, pf_dir, pf_fm, pf_ll]
    ok = None
    if all(x is not None for x in checks):
        ok = pa_ref >= 1.0 and pf_ref >= 1.0 and pf_dir >= 0.9 and pf_fm >= 15 and pf_ll >= 15  # type: ignore[operator]
    rows.append(
        (
            "paid-call throughput at 32 connections, SQLite",
            "≥ 1.0× reference (stretch 1.5×); ≥ 0.9× direct, ≥ 15× FastMCP proxy and LiteLLM (FastMCP upstream)",
            measured,
            _met(ok),
        )
    )
    fa, ff = ratio(a, "agentpay_free", "reference"), ratio(f, "agentpay_free", "reference")
    rows.append(
        (
            "free-call throughput",
            "≥ 1.3× reference",
            f"{_f(fa)}× (aiohttp upstream), {_f(ff)}× (FastMCP upstream)",
            _met(None if fa is None else fa >= 1.3 and (ff is None or ff >= 1.3)),
        )
    )
    d50, d99 = get(a, "direct", "p50_c1_ms"), get(a, "direct", "p99_c1_ms")
    free50, paid50, paid99 = (
        get(a, "agentpay_free", "p50_c1_ms"),
        get(a, "agentpay_sqlite", "p50_c1_ms"),
        get(a, "agentpay_sqlite", "p99_c1_ms"),
    )
    if None not in (d50, d99, free50, paid50, paid99):
        af, ap, ap99 = free50 - d50, paid50 - d50, paid99 - d99  # type: ignore[operator]
        rows.append(
            (
                "added latency at 1 connection vs direct (aiohttp upstream)",
                "p50 ≤ 0.5 ms free, ≤ 1.0 ms paid; p99 ≤ 2 ms paid",
                f"free p50 +{af:.3f} ms; paid p50 +{ap:.3f} ms; paid p99 +{ap99:.3f} ms",
                _met(af <= 0.5 and ap <= 1.0 and ap99 <= 2.0),
            )
        )
    lrows = [r for r in results.get("ledger") or [] if isinstance(r, dict) and r.get("mode") != "grants"]
    sq = next((r for r in lrows if r.get("database") == "sqlite" and r.get("callers") == 32), None)
    if sq and "captures_per_s" in sq:
        rows.append(
            (
                "ledger captures/s, SQLite (each capture fsynced before it is answered: synchronous=FULL's guarantee)",
                "≥ 20,000 with concurrent callers",
                f"{sq['captures_per_s']:,.0f}/s with 32 callers (capture p99 {sq['capture_p99_ms']} ms)",
                _met(sq["captures_per_s"] >= 20_000),
            )
        )
    for r in (results.get("scale") or {}).get("runs", []):
        if "p50_ratio" in r:
            fl = r["filled"]
            rows.append(
                (
                    f"paid-call p50 with a large ledger ({r['database']}: {fl['postings']:,} postings, "
                    f"{fl['keys']:,} keys)",
                    "≤ 1.2× the empty ledger (10M postings / 1M keys)",
                    f"{r['p50_ratio']}× ({r['empty']['p50_c1_ms']} → {r['large']['p50_c1_ms']} ms)",
                    _met(r["p50_ratio"] <= 1.2),
                )
            )
    relay = [r for r in (results.get("sse_relay") or {}).get("runs", []) if r["contender"] == "agentpay_sqlite"]
    if relay:
        worst = max(r["p99_ms"] for r in relay)
        rows.append(
            (
                "SSE relay delay through AgentPay",
                "p99 ≤ 2 ms",
                "; ".join(f"p99 {r['p99_ms']} ms with {r['concurrency']} stream(s)" for r in relay),
                _met(worst <= 2.0),
            )
        )
    mem = [r for r in (results.get("memory") or {}).get("runs", []) if r["contender"] == "agentpay_sqlite"]
    if mem:
        r = mem[0]
        extrapolated = r["opened"] < 10_000
        rows.append(
            (
                "10,000 open SSE streams",
                "≤ 500 MB RSS for the gateway",
                f"{r['rss_open_mb']} MB with {r['opened']:,} streams"
                + (f" ({r['rss_at_10k_mb_extrapolated']} MB extrapolated to 10,000)" if extrapolated else ""),
                _met(r["rss_at_10k_mb_extrapolated"] <= 500 if extrapolated else r["rss_open_mb"] <= 500),
            )
        )
    big = next((r for r in lrows if r.get("database") == "sqlite" and r.get("callers") == 256), None)
    if big and "captures_per_s" in big:
        rows.append(
            (
                "ledger captures/s, SQLite, 256 concurrent callers",
                "≥ 20,000 with concurrent callers",
                f"{big['captures_per_s']:,.0f}/s (capture p99 {big['capture_p99_ms']} ms)",
                _met(big["captures_per_s"] >= 20_000),
            )
        )
    w_sq, w_pg = ratio(a, "agentpay_sqlite_w2", "agentpay_sqlite"), ratio(a, "agentpay_pg_w2", "agentpay_pg")
    if w_sq is not None or w_pg is not None:
        rows.append(
            (
                "scaling from 1 to 2 workers (paid, aiohttp upstream; 2 cores shared with wrk and the upstream)",
                "measure (no target)",
                f"SQLite {_f(w_sq)}×, PostgreSQL {_f(w_pg)}× the 1-worker throughput; "
                f"2-worker SQLite {_f(ratio(a, 'agentpay_sqlite_w2', 'reference'))}× reference",
                "measured",
            )
        )
    pg_a, pg_f = ratio(a, "agentpay_pg", "agentpay_sqlite"), ratio(f, "agentpay_pg", "agentpay_sqlite")
    rows.append(
        (
            "paid calls on PostgreSQL",
            "≥ 0.7× SQLite throughput",
            f"{_f(pg_a)}× (aiohttp upstream), {_f(pg_f)}× (FastMCP upstream)",
            _met(None if pg_a is None else pg_a >= 0.7 and (pg_f is None or pg_f >= 0.7)),
        )
    )
    rows += grant_targets(results)
    return rows


def grant_targets(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Issue 19's targets (credit grants), from the same run's contenders."""
    a, f = by_key(results.get("aiohttp") or {}), by_key(results.get("fastmcp") or {})

    def get(cs: dict[str, Any], key: str, name: str) -> float | None:
        v = (cs.get(key) or {}).get(name)
        return float(v) if v is not None else None

    def ratio(cs: dict[str, Any], key: str, base: str) -> float | None:
        return _ratio(get(cs, key, "rps_c32"), get(cs, base, "rps_c32"))

    rows: list[tuple[str, str, str, str]] = []
    for key, label, target in (
        ("agentpay_sqlite_grants", "SQLite", 0.90),
        ("agentpay_pg_grants", "PostgreSQL", 0.85),
    ):
        r = ratio(a, key, "agentpay_free")
        held = ratio(a, key.removesuffix("_grants"), "agentpay_free")
        rows.append(
            (
                f"issue 19: paid {label} with credit grants ÷ free, req/s @32 (aiohttp upstream)",
                f"≥ {target:.2f}",
                f"{_f(r)} (per-call holds in the same run: {_f(held)})",
                _met(None if r is None else r >= target),
            )
        )
    g1, f1 = get(a, "agentpay_sqlite_grants", "p50_c1_ms"), get(a, "agentpay_free", "p50_c1_ms")
    if g1 is not None and f1 is not None:
        rows.append(
            (
                "issue 19: paid (SQLite, grants) added p50 @1 minus free's",
                "≤ 0.1 ms",
                f"{g1 - f1:+.3f} ms ({g1:.3f} vs {f1:.3f} ms)",
                _met(g1 - f1 <= 0.1),
            )
        )
    for db, target in (("sqlite", 100_000), ("postgresql", 50_000)):
        row = next(
            (r for r in results.get("ledger") or [] if r.get("mode") == "grants" and r.get("database") == db), None
        )
        if row and "captures_per_s" in row:
            rows.append(
                (
                    f"issue 19: ledger captures/s through the grant path, {db} (1 user, 256 callers)",
                    f"≥ {target:,}",
                    f"{row['captures_per_s']:,.0f}/s ({row.get('calls_per_flush')} calls per batch)",
                    _met(row["captures_per_s"] >= target),
                )
            )
    fm = ratio(f, "agentpay_sqlite_grants", "direct")
    rows.append(
        (
            "issue 19: paid (SQLite, grants) in front of FastMCP ÷ direct",
            "≥ 0.95",
            f"{_f(fm)} (per-call holds: {_f(ratio(f, 'agentpay_sqlite', 'direct'))})",
            _met(None if fm is None else fm >= 0.95),
        )
    )
    fr = ratio(a, "agentpay_free", "reference")
    rows.append(
        ("issue 19: free ÷ plain aiohttp pass-through", "≥ 1.0", _f(fr), _met(None if fr is None else fr >= 1.0))
    )
    return rows


def markdown(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    parts = [
        f"### Results ({results.get('mode')} mode, {m.get('date')})",
        "",
        f"Machine: {m.get('cores')} cores, {m.get('cpu')}, {m.get('memory_gb')} GB RAM, Linux {m.get('kernel')}; "
        f"Python {m.get('python')}, aiohttp {m.get('aiohttp')}, SQLite {m.get('sqlite')}, {m.get('postgres')}, "
        f"{m.get('nginx')}, {m.get('wrk')}, fastmcp {m.get('fastmcp')}, litellm {m.get('litellm')}; "
        f"AgentPay at {m.get('commit')}. Everything (load generator, upstream, contenders, databases) shares "
        "the same cores over loopback: absolute numbers are noisy, the ratios of one run are the result.",
        "",
        "Each cell: value (× reference pass-through / × direct). Medians of "
        f"{results.get('params', {}).get('rounds')} interleaved rounds; "
        f"load generator: {(results.get('aiohttp') or {}).get('load_generator', '?')}. CPU @32 is the "
        "contender's own CPU use during the 32-connection run (100% = one core).",
    ]
    for key, title in (("aiohttp", "Minimal aiohttp upstream"), ("fastmcp", "FastMCP upstream (stateless, JSON)")):
        phase = results.get(key)
        if not phase:
            continue
        parts += ["", f"#### {title}", ""]
        if "unavailable" in phase and "contenders" not in phase:
            parts.append(f"_unavailable: {phase['unavailable']}_")
            continue
        parts.append(phase_table(phase))
        ver = verification(phase)
        if ver:
            parts += ["", "Correctness of the paid runs:", "", ver]
    if results.get("ledger"):
        parts += ["", "#### Ledger micro-benchmark (hold + capture through `gateway.ledger`, no HTTP)", ""]
        ledger = results["ledger"]
        parts.append(ledger_table(ledger) if isinstance(ledger, list) else f"_{ledger}_")
    if results.get("sse_relay"):
        relay = results["sse_relay"]
        parts += [
            "",
            "#### SSE relay delay (upstream writes an event → client reads it; paid tools/call answered over SSE, "
            f"{relay.get('ticks_per_call')} events {relay.get('interval_ms')} ms apart per call)",
            "",
            relay_table(relay) if "runs" in relay else f"_{relay}_",
        ]
    if results.get("memory"):
        mem = results["memory"]
        parts += [
            "",
            f"#### Memory with open SSE streams (asked {mem.get('asked')}, ran {mem.get('streams')}: the gateway "
            f"holds two sockets per stream under an open-file limit of {mem.get('nofile_limit')})",
            "",
            memory_table(mem) if "runs" in mem else f"_{mem}_",
        ]
    if results.get("scale"):
        parts += ["", "#### Scale (paid call, large ledger vs empty)", "", scale_table(results["scale"])]
    prof = (results.get("aiohttp") or {}).get("profile")
    parts += ["", "#### Profile of the paid SQLite path", "", profile_section(prof)]
    parts += ["", "#### Targets (issue 7)", "", "| figure | target | measured | |", "| --- | --- | --- | --- |"]
    for figure, target, measured, met in targets(results):
        parts.append(f"| {figure} | {target} | {measured} | {met} |")
    parts.append("")
    return "\n".join(parts)
