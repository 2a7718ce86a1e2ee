"""Rate limits of a node: a token bucket per client (frames) and one per node (new connections). Pure."""

from __future__ import annotations


class TokenBucket:
    """``rate`` events per second on average, bursts of up to ``burst``; the caller passes the clock."""

    __slots__ = ("_level", "_stamp", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._level = burst
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token; False (and nothing spent) when the bucket is empty."""
        level = self._level + (now - self._stamp) * self.rate
        self._stamp = now
        if level > self.burst:
            level = self.burst
        if level < 1.0:
            self._level = level
            return False
        self._level = level - 1.0
        return True
