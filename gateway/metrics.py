"""Prometheus metrics, in a registry owned by one application (no global collectors)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "agentpay_requests",
            "MCP requests handled, by server, JSON-RPC method and outcome",
            ["server", "method", "outcome"],
            registry=self.registry,
        )
        self.charges = Counter("agentpay_charges", "Captured charges by server", ["server"], registry=self.registry)
        self.charged_millicents = Counter(
            "agentpay_charged_millicents",
            "Amount captured, in millicents (1/1000 cent), by server",
            ["server"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "agentpay_payment_refusals",
            "Calls refused for insufficient balance or spending cap, by server and reason",
            ["server", "reason"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "agentpay_upstream_seconds",
            "Time from forwarding a request to the upstream's response headers",
            ["server"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.pending_holds = Gauge(
            "agentpay_pending_holds", "Holds this process placed and has not settled", registry=self.registry
        )
        self.price_table = Gauge(
            "agentpay_price_table_info",
            "The price table in force (1 for its digest)",
            ["digest"],
            registry=self.registry,
        )
        self.stdio_processes = Gauge(
            "agentpay_stdio_processes",
            "Child processes of stdio servers the gateway runs (sessions, warm, shared), by server",
            ["server"],
            registry=self.registry,
        )
        self.stdio_sessions = Gauge(
            "agentpay_stdio_sessions", "Open sessions of stdio servers, by server", ["server"], registry=self.registry
        )
        # Counts made on the request path are kept as plain integers and added to the counters above
        # when the metrics are rendered (the only way they are read, so a scrape sees every count):
        # ``labels(...).inc()`` validates and takes a lock each time, a dict update does not. Label
        # sets are bounded (servers from the config, known methods, a fixed set of outcomes).
        self._request_counts: dict[tuple[str, str, str], int] = {}
        self._charge_counts: dict[str, list[int]] = {}  # server -> [charges, millicents]
        self._latency: dict[str, Histogram] = {}  # server -> its histogram child

    def count_request(self, server: str, method: str, outcome: str) -> None:
        key = (server, method, outcome)
        self._request_counts[key] = self._request_counts.get(key, 0) + 1

    def count_charge(self, server: str, millicents: int) -> None:
        counts = self._charge_counts.get(server)
        if counts is None:
            counts = self._charge_counts[server] = [0, 0]
        counts[0] += 1
        counts[1] += millicents

    def observe_upstream(self, server: str, seconds: float) -> None:
        child = self._latency.get(server)
        if child is None:
            child = self._latency[server] = self.upstream_latency.labels(server=server)
        child.observe(seconds)

    def _add_counts(self) -> None:
        requests, self._request_counts = self._request_counts, {}
        for (server, method, outcome), count in requests.items():
            self.requests.labels(server=server, method=method, outcome=outcome).inc(count)
        charges, self._charge_counts = self._charge_counts, {}
        for server, (count, millicents) in charges.items():
            self.charges.labels(server=server).inc(count)
            self.charged_millicents.labels(server=server).inc(millicents)

    def track_pending(self, count: Callable[[], int]) -> None:
        self.pending_holds.set_function(lambda: float(count()))

    def track_stdio(self, server: str, processes: Callable[[], int], sessions: Callable[[], int]) -> None:
        """Read a stdio server's counts of children and sessions when the metrics are rendered."""
        self.stdio_processes.labels(server=server).set_function(lambda: float(processes()))
        self.stdio_sessions.labels(server=server).set_function(lambda: float(sessions()))

    def set_price_digest(self, digest: str) -> None:
        self.price_table.clear()
        self.price_table.labels(digest=digest).set(1)

    def render(self) -> bytes:
        self._add_counts()
        return generate_latest(self.registry)
