"""Prometheus metrics, on a registry of the server's own (so two servers in one process,
as in tests, never share counters).

The exposition leaves out the ``<name>_created`` series prometheus_client adds for each
counter and histogram (and each of their label sets): one more series per metric that no
dashboard reads, the time the counter was made. It drops them as it renders
(:class:`_WithoutCreated`), not with ``prometheus_client.disable_created_metrics()``, which
would switch them off for every other user of the library in the process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from .rpc import ERROR_NAMES


@attrs.define(eq=False)
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))
    connections: Gauge = attrs.field(init=False)
    sessions: Gauge = attrs.field(init=False)
    workers: Gauge = attrs.field(init=False)
    prompts: Counter = attrs.field(init=False)
    prompt_latency: Histogram = attrs.field(init=False)
    messages_in: Counter = attrs.field(init=False)
    messages_out: Counter = attrs.field(init=False)
    errors: Counter = attrs.field(init=False)
    # prompts.labels(stop_reason) children, looked up once per stop reason, not per prompt.
    _prompts_by_stop: dict[str, Counter] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.connections = Gauge("punie_connections", "Open ACP connections", registry=r)
        self.sessions = Gauge("punie_sessions", "Live ACP sessions", registry=r)
        self.workers = Gauge("punie_workers", "Running project workers", registry=r)
        self.prompts = Counter(
            "punie_prompts", "Finished prompt turns by stop reason", ["stop_reason"], registry=r
        )
        self.prompt_latency = Histogram(
            "punie_prompt_latency_seconds",
            "session/prompt latency, request to response",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.messages_in = Counter("punie_messages_in", "JSON-RPC messages received", registry=r)
        self.messages_out = Counter("punie_messages_out", "JSON-RPC messages sent", registry=r)
        self.errors = Counter(
            "punie_errors", "JSON-RPC error responses sent, by code", ["code", "name"], registry=r
        )

    def track(
        self,
        connections: Callable[[], int],
        sessions: Callable[[], int],
        workers: Callable[[], int],
    ) -> None:
        """Read the live gauges from the manager at scrape time."""
        self.connections.set_function(connections)
        self.sessions.set_function(sessions)
        self.workers.set_function(workers)

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))

    def prompt_done(self, stop_reason: str, seconds: float) -> None:
        """Count a finished turn and observe its latency."""
        counter = self._prompts_by_stop.get(stop_reason)
        if counter is None:
            counter = self._prompts_by_stop[stop_reason] = self.prompts.labels(
                stop_reason=stop_reason
            )
        counter.inc()
        self.prompt_latency.observe(seconds)

    # PeerObserver
    def message_in(self) -> None:
        self.messages_in.inc()

    def message_out(self, count: int = 1) -> None:
        self.messages_out.inc(count)

    def error_sent(self, code: int) -> None:
        self.errors.labels(code=str(code), name=ERROR_NAMES.get(code, "other")).inc()


@attrs.frozen
class _WithoutCreated:
    """A registry's metrics without their ``_created`` samples (a ``Collector``)."""

    registry: CollectorRegistry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            created = metric.name + "_created"
            # Each collect() builds its Metric objects afresh: changing them is safe.
            metric.samples = [sample for sample in metric.samples if sample.name != created]
            yield metric
