"""Arguments are checked from one table (fanout.arguments) before anything is published: a wrong one is a
PayloadError naming the call, the argument, its value and what is accepted, on a real node on Redis, where
a malformed query used to be dropped by the node and reported as NoLiveNodes. Payload encoding: the
``json_default`` hook, and NaN/Infinity refused instead of becoming null."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import re
import warnings
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection

from fanout import PayloadError, ServerUtil, SyncServerUtil, protocol
from fanout.arguments import ARGUMENTS, accepts
from fanout.sync import OPERATIONS
from tests.support.nodes import ROOT, NodeProcess, client, nothing_more, recv, start_node, unique_namespace

REDIS = "redis://127.0.0.1:6379/0"
HB = 0.5


@dataclasses.dataclass
class Live:
    node: NodeProcess
    namespace: str
    ws: ClientConnection
    client_id: str


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    """One node process on Redis with one client, bound to flag 'ann' and in group 'lobby'."""
    namespace = unique_namespace("args")
    node = start_node(
        tmp_path,
        {"FANOUT_URL": REDIS, "FANOUT_NAMESPACE": namespace, "FANOUT_HEARTBEAT_INTERVAL": str(HB)},
    )
    ws, cid = await client(node.port)
    async with ServerUtil(REDIS, namespace=namespace, heartbeat_interval=HB) as util:
        assert await util.bind(cid, "ann") is True
    yield Live(node, namespace, ws, cid)
    await ws.close()
    assert node.terminate() == 0


def _util(live: Live, **options: Any) -> ServerUtil:
    return ServerUtil(REDIS, namespace=live.namespace, heartbeat_interval=HB, **options)


#: (call, positional arguments, keyword arguments, the message)
WRONG: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    ("flag_exists", (42,), {}, "flag_exists: flag must be a string, got int 42"),
    ("get_group_count", (42,), {}, "get_group_count: group must be a string, got int 42"),
    ("exists", (42,), {}, "exists: client_id must be a string, got int 42"),
    ("send_by_flag", (42, "hi"), {}, "send_by_flag: flags must be strings, got int 42"),
    ("send_by_flag", (["ann", 42], "hi"), {}, "send_by_flag: flags must be strings, got int 42"),
    ("send_to_group", (b"lobby", "hi"), {}, "send_to_group: groups must be strings, got bytes b'lobby'"),
    ("send_to_all", ("hi",), {"exclude": [None]}, "send_to_all: exclude must be strings, got NoneType None"),
    (
        "send_to_all",
        ("hi",),
        {"ack": "yes"},
        "send_to_all: ack must be a bool (true or false), got str 'yes'",
    ),
    (
        "get_connection_count",
        (),
        {"timeout": "abc"},
        "get_connection_count: timeout must be a number of seconds > 0, got str 'abc'",
    ),
    ("get_groups", (), {"timeout": float("nan")}, "timeout must be a number of seconds > 0, got float nan"),
    ("get_groups", (), {"partial": 1}, "get_groups: partial must be a bool (true or false), got int 1"),
    ("join_group", ("x.y.1", 7), {}, "join_group: groups must be strings, got int 7"),
    ("bind", ("x.y.1", "f", "no"), {}, "bind: replace must be a bool (true or false), got str 'no'"),
    ("unbind", ("x.y.1",), {"wait": None}, "unbind: wait must be a bool (true or false), got NoneType None"),
    ("is_in_group", ("x.y.1", ["lobby"]), {}, "is_in_group: group must be a string, got list ['lobby']"),
    ("close", ("x.y.1", "1000"), {}, "close: code must be a close code a server may send"),
    ("close_by_flag", ("ann", 1000, 5), {}, "close_by_flag: reason must be a string of at most 123 bytes"),
    ("close_guests", (float("inf"),), {}, "close_guests: older_than must be a number of seconds >= 0"),
    ("send_bulk", ([("x.y.1", "a"), (9, "b")],), {}, "send_bulk: pairs must be (name, data) pairs"),
    ("set_session", ("x.y.1", ["not", "a", "dict"]), {}, "set_session: data must be a dict with string keys"),
    (
        "get_client_ids_by_flags",
        ({"ann": 1},),
        {},
        "get_client_ids_by_flags: flags must be strings, got dict",
    ),
]


async def test_a_wrong_argument_is_a_payload_error_naming_it_while_the_node_is_live(live: Live) -> None:
    async with _util(live) as util:
        await util.check_cluster()
        for call, args, kwargs, message in WRONG:
            with pytest.raises(PayloadError) as raised:
                await getattr(util, call)(*args, **kwargs)
            assert message in str(raised.value), (call, str(raised.value))
        # nothing was published: a target list with one bad name sends to none of them
        assert await nothing_more(live.ws)
        assert await util.flag_exists("ann") is True and await util.get_group_count("lobby") == 1
        assert await util.send_by_flag(("ann",), "right", ack=True, timeout=5) == 1
        assert await recv(live.ws) == "right"


async def test_sync_server_util_checks_the_same_way(live: Live) -> None:
    def blocking() -> None:  # in a thread, as Django or a script calls it
        with SyncServerUtil(REDIS, namespace=live.namespace, heartbeat_interval=HB) as sync:
            with pytest.raises(PayloadError, match="flag_exists: flag must be a string, got int 42"):
                sync.flag_exists(42)  # type: ignore[arg-type]
            with pytest.raises(PayloadError, match="send_by_flag: flags must be strings, got int 42"):
                sync.send_by_flag(42, "hi")  # type: ignore[arg-type]
            assert sync.flag_exists("ann") is True

    await asyncio.get_running_loop().run_in_executor(None, blocking)
    assert await nothing_more(live.ws)


def test_every_call_checks_every_argument_from_the_table() -> None:
    """Each ServerUtil operation is wrapped, and each of its parameters is in the table."""
    for name in OPERATIONS:
        method = getattr(ServerUtil, name)
        assert hasattr(method, "__wrapped__"), f"ServerUtil.{name} is not @checked"
        for parameter in list(inspect.signature(method).parameters)[1:]:
            assert accepts(name, parameter).what
    assert accepts("set_session", "data") is not ARGUMENTS["data"]


# --------------------------------------------------------------------------- encoding


@dataclasses.dataclass
class Reading:
    value: float


async def test_json_default_encodes_what_orjson_cannot(live: Live) -> None:
    async with _util(live) as util:
        with pytest.raises(PayloadError, match="Decimal"):
            await util.send(live.client_id, {"price": Decimal("9.99")})
    async with _util(live, json_default=str) as util:
        assert await util.send(live.client_id, {"price": Decimal("9.99")}, ack=True) == 1
        assert orjson.loads(await recv(live.ws)) == {"price": "9.99"}
        assert await util.set_session(live.client_id, {"credit": Decimal("1.50")}) is True
        assert await util.get_session(live.client_id) == {"credit": "1.50"}
        assert await util.close(live.client_id, 4000, data={"bill": Decimal("2")}) == 1
        assert orjson.loads(await recv(live.ws)) == {"bill": "2"}


async def test_sync_server_util_takes_json_default(live: Live) -> None:
    def blocking() -> int:
        with SyncServerUtil.from_env(
            {"FANOUT_URL": REDIS, "FANOUT_NAMESPACE": live.namespace, "FANOUT_HEARTBEAT_INTERVAL": str(HB)},
            json_default=float,
        ) as sync:
            return sync.send_by_flag("ann", [Decimal("0.5")], ack=True)

    assert await asyncio.get_running_loop().run_in_executor(None, blocking) == 1
    assert await recv(live.ws) == "[0.5]"


@pytest.mark.parametrize(
    "data",
    [
        {"x": float("nan")},
        [1.0, float("inf")],
        {"deep": [{"t": (0, -float("inf"))}]},
        Reading(float("nan")),
    ],
    ids=["nan", "inf", "nested", "dataclass"],
)
async def test_nan_and_infinity_are_refused_not_sent_as_null(live: Live, data: object) -> None:
    async with _util(live) as util:
        with pytest.raises(PayloadError, match="NaN or an infinity"):
            await util.send(live.client_id, data)
        with pytest.raises(PayloadError, match="NaN or an infinity"):
            await util.set_session(live.client_id, {"v": data})
    assert await nothing_more(live.ws)


async def test_nan_from_json_default_is_refused_too(live: Live) -> None:
    async with _util(live, json_default=float) as util:
        with pytest.raises(PayloadError, match="NaN or an infinity"):
            await util.send(live.client_id, {"x": Decimal("NaN")})
        assert await util.send(live.client_id, {"x": None, "y": Decimal("1")}, ack=True) == 1  # null is fine
    assert await recv(live.ws) == '{"x":null,"y":1.0}'


def test_dump_json_is_orjson_with_nan_refused() -> None:
    assert protocol.dump_json({"a": [1, None, 2.5]}) == b'{"a":[1,null,2.5]}'
    assert protocol.dump_json(Decimal("3"), str) == b'"3"'
    with pytest.raises(PayloadError, match="session data holds nan"):
        protocol.dump_json({"v": float("nan")}, None, "session data")


async def test_the_guides_argument_errors_snippet_runs_as_printed(
    live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(# prices\.py\n.*?)```", (ROOT / "docs" / "guide.md").read_text(), re.S)
    assert len(blocks) == 1
    (tmp_path / "prices.py").write_text(blocks[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, value in (("URL", REDIS), ("NAMESPACE", live.namespace), ("HEARTBEAT_INTERVAL", str(HB))):
        monkeypatch.setenv(f"FANOUT_{name}", value)
    prices = importlib.import_module("prices")
    await prices.push_price(live.client_id, 42, Decimal("9.99"))
    assert await recv(live.ws) == '{"price":"9.99"}'
    assert capsys.readouterr().out == "send_by_flag: flags must be strings, got int 42\n"
    assert await nothing_more(live.ws)


# --------------------------------------------------------------------------- SyncServerUtil in async code


async def test_sync_server_util_inside_a_running_loop_warns_once() -> None:
    sync = SyncServerUtil("memory://", in_process=True)
    try:
        with (
            pytest.warns(
                RuntimeWarning, match=r"inside a running event loop.*use fanout\.ServerUtil"
            ) as seen,
            pytest.raises(PayloadError),
        ):
            sync.flag_exists(42)  # type: ignore[arg-type]
        assert len(seen) == 1 and seen[0].filename == __file__  # points at the caller's line
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(PayloadError):
                sync.get_group_count(42)  # type: ignore[arg-type]
    finally:
        await asyncio.get_running_loop().run_in_executor(None, sync.disconnect)
