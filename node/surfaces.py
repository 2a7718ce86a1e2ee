"""What a part of the node needs from another, as small Protocols, so that a part is typed against what
it uses instead of importing the module that builds it (no import circle). The :class:`~node.node.Node`
and :class:`~node.connection.Connection` satisfy them as they are: they are checked structurally."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fanout.admission import ConnectRequest
    from fanout.backends.base import Backend
    from fanout.config import Settings
    from fanout.protocol import Encoder
    from fanout.serverutil import ServerUtil
    from fanout.table import ConnectionTable


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
