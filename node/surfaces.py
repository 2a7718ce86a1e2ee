"""What a part of the node needs from another, as small Protocols, so that a part is typed against what
it uses instead of importing the module that builds it (no import circle). The
:class:`~node.node.Node`, the :class:`~node.hub.Hub`, the :class:`~node.lanes.Lanes` and the
:class:`~node.connection.Connection` satisfy them as they are: they are checked structurally.

Who sees whom: the hub delivers to connections through :class:`Outlet`; a connection reaches the hub
through :class:`ConnectionHub`, its lane through :class:`ConnectionLanes`, and hands the application
the node as :class:`AppNode` (``conn.node``); the HTTP side sees the node as :class:`HttpHost`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from fanout.admission import Admit, ConnectRequest
    from fanout.backends.base import Backend
    from fanout.commands import Send
    from fanout.config import Settings
    from fanout.protocol import Encoder
    from fanout.serverutil import ServerUtil
    from fanout.table import Change, ConnectionTable

    from .api import Api
    from .frames import Frame
    from .metrics import Metrics
    from .options import NodeOptions
    from .v1 import Resume
    from .wire import Wire

#: a connection, as the part handed this surface knows it (only passed in, hence contravariant)
Conn = TypeVar("Conn", contravariant=True)


class ForwardedClient(Protocol):
    """A connection, as the worker tier's forwarder (:mod:`node.events`) makes its events."""

    client_id: str
    event_seq: int  #: events forwarded so far (the forwarder numbers the next)

    @property
    def open(self) -> bool: ...

    @property
    def request(self) -> ConnectRequest: ...

    @property
    def session(self) -> dict[str, Any]: ...

    @property
    def session_version(self) -> int: ...

    def identity(self) -> tuple[str | None, frozenset[str]]: ...


class EventsHost(Protocol):
    """The node, as the worker tier's forwarder (:mod:`node.events`) uses it."""

    @property
    def instance(self) -> str: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def table(self) -> ConnectionTable[Any]: ...


class PresenceEvents(Protocol):
    """Where presence transitions go for the workers (the forwarder)."""

    def presence(self, group: str, flag: str, change: str) -> None: ...


class PresenceHost(EventsHost, Protocol):
    """The node, as its presence side (:mod:`node.presence`) uses it."""

    @property
    def backend(self) -> Backend: ...

    @property
    def util(self) -> ServerUtil: ...

    @property
    def encoder(self) -> Encoder: ...

    @property
    def started_at(self) -> float: ...

    @property
    def events(self) -> PresenceEvents | None: ...


class StreamMember(Protocol):
    """A connection, as continuity (:mod:`node.continuity`) sees it: whether it speaks fanout.v1, its
    history streams, the offsets it has up to (``floor``), the sends held for it and by how many holders,
    its token."""

    client_id: str
    v1: bool
    streams: frozenset[str]
    floor: dict[str, int] | None
    held: list[tuple[Send, tuple[str, ...] | None]] | None
    holds: int
    token: str | None
    resumed: bool

    @property
    def open(self) -> bool: ...

    @property
    def session(self) -> dict[str, Any]: ...

    def push(self, frame: Frame, batch: list[Flushable] | None = None) -> bool: ...

    def start_close(self, code: int = ..., reason: str = ...) -> None: ...

    def identity(self) -> tuple[str | None, frozenset[str]]: ...


class ContinuitySide(Protocol):
    """Continuity (:mod:`node.continuity`), as the lanes and the hub use it."""

    async def welcome(self, conn: Any) -> Frame: ...

    def release(self, conn: Any) -> None: ...

    async def refresh(
        self, conn: Any, *, announce: bool = True, cache: bool = True
    ) -> dict[str, tuple[str, int]]: ...

    async def send_cached(self, conn: Any, streams: Iterable[str]) -> None: ...

    async def resume(
        self, conn: Any, request: Resume, restore: Callable[[Any, dict[str, Any]], Any]
    ) -> str | None: ...


class Flushable(Protocol):
    """A connection holding frames of a batch, as the hub's list of them sees it."""

    def flush(self) -> None: ...


class Outlet(ForwardedClient, StreamMember, Protocol):
    """A connection, as the hub delivers to it: one frame at a time (``push``: written, or held in the
    batch the hub passes, which the connection then joins), closes, the table's bookkeeping."""

    session_version: int  #: the hub counts the session changes it applies
    wire: Wire

    @property
    def close_code(self) -> int: ...

    @property
    def opened_at(self) -> float: ...

    def push(self, frame: Frame, batch: list[Flushable] | None = None) -> bool: ...

    def flush(self) -> None: ...

    def start_close(self, code: int = ..., reason: str = ...) -> None: ...

    def keep_last_state(self) -> None: ...


class LaneConnection(ForwardedClient, StreamMember, Protocol):
    """A connection, as its lane (:mod:`node.lanes`) runs its opening, messages and close."""

    forwarded: bool  #: whether the worker tier was told of it (it then gets its close event)

    @property
    def close_code(self) -> int: ...

    @property
    def close_reason(self) -> str: ...

    def push(self, frame: Frame, batch: list[Flushable] | None = None) -> bool: ...

    def start_close(self, code: int = ..., reason: str = ...) -> None: ...

    async def wait_closed(self) -> None: ...

    def queue(self, message: str | bytes | Resume) -> None: ...

    def next_message(self) -> str | bytes | Resume | None: ...

    def lane_done(self) -> bool: ...


class ConnectionHub(Protocol[Conn]):
    """The hub, as a connection uses it: the table, the metrics, membership changes."""

    @property
    def table(self) -> ConnectionTable[Any]: ...

    @property
    def metrics(self) -> Metrics: ...

    def forget(self, conn: Conn) -> None: ...

    def flag_changed(self, conn: Conn) -> None: ...

    async def apply_change(self, change: Change, conn: Conn | None = None) -> None: ...

    @property
    def continuity(self) -> ContinuitySide | None: ...

    @property
    def util(self) -> ServerUtil: ...

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None: ...


class ConnectionLanes(Protocol[Conn]):
    """The lanes, as a connection hands them its messages and its end."""

    def received(self, conn: Conn, message: str | bytes) -> None: ...

    def start_lane(self, conn: Conn, admit: Admit | None, *, opening: bool) -> asyncio.Task[None]: ...

    def lost(self, conn: Conn) -> None: ...


class AppNode(Protocol):
    """The node, as a connection hands it to the application (``conn.node``)."""

    @property
    def options(self) -> NodeOptions: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def util(self) -> ServerUtil: ...

    @property
    def backend(self) -> Backend: ...

    @property
    def instance(self) -> str: ...


class HttpHost(AppNode, Protocol):
    """The node, as its HTTP side (:mod:`node.http`) answers requests and opens websockets."""

    @property
    def app(self) -> Any: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def table(self) -> ConnectionTable[Any]: ...

    @property
    def api(self) -> Api: ...

    @property
    def serving(self) -> bool: ...

    @property
    def early_limit(self) -> int: ...

    @property
    def handshaking(self) -> set[Any]: ...

    def opened(
        self,
        transport: asyncio.Transport,
        request: ConnectRequest,
        admit: Admit | None,
        early: bytes,
        deflate: int = 0,
        v1: bool = False,
    ) -> None: ...
