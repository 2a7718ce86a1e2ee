"""The continuity store on Redis (and Redis Cluster). Placeholder until it is written: see store.py."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..config import Settings
from ..history import Page, Positions
from ..naming import Address
from .store import HistoryStore, StoredSend


class RedisStore(HistoryStore):  # pragma: no cover - being written
    def __init__(self, settings: Settings, *, url: str, publishes: bool) -> None:
        super().__init__(settings)
        self.publishes = publishes

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def append(
        self, streams: Sequence[str], send: StoredSend, publish: Sequence[tuple[Address, bytes]] = ()
    ) -> Positions:
        raise NotImplementedError

    async def positions(self, streams: Iterable[str]) -> Positions:
        raise NotImplementedError

    async def read(self, stream: str, since: int | None = None, limit: int = 100) -> Page:
        raise NotImplementedError

    async def remove(self, stream: str) -> None:
        raise NotImplementedError

    async def save_resume(
        self, token: str, flag: str | None, record: bytes, ttl: float, *, create: bool = False
    ) -> None:
        raise NotImplementedError

    async def keep_resume(self, tokens: Iterable[str], ttl: float) -> None:
        raise NotImplementedError

    async def claim_resume(self, token: str, flag: str | None) -> bytes | None:
        raise NotImplementedError

    async def drop_resume(self, token: str) -> None:
        raise NotImplementedError
