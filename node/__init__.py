"""The fanout websocket node (``python -m node`` / ``fanout-node``)."""

from __future__ import annotations

from .connection import Connection
from .node import Node, NodeOptions

__all__ = ["Connection", "Node", "NodeOptions"]
