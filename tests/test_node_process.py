"""Real node processes: shutdown on SIGTERM, configuration errors, slow clients, every call end to end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.support.nodes import client, nothing_more, recv, run_module, scaled, stalled_websocket, start_node

MEMORY = {"FANOUT_BACKEND": "memory", "FANOUT_APP": "tests.apps.control:app"}


async def test_sigterm_closes_clients_with_1001_and_exits_0(tmp_path: Path) -> None:
    node = start_node(tmp_path, MEMORY)
    clients = [await client(node.port) for _ in range(3)]
    node.proc.send_signal(15)
    for ws, _ in clients:
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws, 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert await asyncio.get_running_loop().run_in_executor(None, node.proc.wait, scaled(15)) == 0
    assert "Traceback" not in node.log()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"FANOUT_BACKEND": "kafka"}, "FANOUT_BACKEND"),
        ({"FANOUT_MODE": "broadcast"}, "FANOUT_MODE"),
        ({"FANOUT_URL": "mysql://localhost"}, "FANOUT_URL"),
        ({"FANOUT_URL": "redis://localhost:notaport"}, "FANOUT_URL"),
        ({"FANOUT_BACKEND": "amqp", "FANOUT_URL": "redis://localhost"}, "FANOUT_URL"),
        ({"FANOUT_URL": "redis+cluster://a:1,b"}, "FANOUT_URL"),
        ({"FANOUT_NAMESPACE": "bad name"}, "FANOUT_NAMESPACE"),
        ({"FANOUT_PORT": "eighty"}, "FANOUT_PORT"),
        ({"FANOUT_NODE_ID": "a/b"}, "FANOUT_NODE_ID"),
        ({"FANOUT_APP": "no_such_module:app"}, "FANOUT_APP"),
        ({"FANOUT_WELCOME": "maybe"}, "FANOUT_WELCOME"),
        ({"FANOUT_EVENT_LOOP": "trio"}, "FANOUT_EVENT_LOOP"),
        ({"FANOUT_LOG_LEVEL": "LOUD"}, "FANOUT_LOG_LEVEL"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(env: dict[str, str], variable: str) -> None:
    for module in ("node", "fanout"):
        args = () if module == "node" else ("count",)
        if module == "fanout" and variable in (
            "FANOUT_PORT",
            "FANOUT_NODE_ID",
            "FANOUT_APP",
            "FANOUT_WELCOME",
            "FANOUT_EVENT_LOOP",
            "FANOUT_LOG_LEVEL",
        ):
            continue  # node-only settings
        result = run_module(module, *args, env=env)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and variable in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_unreachable_backend_fails_fast_with_a_clear_message() -> None:
    started = time.monotonic()
    result = run_module("fanout", "count", env={"FANOUT_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "127.0.0.1:1" in result.stderr
    assert time.monotonic() - started < scaled(15)


async def test_slow_client_is_disconnected_and_memory_stays_bounded(tmp_path: Path) -> None:
    node = start_node(tmp_path, {**MEMORY, "FANOUT_SEND_BUFFER": str(1024 * 1024)})
    fast, _ = await client(node.port)
    slow = stalled_websocket(node.port)
    others = [await client(node.port) for _ in range(2)]
    for ws, _ in [(fast, ""), *others]:
        await ws.send('{"pace": true}')
        assert orjson.loads(await recv(ws)) == {"pacing": True}
    await asyncio.sleep(0.2)
    rss_before = node.rss_kib("VmHWM")
    frames, size = 400, 256 * 1024  # 100 MiB broadcast to every client
    await fast.send(orjson.dumps({"flood": frames, "size": size}).decode())

    async def drain(ws: ClientConnection) -> int:
        got = 0
        while got < frames:
            frame = await recv(ws, 30)
            assert len(frame) == size
            got += 1
        return got

    counts = await asyncio.gather(drain(fast), *(drain(ws) for ws, _ in others))
    assert counts == [frames] * 3  # the clients that keep up get every frame
    assert orjson.loads(await recv(fast)) == {"flooded": frames}
    rss_growth_mib = (node.rss_kib("VmHWM") - rss_before) / 1024  # the peak, not what is left after
    print(f"node peak RSS growth during the 100 MiB broadcast: {rss_growth_mib:.1f} MiB")
    assert rss_growth_mib < 40, f"node peak RSS grew by {rss_growth_mib:.0f} MiB"
    status = await _metric(node.port, "fanout_slow_client_disconnects_total")
    assert status == 1
    slow.settimeout(scaled(5))
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        while slow.recv(1 << 20):  # whatever was in flight, then the reset
            pass
        raise ConnectionResetError("closed")  # an orderly EOF counts as disconnected too
    slow.close()
    for ws, _ in [(fast, ""), *others]:
        await ws.close()
    assert node.terminate() == 0


async def _metric(port: int, name: str) -> float:
    from tests.support.nodes import http_get

    _, text = await asyncio.get_running_loop().run_in_executor(None, http_get, port, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


class Controller:
    """Drives ServerUtil calls inside a node process through the control app."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seq = 0

    async def __call__(self, call: str, *args: Any, **kwargs: Any) -> Any:
        self.seq += 1
        await self.ws.send(
            orjson.dumps({"id": self.seq, "call": call, "args": args, "kwargs": kwargs}).decode()
        )
        while True:
            answer = orjson.loads(await recv(self.ws, 10))
            if answer.get("id") == self.seq:
                if "error" in answer:
                    raise AssertionError(answer["error"])
                return answer["result"]


