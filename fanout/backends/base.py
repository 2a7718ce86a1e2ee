"""The one small contract every backend implements.

A backend is one endpoint's link to the bus. An endpoint is a node or a ServerUtil; each has an
*inbox* address that only it receives (replies to its requests). The backend:

* ``connect(on_message)``: connects (fail-fast: raises :class:`BackendUnavailable` if the broker is not
  there), subscribes to the endpoint's inbox, then delivers every message received on any subscribed
  address to ``on_message(bytes)`` - in the order the broker delivered them, from one task. From then
  on it keeps itself connected: after a drop it reconnects with capped backoff, re-subscribes to
  exactly :attr:`subscriptions` (the set as it is *now*, including changes made while down), and calls
  every ``on_reconnect`` hook. ``healthy`` is False while the subscription is down.
* ``subscribe(addresses)`` / ``unsubscribe(addresses)``: change the wanted set. They return once the
  broker has confirmed the change (so a message published after that reaches us), or, while
  disconnected, at once: the change is applied on reconnect.
* ``publish_many([(address, message), ...])``: hands messages to the broker, in that order and with
  no other publish of this endpoint in between (a command published on several addresses must not
  be overtaken by a later one). Returns, per message, how many subscribers received it when the
  broker says so (Redis PUBLISH, memory), else ``None``. Raises :class:`BackendUnavailable` if the
  broker cannot take them within ``settings.publish_timeout``, and :class:`BackendError` if it
  refused. Concurrent calls may be pipelined, but keep their call order. ``publish(address,
  message)`` is the one-message case.
* ``close()``: leaves the broker cleanly; idempotent.

Every backend takes the same constructor: ``Backend(settings, inbox=endpoint_id)``.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import cast

from ..config import Settings
from ..naming import Address
from ..naming import inbox as inbox_address

log = logging.getLogger("fanout.backend")

MessageHandler = Callable[[bytes], None]
Hook = Callable[[], Awaitable[None] | None]

#: reconnect delays: start, factor, cap (seconds)
BACKOFF_START = 0.1
BACKOFF_FACTOR = 2.0
BACKOFF_CAP = 5.0


def backoff_delays(start: float = BACKOFF_START, cap: float = BACKOFF_CAP) -> Iterable[float]:
    """0.1, 0.2, 0.4, ... capped at ``cap``: the delays between reconnection attempts."""
    delay = start
    while True:
        yield delay
        delay = min(cap, delay * BACKOFF_FACTOR)


class Backend(abc.ABC):
    """Base class: keeps the wanted set, the hooks and the counters; subclasses do the I/O."""

    def __init__(self, settings: Settings, *, inbox: str) -> None:
        self.settings = settings
        self.inbox = inbox
        self.inbox_address = inbox_address(inbox)
        #: the addresses wanted now, inbox included; restored as-is after a reconnect
        self.subscriptions: set[Address] = {self.inbox_address}
        #: called (sync or async) after every successful reconnection, once subscriptions are back
        self.on_reconnect: list[Hook] = []
        #: called when the link is found down
        self.on_disconnect: list[Hook] = []
        self.reconnects = 0
        self.outages = 0

    # -- what subclasses implement ---------------------------------------------------------

    @abc.abstractmethod
    async def connect(self, on_message: MessageHandler) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, addresses: Iterable[Address]) -> None: ...

    @abc.abstractmethod
    async def unsubscribe(self, addresses: Iterable[Address]) -> None: ...

    @abc.abstractmethod
    async def publish_many(self, items: Sequence[tuple[Address, bytes]]) -> list[int | None]: ...

    async def publish(self, address: Address, message: bytes) -> int | None:
        """Publish one message; see :meth:`publish_many`."""
        (count,) = await self.publish_many([(address, message)])
        return count

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """True while connected with every wanted subscription in place."""

    # -- shared helpers ---------------------------------------------------------------------

    async def _fire(self, hooks: list[Hook], what: str) -> None:
        for hook in list(hooks):
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a broken hook must not stop reconnection; it is logged loudly
                log.exception("%s hook %r failed", what, hook)

    def describe(self) -> str:
        """For logs: backend, URL without its password, mode and inbox."""
        url, mode = self.settings.where, self.settings.mode
        return f"{type(self).__name__}({url!r}, mode={mode}, inbox={self.inbox!r})"


def fire_and_forget_guard(task: asyncio.Task[object]) -> None:
    """Done-callback for supervised background tasks: a crash is logged, never silent."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s died", task.get_name(), exc_info=task.exception())


def nodelay(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """``transport`` with ``TCP_NODELAY`` on (a small command must not wait for the next one)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return cast(asyncio.Transport, transport)  # (uvloop's are not asyncio subclasses)


__all__ = ["BACKOFF_CAP", "Backend", "Hook", "MessageHandler", "backoff_delays", "nodelay"]
