"""The demo chat without its admission, for tests: every client is a guest, put in ``lobby`` on open.

Tests that exercise ServerUtil across nodes need plain clients in a common group and nothing bound to
them; the demo's own token admission is tested with the demo itself (tests/test_demo_page.py).
"""

from __future__ import annotations

from fanout.admission import ConnectRequest
from node.app import LOBBY, DemoChat
from node.connection import Connection


class GuestLobby(DemoChat):
    async def on_connect(self, request: ConnectRequest) -> None:
        return None

    async def on_open(self, conn: Connection) -> None:
        await conn.join_group(LOBBY)


app = GuestLobby
