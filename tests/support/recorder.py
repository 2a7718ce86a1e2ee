"""Waiting helpers for backend tests: a recording ``on_message`` handler and a polling ``eventually``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from tests.support import scaled


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``check`` (sync or async) until it is true, at most ``timeout`` (scaled) seconds."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


class Recorder:
    """An ``on_message`` handler that records every message, in arrival order."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def __call__(self, message: bytes) -> None:
        self.messages.append(message)

    async def wait_for_count(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """Wait until ``count`` messages have arrived; return them all."""
        await eventually(lambda: len(self.messages) >= count, timeout, f"{count} deliveries")
        return self.messages

    async def wait_for_message(self, message: bytes, timeout: float = 5.0) -> None:
        await eventually(lambda: message in self.messages, timeout, f"delivery of {message!r}")

    async def quiet(self, seconds: float = 0.2) -> list[bytes]:
        """Wait a little for anything that should NOT arrive; return what did."""
        await asyncio.sleep(scaled(seconds))
        return self.messages
