"""The fanout websocket node (``python -m node`` / ``fanout-node``).

Its names are imported on first use: ``fanout-node`` installed without the ``[node]`` extra (no
``websockets``) can then say which extra to install instead of failing in this package's import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .connection import Connection
    from .node import Node
    from .options import NodeOptions

__all__ = ["Connection", "Node", "NodeOptions"]


def __getattr__(name: str) -> object:
    if name == "Connection":
        from .connection import Connection

        return Connection
    if name == "Node":
        from .node import Node

        return Node
    if name == "NodeOptions":
        from .options import NodeOptions

        return NodeOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