async def test_every_server_util_call_inside_a_node_process(tmp_path: Path) -> None:
    node = start_node(tmp_path, MEMORY)
    control_ws, control_id = await client(node.port)
    call = Controller(control_ws)
    (a, a_id), (b, b_id) = await client(node.port), await client(node.port)

    assert await call("join_group", a_id, ["g1", "g2"]) is True
    assert await call("join_group", b_id, "g2") is True
    assert await call("send_to_group", ["g1", "g2"], "hello", ack=True) == 2
    assert await recv(a) == "hello" and await recv(b) == "hello"
    assert await call("send", [a_id], {"direct": 1}) is None
    assert orjson.loads(await recv(a)) == {"direct": 1}
    assert await call("bind", b_id, "user-7") is True
    assert await call("send_by_flag", "user-7", "flagged", ack=True) == 1
    assert await recv(b) == "flagged"
    assert await call("send_to_all", "all", exclude=[control_id], ack=True) == 2
    assert await recv(a) == "all" and await recv(b) == "all"
    assert await call("get_connection_count") == 3
    assert await call("get_group_count", "g2") == 2
    assert sorted(await call("get_group_client_ids", "g2")) == sorted([a_id, b_id])
    assert await call("get_groups") == ["g1", "g2"]
    assert await call("flag_exists", "user-7") is True
    assert await call("get_flag", b_id) == "user-7"
    assert await call("get_client_ids_by_flag", "user-7") == [b_id]
    assert await call("set_session", a_id, {"x": 1}) is True
    assert await call("update_session", a_id, {"y": 2}) is True
    assert await call("get_session", a_id) == {"x": 1, "y": 2}
    assert await call("exists", a_id) is True
    assert await call("leave_group", a_id, "g1") is True
    assert await call("dissolve_group", "g2") == 2
    assert await call("get_groups") == []
    assert await call("unbind", b_id) is True
    assert await call("flag_exists", "user-7") is False
    nodes = await call("get_nodes")
    assert len(nodes) == 1 and nodes[0]["connections"] == 3 and nodes[0]["instance"] in a_id
    await call("bind", a_id, "user-8")
    assert await call("close_by_flag", "user-8", 4008, "flag closed") == 1
    with pytest.raises(ConnectionClosed) as closed:
        await recv(a)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
    assert await call("close", [b_id], 4009, "bye") == 1
    with pytest.raises(ConnectionClosed) as closed:
        await recv(b)
    assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == (
        4009,
        "bye",
    )
    assert await call("exists", b_id) is False
    assert await nothing_more(control_ws)
    await control_ws.close()
    assert node.terminate() == 0


def test_a_node_stops_at_once_when_its_broker_is_gone(tmp_path: Path) -> None:
    from tests.support.nodes import http_get
    from tests.support.redis_servers import start_redis

    redis = start_redis(tmp_path / "redis")
    try:
        node = start_node(tmp_path, {"FANOUT_URL": redis.url, "FANOUT_PUBLISH_TIMEOUT": "10"})
        redis.kill()
        deadline = time.monotonic() + scaled(10)
        while http_get(node.port, "/healthz")[0] != 503:
            assert time.monotonic() < deadline, "the node did not notice the broker was gone"
            time.sleep(0.1)
        started = time.monotonic()
        assert node.terminate() == 0
        assert time.monotonic() - started < 3  # no goodbye that waits out the publish timeout
    finally:
        redis.stop()
