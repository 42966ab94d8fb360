"""Prometheus metrics, on a registry of the server's own (so two servers in one process,
as in tests, never share counters).

What the hub, the connection layer and the store count for an operator (refusals, limits
hit, store failures) are plain integers (:class:`Tallies`), rendered as counters at scrape
time (:class:`_TalliesCollector`): an increment is all they cost where they happen, never
a ``Counter.inc()`` (a lock and a float), and nothing is added to a turn's path. The
gauges of the manager's state (connections, sessions, those held within grace, workers)
and the store's size are read at scrape time too.

The exposition leaves out the ``<name>_created`` series prometheus_client adds for each
counter and histogram (and each of their label sets): one more series per metric that no
dashboard reads, the time the counter was made. It drops them as it renders
(:class:`_WithoutCreated`), not with ``prometheus_client.disable_created_metrics()``, which
would switch them off for every other user of the library in the process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .acp import STOP_REASONS
from .rpc import ERROR_NAMES

#: The limits ``punie_limits_hit_total`` counts, by the option that sets each (what
#: hitting it does: docs/security.md, "Limits").
LIMITS = (
    "max_message_bytes",
    "max_prompt_bytes",
    "max_sessions_per_connection",
    "max_connections",
    "prompts_per_minute",
    "tool_calls_per_minute",
    "outbox",
    "detached_buffer",
    "concurrent_requests",
)
#: The refusals ``punie_upgrades_refused_total`` counts: (status, reason).
UPGRADE_REFUSALS = (
    (400, "bad_handshake"),
    (401, "token"),
    (403, "host"),
    (403, "origin"),
    (404, "not_found"),
    (503, "shutting_down"),
    (503, "full"),
)
#: The refusals of plain HTTP requests ``punie_http_refused_total`` counts.
HTTP_REFUSALS = ((401, "token"), (403, "host"))
#: What ``punie_store_failures_total`` counts a failed store operation under: the writes
#: (a turn's transcript, a new session, a session's roots, a delete), and every read.
STORE_OPERATIONS = ("turn", "create_session", "update_session", "delete_session", "read")


@attrs.define(eq=False)
class Tallies:
    """Counts of rare events, as plain integers (see the module docstring): each is
    ``tallies.field[key] += 1`` where it happens, rendered at scrape time. Every key is
    there from the start, so each series is 0 until its first event (a ``rate()`` over
    a series that appears only with its first event misses that event)."""

    limits: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(LIMITS, 0))
    upgrades_refused: dict[tuple[int, str], int] = attrs.field(
        factory=lambda: dict.fromkeys(UPGRADE_REFUSALS, 0)
    )
    http_refused: dict[tuple[int, str], int] = attrs.field(
        factory=lambda: dict.fromkeys(HTTP_REFUSALS, 0)
    )
    store_failures: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(STORE_OPERATIONS, 0))
    #: Turns whose model raised (answered -32603 "the model failed").
    model_failures: int = 0


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
    tallies: Tallies = attrs.field(factory=Tallies)
    # prompts.labels(stop_reason) children, looked up once per stop reason, not per prompt.
    _prompts_by_stop: dict[str, Counter] = attrs.field(init=False, factory=dict)
    # Read at scrape time (track): sessions held for clients away, clients away, and the
    # session store's size on disk in bytes (None: no file, the memory store).
    _in_grace: Callable[[], tuple[int, int]] = attrs.field(init=False, default=lambda: (0, 0))
    _store_bytes: Callable[[], int | None] = attrs.field(init=False, default=lambda: None)

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
        # Every labelled series from the start, at 0 (as the tallies): one that appears
        # only with its first event is missed by a rate() over it. The stop reasons are
        # ACP's five, the codes those the server sends; an unknown code still gets its
        # series ("other") when first sent.
        for stop_reason in sorted(STOP_REASONS):
            self._prompts_by_stop[stop_reason] = self.prompts.labels(stop_reason=stop_reason)
        for code, name in ERROR_NAMES.items():
            self.errors.labels(code=str(code), name=name)
        r.register(_TalliesCollector(self))

    def track(
        self,
        connections: Callable[[], int],
        sessions: Callable[[], int],
        workers: Callable[[], int],
        in_grace: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        """Read the live gauges from the manager at scrape time; ``in_grace``: the
        sessions held for clients away within their grace period, and those clients."""
        self.connections.set_function(connections)
        self.sessions.set_function(sessions)
        self.workers.set_function(workers)
        if in_grace is not None:
            self._in_grace = in_grace

    def track_store(self, size: Callable[[], int | None]) -> None:
        """Read the session store's size on disk at scrape time (None: no file)."""
        self._store_bytes = size

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

    def limit_hit(self, limit: str) -> None:
        self.tallies.limits[limit] += 1


def store_bytes(path: str | os.PathLike[str]) -> int | None:
    """(Read at scrape time.) The SQLite store at ``path`` on disk: the database and its
    WAL (which holds the commits not yet checkpointed into it), in bytes; None if there
    is no database file. Two ``stat()`` calls, on the event loop: the store is on a
    local disk (SQLite's WAL mode does not work over a network file system)."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return None
    try:
        size += os.stat(f"{os.fspath(path)}-wal").st_size
    except OSError:
        pass
    return size


@attrs.frozen
class _TalliesCollector:
    """The scrape-time metrics of a :class:`Metrics`: its tallies as counters, and the
    gauges read when scraped (a ``Collector``). No ``describe``: the registry calls
    ``collect`` for the names at registration (``auto_describe``), which is cheap here."""

    metrics: Metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        sessions, clients = m._in_grace()
        yield GaugeMetricFamily(
            "punie_sessions_in_grace",
            "Live sessions held for a client away within its grace period",
            value=sessions,
        )
        yield GaugeMetricFamily(
            "punie_clients_in_grace",
            "Clients away within their grace period (their sessions held)",
            value=clients,
        )
        tallies = m.tallies
        yield _labelled(
            "punie_upgrades_refused",
            "WebSocket upgrades refused before the ACP connection, by status and reason",
            ["status", "reason"],
            {(str(status), reason): n for (status, reason), n in tallies.upgrades_refused.items()},
        )
        yield _labelled(
            "punie_http_refused",
            "HTTP requests refused by the token or Host check, by status and reason",
            ["status", "reason"],
            {(str(status), reason): n for (status, reason), n in tallies.http_refused.items()},
        )
        yield _labelled(
            "punie_limits_hit",
            "Times a configured limit was hit, by limit",
            ["limit"],
            {(limit,): n for limit, n in tallies.limits.items()},
        )
        yield _labelled(
            "punie_store_failures",
            "Session store operations that failed (a turn not saved, ...), by operation",
            ["operation"],
            {(operation,): n for operation, n in tallies.store_failures.items()},
        )
        yield CounterMetricFamily(
            "punie_model_failures",
            "Turns whose model failed (answered with an error, counted in punie_prompts "
            "under the stop reason they were recorded with)",
            value=tallies.model_failures,
        )
        size = m._store_bytes()
        if size is not None:
            yield GaugeMetricFamily(
                "punie_store_bytes",
                "Size of the session store on disk (the database and its WAL)",
                value=size,
            )


def _labelled(
    name: str, documentation: str, labels: list[str], counts: dict[tuple[str, ...], int]
) -> CounterMetricFamily:
    """A counter family of one series for each label values in ``counts``."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in counts.items():
        family.add_metric(list(values), count)
    return family


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
