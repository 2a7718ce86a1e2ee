"""In-process backend: the embedded default for one node, and the fake bus for tests.

Every backend with the same URL (``memory://`` or ``memory://<name>``) in one process shares one hub,
so several nodes and ServerUtils can run in one process, even on different event loops (threads).
Delivery is in publish order, exact receiver counts are returned, and nothing is copied.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence

from ..config import Settings
from ..exceptions import NotConnected
from ..naming import ALL, Address
from .base import Backend, MessageHandler


class MemoryHub:
    """The in-process broker: address -> subscribed backends."""

    _hubs: dict[str, MemoryHub] = {}
    _hubs_lock = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.subscribers: dict[Address, set[MemoryBackend]] = {}

    @classmethod
    def named(cls, url: str) -> MemoryHub:
        with cls._hubs_lock:
            hub = cls._hubs.get(url)
            if hub is None:
                hub = cls._hubs[url] = MemoryHub()
            return hub

    def serves_nodes(self) -> bool:
        """Whether a node runs on this hub (nodes, and only nodes, subscribe to ``all``)."""
        with self._lock:
            return bool(self.subscribers.get(ALL))

    def publish(self, address: Address, message: bytes) -> int:
        with self._lock:
            receivers = tuple(self.subscribers.get(address, ()))
        for backend in receivers:
            backend.deliver(message)
        return len(receivers)

    def add(self, backend: MemoryBackend, addresses: Iterable[Address]) -> None:
        with self._lock:
            for address in addresses:
                self.subscribers.setdefault(address, set()).add(backend)

    def remove(self, backend: MemoryBackend, addresses: Iterable[Address]) -> None:
        with self._lock:
            for address in addresses:
                subscribers = self.subscribers.get(address)
                if subscribers is not None:
                    subscribers.discard(backend)
                    if not subscribers:
                        del self.subscribers[address]


class MemoryBackend(Backend):
    def __init__(self, settings: Settings, *, inbox: str) -> None:
        super().__init__(settings, inbox=inbox)
        self._hub = MemoryHub.named(settings.url)
        self._handler: MessageHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def connect(self, on_message: MessageHandler) -> None:
        self._handler = on_message
        self._loop = asyncio.get_running_loop()
        self._hub.add(self, self.subscriptions)

    async def close(self) -> None:
        self._hub.remove(self, self.subscriptions)
        self._handler = None

    def deliver(self, message: bytes) -> None:
        handler, loop = self._handler, self._loop
        if handler is None or loop is None or loop.is_closed():
            return
        # never run the handler inside the publisher's call: delivery is asynchronous on every backend
        try:
            if threading.get_ident() == getattr(loop, "_thread_id", None):
                loop.call_soon(handler, message)
            else:
                loop.call_soon_threadsafe(handler, message)
        except RuntimeError:  # the receiving loop closed between the check and the call
            return

    async def subscribe(self, addresses: Iterable[Address]) -> None:
        new = set(addresses)
        self.subscriptions |= new
        if self._handler is not None:
            self._hub.add(self, new)

    async def unsubscribe(self, addresses: Iterable[Address]) -> None:
        gone = set(addresses) - {self.inbox_address}
        self.subscriptions -= gone
        self._hub.remove(self, gone)

    async def publish_many(self, items: Sequence[tuple[Address, bytes]]) -> list[int | None]:
        if self._handler is None:
            raise NotConnected("memory backend is not connected")
        return [self._hub.publish(address, message) for address, message in items]

    @property
    def healthy(self) -> bool:
        return self._handler is not None
