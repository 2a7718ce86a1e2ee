"""Application hooks, and the built-in demo chat.

An application is any object (a module, a class instance) with some of these optional coroutines,
named with ``--app module:attr`` or ``FANOUT_APP`` (like GatewayWorker's Events class):

* ``on_start(node)`` / ``on_stop(node)``: the node is up / shutting down;
* ``on_open(conn)``: a client connected (after its welcome frame);
* ``on_message(conn, data)``: a client sent a frame (``str`` for text, ``bytes`` for binary);
* ``on_close(conn)``: a client left (it has already left its groups and flag);
* ``on_reconnect(node)``: the backend came back after an outage, subscriptions restored.

``conn.node.util`` is a :class:`fanout.ServerUtil` sharing the node's backend, for cluster-wide sends
and queries from inside hooks. Clients can only join groups or bind flags if the application does it
for them: nothing is exposed to clients by default.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import orjson

from fanout.exceptions import ConfigError

if TYPE_CHECKING:
    from .connection import Connection

LOBBY = "lobby"
MAX_CHAT_TEXT = 2000


class DemoChat:
    """The default app: every client is in the ``lobby`` room, and what one says, all see (any node).

    Clients send ``{"text": "...", "name": "..."}`` (or plain text); everyone in the lobby receives
    ``{"type": "chat", "from": <client id>, "name": ..., "node": <node id>, "text": ...}``.
    """

    async def on_open(self, conn: Connection) -> None:
        await conn.join_group(LOBBY)

    async def on_message(self, conn: Connection, data: str | bytes) -> None:
        if isinstance(data, bytes):
            return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            message = {"text": data}
        if not isinstance(message, dict):
            message = {"text": str(message)}
        text = str(message.get("text", ""))[:MAX_CHAT_TEXT]
        name = str(message.get("name", ""))[:64] or conn.client_id
        if not text:
            return
        await conn.node.util.send_to_group(
            LOBBY,
            {
                "type": "chat",
                "from": conn.client_id,
                "name": name,
                "node": conn.node.options.node_id,
                "text": text,
            },
        )


def load_app(spec: str, setting: str = "FANOUT_APP") -> Any:
    """Import ``module:attr``; a class is instantiated. Raises ConfigError with a readable message."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(setting, f"{spec!r} must look like 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(setting, f"cannot import {module_name!r}: {exc}") from None
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise ConfigError(setting, f"module {module_name!r} has no attribute {attr!r}") from None
    return app() if isinstance(app, type) else app
