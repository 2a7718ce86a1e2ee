"""Application hooks, and the built-in demo chat.

An application is any object (a module, a class instance) with some of these optional coroutines,
named with ``--app module:attr`` or ``FANOUT_APP`` (like GatewayWorker's Events class):

* ``on_connect(request)``: before the websocket handshake completes (see :mod:`fanout.admission`):
  return ``None`` (a guest) or ``fanout.Admit(flag=..., groups=..., session=...)``, or raise
  ``fanout.Reject(status, reason)``; anything else raised refuses the client with 500;
* ``on_start(node)`` / ``on_stop(node)``: the node is up / shutting down;
* ``on_open(conn)``: a client connected (after its welcome frame; an exception closes it with 1011);
* ``on_message(conn, data)``: a client sent a frame (``str`` for text, ``bytes`` for binary);
* ``on_close(conn)``: a client left (it has already left its groups and flag);
* ``on_reconnect(node)``: the backend came back after an outage, subscriptions restored;
* ``http_routes``: ``{path: async callable(request) -> (status, content type, body)}``, small GET
  endpoints the node serves for the application (the demo's token endpoint and page are two).

A hook may also be a plain ``def``: it is called on the node's event loop (as python-socketio calls
plain handlers), so it must be quick; whatever it returns that is awaitable is awaited. Blocking work
belongs in a worker (``fanout worker``, where plain handlers run in a thread pool) or in
``await asyncio.to_thread(...)`` inside an ``async def`` hook.

``conn.node.util`` is a :class:`fanout.ServerUtil` sharing the node's backend, for cluster-wide sends
and queries from inside hooks. Clients can only join groups or bind flags if the application does it
for them: nothing is exposed to clients by default.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import re
from importlib import resources
from typing import TYPE_CHECKING

import orjson

from fanout import tokens
from fanout.admission import Admit, ConnectRequest, Reject
from fanout.exceptions import FanoutError

if TYPE_CHECKING:
    from .connection import Connection

#: the hooks a node calls on its application
HOOKS = ("on_connect", "on_open", "on_message", "on_close", "on_start", "on_stop", "on_reconnect")

LOBBY = "lobby"
MAX_CHAT_TEXT = 2000
#: the demo's token key when FANOUT_DEMO_KEY is not set: the demo is not an authentication system
DEMO_KEY = "fanout-demo-key"
DEMO_TOKEN_TTL = 3600


@functools.cache
def demo_page() -> bytes:
    """The demo's page, ``node/static/index.html``."""
    return resources.files(__package__ or "node").joinpath("static/index.html").read_bytes()


def app_shape_warnings(app: object) -> list[str]:
    """What looks wrong in an application's shape, to log at start: ``on_*`` attributes that are no
    hook (a misspelt hook is never called), and no ``on_connect`` (every client is then a guest)."""
    warnings = []
    for name in sorted(n for n in dir(app) if n.startswith("on_") and n not in HOOKS):
        close = difflib.get_close_matches(name, HOOKS, n=1)
        hint = f" — did you mean {close[0]}?" if close else f" (the hooks: {', '.join(HOOKS)})"
        warnings.append(f"the application's {name} is not a node hook and is never called{hint}")
    if getattr(app, "on_connect", None) is None:
        warnings.append(
            "the application has no on_connect: every client is admitted as a guest (no flag, no groups)"
        )
    return warnings


def _display_name(raw: object) -> str:
    name = re.sub(r"[^\w .-]", "", str(raw), flags=re.UNICODE).strip()[:32]
    return name or "guest"


class DemoChat:
    """The default app: a chat room (``lobby``) across every node, with token admission.

    ``GET /demo/token?name=ann`` stands in for a web app's login: it answers ``{"token": ..., "flag": ...}``
    with a token signed with ``FANOUT_DEMO_KEY``. The page connects with ``?token=...``; ``on_connect``
    checks it (401 without a valid one) and admits the client with the token's user as its flag, in the
    lobby, its name in its session. Clients send ``{"text": "...", "name": "..."}`` (or plain text);
    everyone in the lobby receives ``{"type": "chat", "from": <client id>, "name": ..., "node": <node id>,
    "text": ...}``.
    """

    def __init__(self, key: str | None = None) -> None:
        self.key = key or os.environ.get("FANOUT_DEMO_KEY") or DEMO_KEY
        self.http_routes = {"/demo/token": self.token_endpoint, "/": self.page, "/index.html": self.page}

    async def page(self, request: ConnectRequest) -> tuple[int, str, bytes]:
        return 200, "text/html; charset=utf-8", demo_page()

    async def token_endpoint(self, request: ConnectRequest) -> tuple[int, str, bytes]:
        name = _display_name(request.query.get("name", "guest"))
        user = f"{name.lower().replace(' ', '-')}-{os.urandom(3).hex()}"
        token = tokens.issue(self.key, user, ttl=DEMO_TOKEN_TTL, claims={"name": name})
        return 200, "application/json", orjson.dumps({"token": token, "flag": user, "name": name})

    async def on_connect(self, request: ConnectRequest) -> Admit:
        try:
            claims = tokens.verify(self.key, request.query.get("token", ""))
        except tokens.InvalidToken as exc:
            raise Reject(401, str(exc)) from None
        return Admit(flag=claims["sub"], groups=[LOBBY], session={"name": _display_name(claims.get("name"))})

    async def on_open(self, conn: Connection) -> None:
        """Tell the newcomer who is online (presence frames keep it current, with FANOUT_PRESENCE=lobby),
        and which node and backend it is on: ``{"type": "online", "users": [...], "node": ..., "backend":
        ...}`` (no ``users`` if the presence query failed)."""
        node = conn.node
        frame: dict[str, object] = {"type": "online"}
        # if the query fails, the page still works: it learns who comes and goes from the presence frames
        with contextlib.suppress(FanoutError):
            frame["users"] = sorted(await node.util.get_presence(LOBBY, partial=True))
        frame.update(node=node.options.node_id, backend=node.settings.backend.value)
        await conn.send(frame)

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
        if not text:
            return
        name = _display_name(message["name"]) if message.get("name") else conn.session.get("name", "guest")
        await conn.node.util.send_to_group(
            LOBBY,
            {
                "type": "chat",
                "from": conn.client_id,
                "user": conn.flag,
                "name": name,
                "node": conn.node.options.node_id,
                "text": text,
            },
        )
