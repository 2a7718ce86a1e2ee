"""The continuity store on Redis (and Redis Cluster). Placeholder until it is written: see store.py."""

from __future__ import annotations

from ..config import Settings
from .store import HistoryStore


class RedisStore(HistoryStore):  # pragma: no cover - being written
    def __init__(self, settings: Settings, *, url: str, publishes: bool) -> None:
        raise NotImplementedError("RedisStore is being written")
