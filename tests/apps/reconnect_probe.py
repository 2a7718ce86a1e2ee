"""A test application that makes the node's ``on_reconnect`` hook observable from outside the process.

It is :class:`tests.apps.control.ControlApp` (so ``{"local": ...}`` frames drive the connection API)
plus a probe: every ``on_reconnect(node)`` call is counted, together with what the node looked like at
that moment (was its backend healthy - the hook is documented to fire once the subscriptions are
back). A client that sends the text frame ``reconnects?`` is answered with
``{"reconnects": <count>, "healthy_at_hook": [<bool>, ...], "backend_reconnects": <backend counter>}``.
"""

from __future__ import annotations

from typing import Any

from node.connection import Connection
from tests.apps.control import ControlApp

QUESTION = "reconnects?"


class ReconnectProbe(ControlApp):
    def __init__(self) -> None:
        super().__init__()
        self.reconnects = 0
        #: ``node.backend.healthy`` seen by each call of the hook
        self.healthy_at_hook: list[bool] = []

    async def on_reconnect(self, node: Any) -> None:
        self.reconnects += 1
        self.healthy_at_hook.append(bool(node.backend.healthy))

    async def on_message(self, conn: Connection, data: str | bytes) -> None:
        if data == QUESTION:
            await conn.send(
                {
                    "reconnects": self.reconnects,
                    "healthy_at_hook": self.healthy_at_hook,
                    "backend_reconnects": conn.node.backend.reconnects,
                }
            )
            return
        await super().on_message(conn, data)


app = ReconnectProbe
