"""A test application: a client may ask the node to run any ServerUtil call and get the result.

A text frame ``{"call": "send_to_group", "args": [...], "kwargs": {...}, "id": 1}`` makes the node run
``node.util.<call>(*args, **kwargs)`` (its ServerUtil sharing the node's backend) and answer the sender
with ``{"id": 1, "result": ...}`` or ``{"id": 1, "error": "<ExceptionType>: message"}``. A frame
``{"flood": N, "size": S}`` makes the node broadcast N frames of S bytes (slow-client tests); frames
``{"local": "join" | "leave" | "bind" | "unbind" | "session", ...}`` exercise the connection API.
Nothing here is for production: it lets any client drive the whole cluster.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from node.connection import Connection


class ControlApp:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.pacers: list[Connection] = []  #: clients a flood waits for

    async def on_open(self, conn: Connection) -> None:
        self.events.append(("open", conn.client_id))

    async def on_close(self, conn: Connection) -> None:
        self.events.append(("close", conn.client_id))

    async def on_message(self, conn: Connection, data: str | bytes) -> None:
        if isinstance(data, bytes):
            await conn.send(b"echo:" + data)
            return
        message: dict[str, Any] = orjson.loads(data)
        if "pace" in message:
            self.pacers.append(conn)
            await conn.send({"pacing": True})
            return
        if "flood" in message:
            # broadcast N frames, paced to what the pacing clients read: a well-behaved publisher
            payload = "x" * int(message["size"])
            for _ in range(int(message["flood"])):
                await conn.node.util.send_to_all(payload)
                await asyncio.sleep(0)
                # no event fires when a transport's buffer drains, so poll it
                while any(c.open and c.buffered > 2 * len(payload) for c in self.pacers):  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
            # through the bus like the flood itself: one publisher, so it arrives after the last frame
            await conn.node.util.send(conn.client_id, {"flooded": message["flood"]})
            return
        if "local" in message:
            await self._local(conn, message)
            return
        try:
            result = await getattr(conn.node.util, message["call"])(
                *message.get("args", []), **message.get("kwargs", {})
            )
        except Exception as exc:
            await conn.send({"id": message.get("id"), "error": f"{type(exc).__name__}: {exc}"})
            return
        await conn.send({"id": message.get("id"), "result": result})

    async def _local(self, conn: Connection, message: dict[str, Any]) -> None:
        action = message["local"]
        if action == "join":
            await conn.join_group(*message["groups"])
        elif action == "leave":
            await conn.leave_group(*message["groups"])
        elif action == "bind":
            await conn.bind(message["flag"])
        elif action == "unbind":
            await conn.unbind()
        elif action == "session":
            conn.session.update(message["data"])
        elif action == "close":
            await conn.close(message.get("code", 1000), message.get("reason", ""))
            return
        await conn.send(
            {"local": action, "groups": sorted(conn.groups), "flag": conn.flag, "session": conn.session}
        )


app = ControlApp
