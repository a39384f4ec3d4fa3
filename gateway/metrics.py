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

    def track_pending(self, count: Callable[[], int]) -> None:
        self.pending_holds.set_function(lambda: float(count()))

    def set_price_digest(self, digest: str) -> None:
        self.price_table.clear()
        self.price_table.labels(digest=digest).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
