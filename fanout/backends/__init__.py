"""Backends: memory (in-process), redis and amqp, chosen by ``Settings.backend``.

Each backend lives in its own module and is imported only when chosen, so a memory-only user never
imports redis or aio_pika.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..config import BackendKind, Settings
from ..exceptions import ConfigError
from .base import Backend
from .eventlog import EventLog
from .store import HistoryStore


def create_backend(settings: Settings, *, inbox: str) -> Backend:
    """A not-yet-connected backend of the kind ``settings`` names.

    Raises :class:`ConfigError` naming the extra to install when the backend's client library is not
    installed (``pip install "fanout[redis]"`` / ``"fanout[amqp]"``).
    """
    if settings.backend is BackendKind.MEMORY:
        from .memory import MemoryBackend

        return MemoryBackend(settings, inbox=inbox)
    with needs_extra(settings.backend.value):
        if settings.backend is BackendKind.REDIS:
            from .redis import RedisBackend

            return RedisBackend(settings, inbox=inbox)
        from .amqp import AmqpBackend

        return AmqpBackend(settings, inbox=inbox)


def create_event_log(settings: Settings, *, shards: int, backlog: int, node: str = "") -> EventLog:
    """The worker tier's event log on the broker ``settings`` names (not yet connected).

    Raises :class:`ConfigError` naming the extra to install when the broker's client library is not
    installed, and when the backend is memory (it cannot reach another process).
    """
    if settings.backend is BackendKind.MEMORY:
        raise ConfigError(
            "FANOUT_EVENTS",
            "business workers need a broker that keeps events until a worker handled them: "
            "set FANOUT_URL to redis://... or amqp://... (memory:// cannot reach another process)",
        )
    with needs_extra(settings.backend.value):
        if settings.backend is BackendKind.REDIS:
            from .redis_events import RedisEventLog

            return RedisEventLog(settings, shards=shards, backlog=backlog, node=node)
        from .amqp_events import AmqpEventLog

        return AmqpEventLog(settings, shards=shards, backlog=backlog, node=node)


def create_store(settings: Settings) -> HistoryStore | None:
    """The continuity store (history, resume records; not yet connected): ``FANOUT_HISTORY_URL``'s Redis,
    else the Redis backend's own Redis (which then publishes history sends itself, in the script that
    appends them), else, for the memory backend, the process; None for AMQP without a history URL."""
    if settings.history_url or settings.backend is BackendKind.REDIS:
        with needs_extra("redis"):
            from .store_redis import RedisStore

            if settings.history_url:
                return RedisStore(settings, url=settings.history_url, publishes=False)
            return RedisStore(settings, url=settings.url, publishes=True)
    if settings.backend is BackendKind.MEMORY:
        from .store import MemoryStore

        return MemoryStore(settings)
    return None


@contextlib.contextmanager
def needs_extra(extra: str) -> Iterator[None]:
    """Turn a missing client library into a ConfigError that says which extra to install."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "FANOUT_URL",
            f"the {extra} backend needs {exc.name!r}, which is not installed: pip install 'fanout[{extra}]'",
        ) from None


__all__ = [
    "Backend",
    "EventLog",
    "HistoryStore",
    "create_backend",
    "create_event_log",
    "create_store",
    "needs_extra",
]
