"""How one node serves its clients: :class:`NodeOptions`, from arguments or the ``FANOUT_*`` variables
(see the README's table)."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from fanout import events as events_module
from fanout.config import env_flag, env_number, validate_name
from fanout.events import EventKind
from fanout.exceptions import ConfigError

#: what a client whose event shard is full meets (FANOUT_EVENTS_POLICY): it waits, or is closed
POLICIES = ("pause", "close")


def default_node_id() -> str:
    """``<hostname>-<pid>``, made of the characters a node id may have."""
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:40] or "node"
    return f"{host}-{os.getpid()}"


def _origins(raw: str) -> frozenset[str] | None:
    items = frozenset(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    if not items or "*" in items:
        return None
    for origin in items:
        if "://" not in origin:
            raise ConfigError(
                "FANOUT_ALLOWED_ORIGINS", f"{origin!r} is not an origin (scheme://host[:port]) or '*'"
            )
    return items


def _write_delay(env: Mapping[str, str]) -> float:
    """FANOUT_WRITE_DELAY in seconds; at most 0.1 (beyond that it is a latency bug, not coalescing)."""
    delay = env_number(env, "FANOUT_WRITE_DELAY", 0.001, float)
    if delay > 0.1:
        raise ConfigError("FANOUT_WRITE_DELAY", f"{delay:g} s is more than 0.1 s")
    return delay


def _policy(raw: str) -> str:
    value = raw.strip().lower()
    if value not in POLICIES:
        raise ConfigError("FANOUT_EVENTS_POLICY", f"{raw!r} is not one of {', '.join(map(repr, POLICIES))}")
    return value


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """How one node serves its clients."""

    # -- identity and listening
    node_id: str = ""  #: stable name for logs/metrics; generated (host-pid) when empty
    host: str = "127.0.0.1"
    port: int = 8765
    reuse_port: bool = False  #: SO_REUSEPORT: several node processes share the port (``--processes``)
    # -- application
    app: str = ""  #: "module:attr"; the demo chat when empty
    welcome: bool = True  #: send {"type":"welcome","client_id":...} on connect
    compression: bool = True  #: accept permessage-deflate offers (node/deflate.py)
    # -- admission
    allowed_origins: frozenset[str] | None = None  #: browser origins accepted; None = any
    accept_rate: float = 500.0  #: new connections per second (bursts of as many); 0 = no limit
    handshake_timeout: float = 10.0  #: seconds a client has to complete the opening handshake
    # -- limits
    max_frame: int = 1024 * 1024  #: biggest frame a client may send; bigger ones close with 1009
    send_buffer: int = 1024 * 1024  #: bytes a connection may have waiting; over that it is cut off
    max_connections: int = 0  #: 0 = unlimited; over the limit, handshakes get HTTP 503
    client_rate: float = 100.0  #: frames per second from one client (bursts of twice); 0 = no limit
    #: seconds frames from the bus may wait so that later ones share their socket write; 0 = write at once
    write_delay: float = 0.001
    # -- the HTTP API
    api_key: str | None = field(default=None, repr=False)  #: turns the API on; its bearer key
    api_max_body: int = 1 << 20  #: biggest API request body, bytes (bigger: 413)
    # -- presence
    presence: str = ""  #: group-name patterns with presence (comma list, * = any run)
    presence_debounce: float = 3.0  #: seconds a flag must stay away from a group before its leave
    # -- the worker tier
    events: frozenset[EventKind] = frozenset()  #: client events forwarded to business workers
    event_shards: int = events_module.DEFAULT_SHARDS  #: shards the events are spread over
    events_backlog: int = 10_000  #: events one shard may hold waiting for workers
    events_policy: str = "pause"  #: what a client whose shard is full meets: "pause" or "close"
    # -- keepalive
    ping_interval: float = 20.0
    ping_timeout: float = 20.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NodeOptions:
        env = os.environ if environ is None else environ
        port = env_number(env, "FANOUT_PORT", 8765, int)
        if port > 65535:
            raise ConfigError("FANOUT_PORT", f"{port} is not a TCP port (0-65535)")
        return cls(
            node_id=validate_name(env["FANOUT_NODE_ID"], "FANOUT_NODE_ID")
            if env.get("FANOUT_NODE_ID")
            else "",
            host=env.get("FANOUT_HOST") or "127.0.0.1",
            port=port,
            app=env.get("FANOUT_APP", ""),
            welcome=env_flag(env, "FANOUT_WELCOME", True),
            compression=env_flag(env, "FANOUT_COMPRESSION", True),
            allowed_origins=_origins(env.get("FANOUT_ALLOWED_ORIGINS") or "*"),
            accept_rate=env_number(env, "FANOUT_ACCEPT_RATE", 500.0, float),
            handshake_timeout=env_number(env, "FANOUT_HANDSHAKE_TIMEOUT", 10.0, float, positive=True),
            max_frame=env_number(env, "FANOUT_MAX_FRAME", 1024 * 1024, int),
            send_buffer=env_number(env, "FANOUT_SEND_BUFFER", 1024 * 1024, int),
            max_connections=env_number(env, "FANOUT_MAX_CONNECTIONS", 0, int),
            client_rate=env_number(env, "FANOUT_CLIENT_RATE", 100.0, float),
            write_delay=_write_delay(env),
            api_key=env.get("FANOUT_API_KEY") or None,
            api_max_body=env_number(env, "FANOUT_API_MAX_BODY", 1 << 20, int, positive=True),
            presence=env.get("FANOUT_PRESENCE", ""),
            presence_debounce=env_number(env, "FANOUT_PRESENCE_DEBOUNCE", 3.0, float),
            events=events_module.parse_kinds(env.get("FANOUT_EVENTS", "")),
            event_shards=env_number(
                env, "FANOUT_EVENT_SHARDS", events_module.DEFAULT_SHARDS, int, positive=True
            ),
            events_backlog=env_number(env, "FANOUT_EVENTS_BACKLOG", 10_000, int, positive=True),
            events_policy=_policy(env.get("FANOUT_EVENTS_POLICY") or "pause"),
            ping_interval=env_number(env, "FANOUT_PING_INTERVAL", 20.0, float),
            ping_timeout=env_number(env, "FANOUT_PING_TIMEOUT", 20.0, float),
        )
