"""Credit grants: paid calls held and captured in memory, written to the ledger in batches.

The anchor is Diameter Credit-Control (RFC 4006): the charging system grants the network element a
quota, the element spends it locally call by call and reports what was used in batches; near the end
of the balance the grants become exact. Here, per (user, API key), a process takes a *grant*: one
ledger hold of several calls' worth (``Grants.grant``: a lease, renewed and swept like a call's
hold). A call is then held by taking its price out of the grant's unreserved remainder (no await, a
few microseconds); a capture queues the call, and ``flush_s`` after a capture finds the writer idle
the queued calls are written in one transaction per grant, batch after batch while calls keep
coming (a group commit: each batch carries what arrived during the previous write;
``Grants.flush_grant``: per-call hold rows, charge transfers, postings and charges, as a capture
writes them; idempotent per call id). A void puts the price back.

Sizing and the end of a balance. A grant asks for ``target_s`` of the key's recent call rate (at
least ``min_calls``, at most ``max_calls`` calls' worth) and the ledger gives at most a ``share``-th
of the user's available balance and of the key's remaining cap, or nothing below ``min_calls``' worth.
So once the available balance is below ``share * min_calls * price``, no process takes a grant and
every call is an exact per-call hold (``Billing`` falls back). Grants taken earlier are given back:
a flush that reports a balance that low (``low``), a refresh that finds the key revoked, expired or
over its lowered cap, a grant idle for ``idle_s``, a drain (``close``). And a call refused by its
per-call hold while grants of its user are still outstanding anywhere waits up to ``drain_wait_s``
for them to come back before it is refused (``Billing.hold``), so N concurrent calls against a
balance B at price p still succeed exactly ⌊B/p⌋ times, in one process or across replicas.

What a crash loses: the captures queued or being written since the last committed flush (one flush
per grant in flight; with more than ``max_batch`` queued, callers wait for
the writer): delivered, unbilled, never charged twice. The grant's hold stays pending until its
lease lapses and the sweep voids it, so its money returns within lease + sweep interval.

Changes made elsewhere reach grants within ``key_cache_s``: every ``tick`` (at most ``key_cache_s``)
one ``refresh_grants`` renews the leases and reads each grant's key and balance back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from gateway.ledger.base import HoldOutcome, HoldRequest, HoldStatus
from gateway.ledger.grants import (
    GRANT_ID_PREFIX,
    GrantedCall,
    GrantRequest,
    GrantState,
    GrantStatus,
)
from gateway.ledger.interfaces import Grants

log = structlog.get_logger("gateway.billing.grants")

_MAX_FLUSH_ATTEMPTS = 8  # a batch the ledger keeps refusing is dropped (logged: delivered, unbilled)


@dataclass(frozen=True, slots=True)
class GrantPolicy:
    """How grants are sized, flushed and given back (``credit_grants: true``)."""

    flush_s: float = 0.010  # a capture waits this long before an idle writer starts its batch (group commit)
    idle_s: float = 0.5  # a grant no call used for this long is given back
    target_s: float = 1.0  # a grant is sized for this long of the key's recent call rate
    min_calls: int = 8  # a grant smaller than this many calls' worth is not taken: per-call holds
    max_calls: int = 65_536  # the most calls' worth one request for a grant asks for
    share: int = 4  # a grant takes at most 1/share of the available balance and of the key's cap
    max_batch: int = 4096  # calls written per flush transaction; more queued than this: callers wait
    refresh_s: float = 1.0  # at most this long between reading back each grant's key and balance (key_cache_s)

    @property
    def tick(self) -> float:
        return max(0.01, min(self.refresh_s, self.idle_s / 2))

    @property
    def drain_wait_s(self) -> float:
        """How long a refused call waits for outstanding grants to come back (idle ones return
        within ``idle_s`` and a tick; low ones at their next flush), counted again from each change
        in what is outstanding."""
        return self.idle_s + 2 * self.tick + 1.0


@dataclass(slots=True)
class _Grant:
    user: str
    key_id: str
    developer: str
    server: str
    db_id: str | None = None  # the grant's hold row; None when it has none (closed, or not opened yet)
    remaining: int = 0  # reserved in the ledger, not yet taken by a call
    reserved: dict[str, HoldRequest] = field(default_factory=dict)  # calls in flight
    unflushed: list[GrantedCall] = field(default_factory=list)  # captured, not yet written
    attempts: int = 0  # failed flushes of the batch at the head of ``unflushed``
    available: int = 0  # the user's available balance (balance - held) when last read
    spend_remaining: int | None = None  # the key's remaining cap when last read
    lease_until: float = 0.0  # monotonic: no call is taken out of the grant after this
    low_until: float = 0.0  # monotonic: per-call holds until then (end of balance, revoked, capped)
    last_used: float = 0.0
    price: int = 0  # the last call's price: what "low" is measured in
    low_water: int = 0  # below this remainder (half the last top-up) it is topped up ahead of need, in the background
    calls: int = 0  # calls since the last extension (the rate)
    since: float = 0.0
    last_id: str | None = None  # the grant's latest row: calls queued on a row that closed are written there
    flushing: int = 0  # flushes of this grant in flight (at most one: the next batch waits and grows)
    flushed: asyncio.Event = field(default_factory=asyncio.Event)  # set while no flush is in flight
    releasing: bool = False  # being given back: no call is taken out of it, no top-up starts
    epoch: int = 0  # bumped by every top-up: a refresh read before it must not judge the grant after it
    extending: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return bool(self.reserved or self.unflushed or self.flushing)


class GrantBook:
    """One process's credit grants. Every method runs on the event loop; only ledger calls await."""

    def __init__(
        self,
        ledger: Grants,
        *,
        owner: str,
        lease_s: float,
        new_id: Callable[[], str],
        track: Callable[[asyncio.Task[None]], object],
        policy: GrantPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.owner = owner
        self.lease_s = lease_s
        self.policy = policy or GrantPolicy()
        self._new_id = new_id
        self._track = track  # Billing's settling tasks: drains wait for every flush
        self._clock = clock
        self._grants: dict[tuple[str, str], _Grant] = {}
        self._calls: dict[str, _Grant] = {}
        self._flush_task: asyncio.Task[None] | None = None
        self.flushes = 0  # flush transactions that committed
        self.unbilled = 0  # captured calls the ledger could not charge (a lapsed grant, a refused batch)

    # --- the hot path ---------------------------------------------------------------------------
    def owns(self, call_id: str) -> bool:
        return call_id in self._calls

    def take(self, req: HoldRequest) -> HoldOutcome | None:
        """Hold ``req`` out of its key's grant, without awaiting; None when the grant cannot."""
        if req.key_id is None:
            return None
        grant = self._grants.get((req.user, req.key_id))
        if grant is None or grant.remaining < req.amount or len(grant.unflushed) >= self.policy.max_batch:
            return None
        now = self._clock()
        if now >= grant.lease_until or now < grant.low_until or grant.releasing:
            return None
        grant.remaining -= req.amount
        grant.reserved[req.call_id] = req
        grant.calls += 1
        grant.last_used = now
        grant.price = req.amount
        self._calls[req.call_id] = grant
        if grant.remaining < grant.low_water and grant.extending is None:
            self._start_extend(grant, req.amount, ahead=True)
        cap = grant.spend_remaining
        return HoldOutcome(
            HoldStatus.OK,
            available=grant.available + grant.remaining,
            spend_remaining=None if cap is None else cap + grant.remaining,
        )

    async def hold(self, req: HoldRequest) -> HoldOutcome | None:
        """Hold ``req`` out of a grant, taking or topping one up if needed; None when the call
        should take an exact per-call hold instead (no grant fits, the key is low or revoked)."""
        taken = self.take(req)
        if taken is not None or req.key_id is None:
            return taken
        grant = self._grants.get((req.user, req.key_id))
        if grant is None:
            grant = self._grants[(req.user, req.key_id)] = _Grant(
                req.user, req.key_id, req.developer, req.server, since=self._clock()
            )
        grant.price = req.amount
        for _ in range(_MAX_FLUSH_ATTEMPTS):
            if len(grant.unflushed) < self.policy.max_batch:
                break
            # Back-pressure: the ledger writes slower than calls arrive. Callers wait for the writer,
            # so what a crash can lose (the queued captures) stays within a batch or two.
            if grant.flushing:
                await grant.flushed.wait()
            else:
                await asyncio.shield(self._schedule_flush())
            taken = self.take(req)
            if taken is not None:
                return taken
        if self._clock() < grant.low_until or grant.releasing:
            return None
        extending = grant.extending or self._start_extend(grant, req.amount)
        await asyncio.shield(extending)  # a cancelled caller leaves the extension running
        return self.take(req)

    def settle(self, call_id: str, *, capture: bool, amount: int | None = None) -> asyncio.Task[None] | None:
        """Capture (queue for the next flush) or void a call held out of a grant; the task that
        writes it (None when nothing is to be written). The call must be one this book holds."""
        grant = self._calls.pop(call_id)
        req = grant.reserved.pop(call_id)
        take = req.amount if amount is None else amount
        if capture and 0 < take <= req.amount:
            grant.remaining += req.amount - take
            grant.unflushed.append(
                GrantedCall(call_id, req.developer, req.server, req.method, req.name, req.amount, take, req.fee)
            )
            return self._schedule_flush()
        if capture and take != 0:
            log.error("grant_capture_refused", call_id=call_id, amount=take, held=req.amount)
        grant.remaining += req.amount
        return None

    # --- taking and topping up --------------------------------------------------------------------
    def _start_extend(self, grant: _Grant, price: int, *, ahead: bool = False) -> asyncio.Task[None]:
        """Top the grant up in a task of its own, tracked like a flush: a drain waits for it (so the
        row it may open is given back) and a process that dies takes it down with it."""
        task = asyncio.get_running_loop().create_task(self._extend(grant, price, ahead=ahead))
        grant.extending = task
        self._track(task)
        return task

    async def _extend(self, grant: _Grant, price: int, *, ahead: bool = False) -> None:
        """Top the grant up (one at a time per grant: ``grant.extending``). Runs beside flushes:
        the ledger adds and takes away in whatever order they commit, and the grant's row can only
        reach nothing (and close) when nothing in memory depends on it, so a top-up that finds it
        closed opens a new row."""
        try:
            if grant.releasing or grant.remaining >= (grant.low_water if ahead else price):
                return
            policy = self.policy
            now = self._clock()
            rate = grant.calls / max(now - grant.since, 0.05)
            calls = min(max(int(rate * policy.target_s), policy.min_calls), policy.max_calls)
            grant_id, state = await self._grant(grant, calls * price, policy.min_calls * price)
            if state.status is GrantStatus.CLOSED:  # spent to nothing, or swept: open a new one
                self._lost(grant, grant_id)
                grant_id, state = await self._grant(grant, calls * price, policy.min_calls * price)
            grant.calls, grant.since = 0, now
            self._read_back(grant, state)
            if state.status is GrantStatus.OK and grant.db_id == grant_id:
                grant.epoch += 1
                grant.remaining += state.granted
                grant.low_water = state.granted // 2
                grant.lease_until = now + self.lease_s * 2 / 3
            elif state.amount == 0 and grant.db_id == grant_id:
                grant.db_id = None  # nothing was reserved under the new id: none is kept
        except Exception as exc:  # noqa: BLE001 - the call falls back to a per-call hold
            log.error("grant_failed", user=grant.user, key_id=grant.key_id, error=str(exc), kind=type(exc).__name__)
        finally:
            grant.extending = None

    async def _grant(self, grant: _Grant, want: int, least: int) -> tuple[str, GrantState]:
        if grant.db_id is None:
            grant.db_id = GRANT_ID_PREFIX + self._new_id()
        grant_id = grant.db_id
        return grant_id, await self.ledger.grant(
            GrantRequest(
                grant_id=grant_id,
                key_id=grant.key_id,
                user=grant.user,
                developer=grant.developer,
                server=grant.server,
                want=want,
                least=least,
                share=self.policy.share,
                lease_s=self.lease_s,
                owner=self.owner,
            )
        )

    def _read_back(self, grant: _Grant, state: GrantState) -> None:
        """What the ledger said about the grant's user and key; low, revoked or over cap: per-call
        holds (for a refresh's while), and what is left of the grant goes back at the next flush."""
        grant.available, grant.spend_remaining = state.available, state.spend_remaining
        low = state.status in (GrantStatus.TOO_LOW, GrantStatus.REVOKED)
        low = low or (state.spend_remaining is not None and state.spend_remaining < 0)
        # Below what a new grant needs, a grant's leftover is worth more to exact per-call holds.
        if low or state.available < self.policy.share * self.policy.min_calls * grant.price:
            grant.low_until = self._clock() + self.policy.tick
            if grant.remaining:
                self._schedule_flush()

    def _lost(self, grant: _Grant, grant_id: str) -> None:
        """Row ``grant_id`` is no longer pending: spent to nothing, given back, or voided by the sweep
        after its lease lapsed. Whatever memory still counted on it is gone; calls queued on it are
        charged at their flush only if the balance still allows (``Grants.flush_grant``)."""
        if grant.db_id != grant_id:
            return  # the grant has moved on to a newer row already
        if grant.remaining:
            log.error("grant_lapsed", user=grant.user, key_id=grant.key_id, lost=grant.remaining)
        grant.remaining = 0
        grant.last_id = grant_id
        grant.db_id = None

    # --- writing captures -------------------------------------------------------------------------
    def _schedule_flush(self) -> asyncio.Task[None]:
        task = self._flush_task
        if task is None or task.done():
            task = self._flush_task = asyncio.get_running_loop().create_task(self._flush_soon())
            self._track(task)
        return task

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.policy.flush_s)
        self._flush_task = None  # captures from now on go to the next batch
        await self.flush()

    async def flush(self, *, release_all: bool = False) -> None:
        """Write every queued capture now, and give back what low grants (all grants, with
        ``release_all``) have left unreserved."""
        await asyncio.gather(*(self._flush_one(g, release_all) for g in list(self._grants.values())))

    async def _flush_one(self, grant: _Grant, release_all: bool) -> None:
        """Write the grant's queued captures, batch by batch. One flush of a grant at a time: what is
        captured meanwhile waits for it and goes in the next batch (a group commit: the batch grows
        with the ledger's latency instead of queueing one transaction per capture behind it)."""
        while grant.flushing:  # the flush in flight, then the one after it, writes what is queued now
            await grant.flushed.wait()
        grant.flushing += 1
        grant.flushed.clear()
        try:
            await self._flush_batches(grant, release_all)
        finally:
            grant.flushing -= 1
            grant.flushed.set()

    async def _flush_batches(self, grant: _Grant, release_all: bool) -> None:
        while True:
            low = release_all or self._clock() < grant.low_until
            release = grant.remaining if low else 0
            grant_id = grant.db_id or grant.last_id
            if grant_id is None or (not grant.unflushed and not release):
                return
            if grant.db_id is None:
                release = 0
            batch = grant.unflushed[: self.policy.max_batch]
            del grant.unflushed[: len(batch)]
            grant.remaining -= release  # gone from memory before the ledger hears of it
            try:
                result = await self.ledger.flush_grant(grant_id, batch, release=release)
            except Exception as exc:  # noqa: BLE001 - retried at the next flush; a crash loses the batch
                grant.attempts += 1
                log.error("grant_flush_failed", calls=len(batch), attempt=grant.attempts, error=str(exc))
                if grant.attempts >= _MAX_FLUSH_ATTEMPTS:
                    self._drop(batch, f"the ledger refused the batch {grant.attempts} times")
                else:
                    grant.unflushed[:0] = batch
                    asyncio.get_running_loop().call_later(
                        min(1.0, self.policy.flush_s * 2**grant.attempts), self._schedule_flush
                    )
                return
            grant.attempts = 0
            self.flushes += 1
            if result.unbilled:
                self.unbilled += len(result.unbilled)
                log.error("grant_captures_unbilled", calls=len(result.unbilled), reason="the grant had lapsed")
            if result.state.status is GrantStatus.CLOSED:
                self._lost(grant, grant_id)
            else:
                self._read_back(grant, result.state)
            if not grant.unflushed:
                return

    def _drop(self, batch: list[GrantedCall], why: str) -> None:
        self.unbilled += len(batch)
        log.error("grant_captures_unbilled", calls=len(batch), reason=why)

    # --- keeping grants honest --------------------------------------------------------------------
    async def maintain_forever(self) -> None:
        """Every tick: renew the grants' leases and read their keys and balances back; give back
        what idle grants hold."""
        while True:
            await asyncio.sleep(self.policy.tick)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any store failure
                log.error("grant_refresh_failed", error=str(exc), kind=type(exc).__name__)

    async def refresh(self) -> None:
        grants = [g for g in self._grants.values() if g.db_id is not None]
        ids = [g.db_id or "" for g in grants]
        epochs = [g.epoch for g in grants]
        states = await self.ledger.refresh_grants(ids, self.lease_s)
        now = self._clock()
        idle: list[_Grant] = []
        for grant, grant_id, epoch in zip(grants, ids, epochs, strict=True):
            if grant.epoch != epoch or grant.extending is not None:
                continue  # topped up (or being topped up) since the read: what it says is stale
            state = states.get(grant_id)
            if state is None or state.status is GrantStatus.CLOSED:
                self._lost(grant, grant_id)
                continue
            grant.lease_until = now + self.lease_s * 2 / 3
            self._read_back(grant, state)
            if not grant.busy and now - grant.last_used >= self.policy.idle_s:
                idle.append(grant)
        for grant in idle:
            await self.give_back(grant)
        for key, grant in list(self._grants.items()):  # forget grants with nothing left
            if grant.db_id is None and not grant.busy and grant.extending is None and not grant.remaining:
                del self._grants[key]

    async def give_back(self, grant: _Grant) -> None:
        """Return everything the grant's row has left, voiding it: only when nothing in memory
        depends on it (no call in flight, nothing queued or being written, no top-up running)."""
        grant_id = grant.db_id
        if grant_id is None or grant.busy or grant.extending is not None or grant.releasing:
            return
        grant.releasing = True
        grant.remaining = 0  # the row's whole amount goes back, whatever memory thought was left
        try:
            result = await self.ledger.flush_grant(grant_id, [], release=None)
        except Exception as exc:  # noqa: BLE001 - given back at the next idle tick, or swept after its lease
            log.error("grant_release_failed", error=str(exc), kind=type(exc).__name__)
            return
        finally:
            grant.releasing = False
        if result.state.status is GrantStatus.CLOSED:  # release=None always closes it
            self._lost(grant, grant_id)

    async def release_user(self, user: str) -> None:
        """Give back what this process's grants of ``user`` have left (a call of theirs was refused)."""
        for grant in [g for g in self._grants.values() if g.user == user]:
            grant.low_until = self._clock() + self.policy.tick
        await self.flush()
        for grant in [g for g in self._grants.values() if g.user == user and not g.busy]:
            await self.give_back(grant)

    async def close(self) -> None:
        """Drain: let running top-ups finish (a row one opens must be given back too), write every
        queued capture and give back every grant."""
        extending = [g.extending for g in self._grants.values() if g.extending is not None]
        await asyncio.gather(*extending, return_exceptions=True)
        await self.flush(release_all=True)
        for grant in list(self._grants.values()):
            await self.give_back(grant)

    @property
    def reserved(self) -> int:
        """Calls in flight held out of grants."""
        return len(self._calls)
