"""Backends: memory (in-process), redis and amqp, chosen by ``Settings.backend``.

Each backend lives in its own module and is imported only when chosen, so a memory-only user never
imports redis or aio_pika.
"""

from __future__ import annotations

from ..config import BackendKind, Settings
from .base import Backend


def create_backend(settings: Settings, *, inbox: str) -> Backend:
    """A not-yet-connected backend of the kind ``settings`` names."""
    if settings.backend is BackendKind.MEMORY:
        from .memory import MemoryBackend

        return MemoryBackend(settings, inbox=inbox)
    if settings.backend is BackendKind.REDIS:
        from .redis import RedisBackend

        return RedisBackend(settings, inbox=inbox)
    from .amqp import AmqpBackend

    return AmqpBackend(settings, inbox=inbox)


__all__ = ["Backend", "create_backend"]
