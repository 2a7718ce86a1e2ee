"""Prometheus text exposition for one node, without a client library.

Counters are plain ints bumped on the delivery path (no locks: the node is one event loop); gauges are
read at scrape time. The format is Prometheus' text format 0.0.4.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Metrics:
    connections_opened: int = 0
    connections_closed: int = 0
    connections_refused: int = 0  #: over max_connections
    slow_disconnects: int = 0  #: clients cut off because their send buffer was full
    frames_sent: int = 0
    bytes_sent: int = 0
    client_messages: int = 0  #: frames received from clients
    app_errors: int = 0  #: exceptions raised by application hooks
    reply_failures: int = 0  #: replies the backend did not take
    commands: Counter[str] = field(default_factory=Counter)  #: commands applied, by op
    dropped: Counter[str] = field(default_factory=Counter)  #: bus messages dropped, by reason
    gauges: dict[str, tuple[str, Callable[[], float]]] = field(default_factory=dict)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        counters = [
            ("fanout_connections_opened_total", "Websocket connections accepted.", self.connections_opened),
            ("fanout_connections_closed_total", "Websocket connections ended.", self.connections_closed),
            (
                "fanout_connections_refused_total",
                "Connections refused (max_connections).",
                self.connections_refused,
            ),
            (
                "fanout_slow_client_disconnects_total",
                "Clients disconnected for a full send buffer.",
                self.slow_disconnects,
            ),
            ("fanout_frames_sent_total", "Data frames written to clients.", self.frames_sent),
            ("fanout_bytes_sent_total", "Bytes of data frames written to clients.", self.bytes_sent),
            ("fanout_client_messages_total", "Messages received from clients.", self.client_messages),
            ("fanout_app_errors_total", "Exceptions raised by application hooks.", self.app_errors),
            ("fanout_reply_failures_total", "Replies the backend did not accept.", self.reply_failures),
        ]
        for name, help_text, value in counters:
            metric(name, "counter", help_text, [("", value)])
        metric(
            "fanout_commands_total",
            "counter",
            "Bus commands applied, by op.",
            [(f'{{op="{op}"}}', n) for op, n in sorted(self.commands.items())],
        )
        metric(
            "fanout_commands_dropped_total",
            "counter",
            "Bus messages dropped, by reason.",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(self.dropped.items())],
        )
        for name, (help_text, read) in self.gauges.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            metric(name, kind, help_text, [("", read())])
        return "\n".join(lines) + "\n"
