"""The demo chat as a worker application: the nodes hold the connections, this decides what to broadcast.

Run one or more, on any host::

    FANOUT_URL=redis://127.0.0.1:6379/0 fanout worker --app examples.chat.worker:Chat

Every client of every node is in ``lobby`` (the node admitted it there); what one says, all see, with
the same frames as the in-process demo chat, so the demo page works unchanged.
"""

import orjson

from fanout.events import Event

LOBBY = "lobby"


class Chat:
    async def on_open(self, event: Event) -> None:
        await event.util.send_to_group(LOBBY, {"type": "joined", "name": event.session.get("name", "guest")})

    async def on_message(self, event: Event) -> None:
        if not isinstance(event.data, str):
            return
        try:
            message = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            message = {"text": event.data}
        text = str(message.get("text", ""))[:2000] if isinstance(message, dict) else str(message)
        if not text:
            return
        name = str(message.get("name") or event.session.get("name", "guest"))[:32]
        await event.util.send_to_group(
            LOBBY,
            {
                "type": "chat",
                "from": event.client_id,
                "user": event.flag,
                "name": name,
                "node": event.node_id.rpartition(".")[0],  # the node id (its instance without the boot)
                "text": text,
                "event_id": event.event_id,  # what a client (or a database) can use to drop a redelivery
            },
        )

    async def on_close(self, event: Event) -> None:
        await event.util.send_to_group(LOBBY, {"type": "left", "name": event.session.get("name", "guest")})
