"""SyncServerUtil: ServerUtil for code without an event loop (Django, Flask, Celery, scripts).

It is a thin facade, not a second implementation: it runs one :class:`ServerUtil` on an event loop in a
daemon thread and forwards each call, blocking until it returns. The methods, arguments, return values
and exceptions are exactly the async ones. It connects on first use, and again in a child process after
``fork()`` (prefork servers such as gunicorn or Celery), since a connection cannot cross a fork.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from .config import Settings
from .serverutil import ServerUtil

#: the ServerUtil operations a SyncServerUtil forwards: every public coroutine method but the lifecycle
OPERATIONS = frozenset(
    name
    for name, member in inspect.getmembers(ServerUtil, inspect.iscoroutinefunction)
    if not name.startswith("_") and name not in ("connect", "disconnect", "watch_nodes")
)


class SyncServerUtil:
    """Blocking twin of :class:`ServerUtil`: same methods, same arguments, same results."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args, self._kwargs = args, kwargs
        self._lock = threading.Lock()
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._util: ServerUtil | None = None
        self._borrowed = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Self:
        return cls(settings=Settings.from_env(environ))

    @classmethod
    def borrowing(cls, util: ServerUtil, loop: asyncio.AbstractEventLoop) -> Self:
        """A blocking view of a ServerUtil already connected on a loop running in another thread (a
        worker's plain-function handlers call through the worker's own link). It never disconnects it."""
        sync = cls()
        sync._util, sync._loop, sync._pid, sync._borrowed = util, loop, os.getpid(), True
        return sync

    @property
    def settings(self) -> Settings:
        return self._ensure()[0].settings

    def connect(self) -> None:
        """Connect now (otherwise the first call does). Raises BackendUnavailable."""
        self._ensure()

    def disconnect(self) -> None:
        """Leave the backend and stop the background loop. Idempotent (a borrowing one does nothing)."""
        if self._borrowed:
            return
        with self._lock:
            util, loop, thread = self._util, self._loop, self._thread
            self._util = self._loop = self._thread = None
        if util is None or loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(util.disconnect(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disconnect()

    def _ensure(self) -> tuple[ServerUtil, asyncio.AbstractEventLoop]:
        if self._borrowed and self._util is not None and self._loop is not None:
            return self._util, self._loop
        with self._lock:
            if self._util is not None and self._loop is not None and self._pid == os.getpid():
                return self._util, self._loop
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="fanout-sync", daemon=True)
            thread.start()
            util = ServerUtil(*self._args, **self._kwargs)
            try:
                asyncio.run_coroutine_threadsafe(util.connect(), loop).result()
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()
                raise
            self._util, self._loop, self._thread, self._pid = util, loop, thread, os.getpid()
            return util, loop

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in OPERATIONS:
            raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")
        method = getattr(ServerUtil, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            util, loop = self._ensure()
            return asyncio.run_coroutine_threadsafe(method(util, *args, **kwargs), loop).result()

        call.__name__ = name
        call.__doc__ = method.__doc__
        return call

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | OPERATIONS)
