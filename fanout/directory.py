"""Which nodes are alive, from their heartbeats. Pure: the caller passes the clock."""

from __future__ import annotations

from .commands import NodeInfo


class NodeDirectory:
    """Live nodes as heard from heartbeats (and replies); a node silent for its ``ttl`` is dead."""

    def __init__(self) -> None:
        self._nodes: dict[str, tuple[NodeInfo, float]] = {}  # instance -> (info, expires at)

    def heard(self, info: NodeInfo, now: float) -> None:
        self._nodes[info.instance] = (info, now + info.ttl)

    def gone(self, instance: str) -> None:
        self._nodes.pop(instance, None)

    def live(self, now: float) -> dict[str, NodeInfo]:
        dead = [i for i, (_, expires) in self._nodes.items() if expires <= now]
        for instance in dead:
            del self._nodes[instance]
        return {instance: info for instance, (info, _) in self._nodes.items()}

    def is_live(self, instance: str, now: float) -> bool:
        entry = self._nodes.get(instance)
        return entry is not None and entry[1] > now
