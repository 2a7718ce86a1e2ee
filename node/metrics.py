"""A node's metrics: plain counters on the hot path, exposed through ``prometheus-client`` at scrape time.

The delivery path only bumps ints (no locks, no label lookups: the node is one event loop, and the
frame counters are bumped once per command, not per frame). :class:`NodeCollector` turns them into
Prometheus metric families when ``/metrics`` is scraped, so values are exact and label values escaped by
the library.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from fanout.receive import LagHistogram


@dataclass
class Metrics:
    connections_opened: int = 0
    connections_closed: int = 0
    connections_refused: int = 0  #: over max_connections
    accept_rate_refusals: int = 0  #: over FANOUT_ACCEPT_RATE
    origin_refusals: int = 0  #: a browser Origin not in FANOUT_ALLOWED_ORIGINS
    admission_rejects: Counter[str] = field(default_factory=Counter)  #: on_connect refusals, by status
    admission_errors: int = 0  #: on_connect raised something else than Reject (refused with 500)
    handshake_timeouts: int = 0  #: handshakes not done within FANOUT_HANDSHAKE_TIMEOUT
    handshake_floods: int = 0  #: clients that sent more than a frame's worth before their handshake was done
    slow_disconnects: int = 0  #: clients cut off because their send buffer was full
    ping_flood_disconnects: int = 0  #: clients cut off for owing too many unread automatic replies
    rate_limit_closes: int = 0  #: clients closed (1008) for sending over FANOUT_CLIENT_RATE
    events_policy_closes: int = 0  #: clients closed (1013) because their events could not go (policy close)
    frames_sent: int = 0
    bytes_sent: int = 0
    bus_batches: int = 0  #: groups of bus commands applied together (what arrived in one loop pass)
    bus_batch_commands: int = 0  #: commands in those groups (commands / batches = coalescing on the bus)
    delivery_writes: int = 0  #: socket writes that carried frames from the bus (frames / writes = coalescing)
    client_messages: int = 0  #: frames received from clients
    app_errors: int = 0  #: exceptions raised by application hooks
    reply_failures: int = 0  #: replies the backend did not take
    # continuity (node/continuity.py)
    history_reads: int = 0  #: reads of missed entries from the store (positioning)
    insufficient_state_closes: int = 0  #: fanout.v1 clients closed with 3010 (their stream lost entries)
    missed_by_raw: int = 0  #: raw clients of a stream that lost entries before they were delivered
    resumes: int = 0  #: resumes that restored a connection's state
    resumes_refused: int = 0  #: resumes with an unknown, expired, used or other user's token
    commands: Counter[str] = field(default_factory=Counter)  #: commands applied, by op
    #: bus messages dropped, by reason (the node's Receiver counts into this same Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    gauges: dict[str, tuple[str, Callable[[], float]]] = field(default_factory=dict)
    #: extra labelled counters: name -> (help, label, counts)
    counters: dict[str, tuple[str, str, Counter[str]]] = field(default_factory=dict)
    #: publish -> apply lag (the node's Receiver observes into it)
    lag: LagHistogram = field(default_factory=LagHistogram)

    def count_frames(self, frames: int, size: int) -> None:
        self.frames_sent += frames
        self.bytes_sent += size

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def labelled(self, name: str, help_text: str, label: str, counts: Counter[str]) -> None:
        self.counters[name] = (help_text, label, counts)

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeCollector(self))
        return registry


_COUNTERS = (
    ("fanout_connections_opened", "Websocket connections accepted.", "connections_opened"),
    ("fanout_connections_closed", "Websocket connections ended.", "connections_closed"),
    ("fanout_connections_refused", "Handshakes refused over FANOUT_MAX_CONNECTIONS.", "connections_refused"),
    ("fanout_accept_rate_refusals", "Handshakes refused over FANOUT_ACCEPT_RATE.", "accept_rate_refusals"),
    ("fanout_origin_refusals", "Handshakes refused for an Origin not allowed.", "origin_refusals"),
    ("fanout_admission_errors", "on_connect failures (refused with 500).", "admission_errors"),
    ("fanout_handshake_timeouts", "Handshakes cut short by FANOUT_HANDSHAKE_TIMEOUT.", "handshake_timeouts"),
    (
        "fanout_handshake_floods",
        "Clients cut off for sending more than FANOUT_MAX_FRAME before their handshake was done.",
        "handshake_floods",
    ),
    ("fanout_slow_client_disconnects", "Clients disconnected for a full send buffer.", "slow_disconnects"),
    (
        "fanout_ping_flood_disconnects",
        "Clients disconnected for not reading the replies they asked for (ping flood).",
        "ping_flood_disconnects",
    ),
    (
        "fanout_rate_limit_closes",
        "Clients closed (1008) for sending over FANOUT_CLIENT_RATE.",
        "rate_limit_closes",
    ),
    (
        "fanout_events_policy_closes",
        "Clients closed (1013) because their events could not go to the workers.",
        "events_policy_closes",
    ),
    ("fanout_frames_sent", "Data frames written to clients.", "frames_sent"),
    ("fanout_bus_batches", "Groups of bus commands applied together.", "bus_batches"),
    ("fanout_bus_batch_commands", "Bus commands applied, counted in their groups.", "bus_batch_commands"),
    ("fanout_delivery_writes", "Socket writes carrying frames from the bus.", "delivery_writes"),
    ("fanout_bytes_sent", "Bytes of data frames written to clients.", "bytes_sent"),
    ("fanout_client_messages", "Messages received from clients.", "client_messages"),
    ("fanout_app_errors", "Exceptions raised by application hooks.", "app_errors"),
    ("fanout_reply_failures", "Replies the backend did not accept.", "reply_failures"),
    ("fanout_history_reads", "Reads of missed history entries from the store.", "history_reads"),
    (
        "fanout_insufficient_state_closes",
        "fanout.v1 clients closed with 3010: their stream lost entries before they were delivered.",
        "insufficient_state_closes",
    ),
    (
        "fanout_missed_by_raw_clients",
        "Raw clients of a history stream that lost entries before they were delivered.",
        "missed_by_raw",
    ),
    ("fanout_resumes", "Resumes that restored a connection's state.", "resumes"),
    (
        "fanout_resumes_refused",
        "Resumes whose token was unknown, expired, used or another user's.",
        "resumes_refused",
    ),
)


class NodeCollector(Collector):
    """Reads a node's :class:`Metrics` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        m = self.metrics
        for name, help_text, attribute in _COUNTERS:
            yield CounterMetricFamily(name, help_text, value=getattr(m, attribute))
        yield _labelled("fanout_commands", "Bus commands applied, by op.", "op", m.commands)
        yield _labelled("fanout_commands_dropped", "Bus messages dropped, by reason.", "reason", m.dropped)
        yield _labelled(
            "fanout_admission_rejects",
            "Handshakes on_connect refused, by HTTP status.",
            "status",
            m.admission_rejects,
        )
        for name, (help_text, label, counts) in m.counters.items():
            yield _labelled(name, help_text, label, counts)
        for name, (help_text, read) in m.gauges.items():
            if name.endswith("_total"):
                yield CounterMetricFamily(name.removesuffix("_total"), help_text, value=read())
            else:
                yield GaugeMetricFamily(name, help_text, value=read())
        lag = m.lag
        yield HistogramMetricFamily(
            "fanout_bus_lag_seconds",
            "Time from a publisher's publish to the node's apply (publisher clock to node clock).",
            buckets=[(_bound(b), float(n)) for b, n in lag.cumulative()],
            sum_value=lag.total,
        )


def _labelled(name: str, help_text: str, label: str, counts: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], n)
    return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
