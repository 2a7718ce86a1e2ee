"""Continuity tests' app: admission from the query (``?user=u1&groups=a,b``), echo of every message.

``user`` binds the connection to that flag, ``groups`` puts it in those groups, both before its welcome
(fanout.Admit); every message comes back as ``{"echo": <what on_message got>}`` (str) or as the same bytes.
"""

from __future__ import annotations

from fanout.admission import Admit, ConnectRequest
from node.connection import Connection


class StreamsApp:
    async def on_connect(self, request: ConnectRequest) -> Admit:
        groups = [g for g in request.query.get("groups", "").split(",") if g]
        return Admit(flag=request.query.get("user") or None, groups=groups)

    async def on_message(self, conn: Connection, data: str | bytes) -> None:
        await conn.send({"echo": data} if isinstance(data, str) else data)


app = StreamsApp
