"""Admission before the upgrade, with a real node (memory backend) and real websocket clients."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fanout import Admit, ConnectRequest, Reject, ServerUtil, tokens
from node import Connection
from tests.conftest import MakeNode
from tests.support.nodes import client, nothing_more, recv

KEY = "app-key"


class TokenApp:
    """Admits clients whose ?token= verifies; records what each hook saw."""

    def __init__(self) -> None:
        self.seen: list[ConnectRequest] = []
        self.opened: list[dict[str, Any]] = []

    async def on_connect(self, request: ConnectRequest) -> Admit:
        self.seen.append(request)
        token = request.query.get("token", "")
        if token == "rate-me":
            raise Reject(429, "slow down")
        if token == "forbidden":
            raise Reject(403, "not for you")
        try:
            claims = tokens.verify(KEY, token)
        except tokens.InvalidToken as exc:
            raise Reject(401, str(exc)) from None
        return Admit(flag=claims["sub"], groups=["room", "news"], session={"name": claims["name"]})

    async def on_open(self, conn: Connection) -> None:
        # the identity is there before on_open, and so is the request
        self.opened.append(
            {
                "flag": conn.flag,
                "groups": sorted(conn.groups),
                "session": dict(conn.session),
                "path": conn.request.path,
                "cookie": conn.request.cookies.get("sid"),
            }
        )


async def test_admit_is_applied_before_the_welcome_and_on_open(make_node: MakeNode) -> None:
    app = TokenApp()
    node = await make_node(app)
    token = tokens.issue(KEY, "user-42", claims={"name": "Ann"})
    ws = await connect(
        f"ws://127.0.0.1:{node.port}/chat?token={token}&x=1&x=2",
        additional_headers={"Cookie": "sid=abc; theme=dark", "X-Custom": "yes"},
    )
    welcome = orjson.loads(await recv(ws))
    assert welcome["type"] == "welcome"
    cid = welcome["client_id"]
    assert app.opened == [
        {
            "flag": "user-42",
            "groups": ["news", "room"],
            "session": {"name": "Ann"},
            "path": "/chat",
            "cookie": "abc",
        }
    ]
    request = app.seen[0]
    assert request.query == {"token": token, "x": "1"}
    assert request.headers["x-custom"] == "yes" and request.headers["X-CUSTOM"] == "yes"
    assert request.cookies == {"sid": "abc", "theme": "dark"}
    assert request.remote == "127.0.0.1"
    async with ServerUtil(settings=node.settings) as util:
        assert await util.get_flag(cid) == "user-42"
        assert await util.get_group_client_ids("room") == [cid]
        assert await util.get_session(cid) == {"name": "Ann"}
        await util.send_by_flag("user-42", "for ann")
        assert await recv(ws) == "for ann"
    await ws.close()


async def test_a_guest_is_accepted_when_on_connect_returns_none(make_node: MakeNode) -> None:
    class Guests:
        async def on_connect(self, request: ConnectRequest) -> None:
            return None

    node = await make_node(Guests())
    ws, cid = await client(node.port)
    async with ServerUtil(settings=node.settings) as util:
        assert await util.get_flag(cid) is None and await util.get_groups() == []
    await ws.close()


@pytest.mark.parametrize(
    ("token", "status"),
    [
        ("", 401),
        ("garbage", 401),
        (tokens.issue("other key", "u"), 401),
        ("forbidden", 403),
        ("rate-me", 429),
    ],
)
async def test_reject_answers_with_its_status_and_no_upgrade(
    make_node: MakeNode, token: str, status: int
) -> None:
    node = await make_node(TokenApp())
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{node.port}/?token={token}")
    assert refused.value.response.status_code == status
    assert len(node.table) == 0
    assert node.metrics.admission_rejects[str(status)] == 1


async def test_an_expired_token_is_refused(make_node: MakeNode) -> None:
    node = await make_node(TokenApp())
    expired = tokens.issue(KEY, "u", ttl=60, claims={"name": "x"}, now=time.time() - 120)
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{node.port}/?token={expired}")
    assert refused.value.response.status_code == 401
    assert b"expired" in refused.value.response.body


async def test_a_raising_on_connect_fails_closed_with_500(make_node: MakeNode) -> None:
    class Broken:
        calls = 0

        async def on_connect(self, request: ConnectRequest) -> Admit:
            self.calls += 1
            raise RuntimeError("database down")

        async def on_open(self, conn: Connection) -> None:
            raise AssertionError("must never open")

    app = Broken()
    node = await make_node(app)
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{node.port}/")
    assert refused.value.response.status_code == 500
    assert app.calls == 1 and node.metrics.admission_errors == 1 and node.metrics.connections_opened == 0


async def test_on_connect_returning_something_else_fails_closed(make_node: MakeNode) -> None:
    class Confused:
        async def on_connect(self, request: ConnectRequest) -> object:
            return {"flag": "u1"}  # not an Admit

    node = await make_node(Confused())
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{node.port}/")
    assert refused.value.response.status_code == 500


async def test_origins_not_allowed_are_refused_with_403(make_node: MakeNode) -> None:
    node = await make_node(TokenApp(), allowed_origins=frozenset({"https://app.example"}))
    token = tokens.issue(KEY, "u", claims={"name": "x"})
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{node.port}/?token={token}", origin="https://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    assert node.metrics.origin_refusals == 1
    ok = await connect(f"ws://127.0.0.1:{node.port}/?token={token}", origin="https://app.example")  # type: ignore[arg-type]
    assert orjson.loads(await recv(ok))["type"] == "welcome"
    native = await connect(f"ws://127.0.0.1:{node.port}/?token={token}")  # no Origin: not a browser
    assert orjson.loads(await recv(native))["type"] == "welcome"
    await ok.close()
    await native.close()


async def test_an_exception_in_on_open_closes_with_1011(make_node: MakeNode) -> None:
    class FailsOnOpen:
        closed: list[str] = []

        async def on_open(self, conn: Connection) -> None:
            raise RuntimeError("bug")

        async def on_close(self, conn: Connection) -> None:
            self.closed.append(conn.client_id)

    app = FailsOnOpen()
    node = await make_node(app)
    ws, cid = await client(node.port)
    with pytest.raises(ConnectionClosed) as closed:
        await recv(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    await asyncio.sleep(0.05)
    assert app.closed == [cid] and node.metrics.app_errors == 1 and len(node.table) == 0


async def test_reject_needs_an_error_status() -> None:
    for status in (200, 101, 302, 600, "401"):
        with pytest.raises(ValueError):
            Reject(status, "x")  # type: ignore[arg-type]
    assert Reject(401, "no").status == 401


async def test_the_admitted_client_receives_nothing_before_its_welcome(make_node: MakeNode) -> None:
    """A send to the admitted groups right at admission arrives after the welcome, never before."""

    class Announcer(TokenApp):
        async def on_open(self, conn: Connection) -> None:
            await conn.node.util.send_to_group("room", "someone joined")

    node = await make_node(Announcer())
    token = tokens.issue(KEY, "user-1", claims={"name": "x"})
    ws = await connect(f"ws://127.0.0.1:{node.port}/?token={token}")
    assert orjson.loads(await recv(ws))["type"] == "welcome"
    assert await recv(ws) == "someone joined"
    assert await nothing_more(ws)
    await ws.close()
