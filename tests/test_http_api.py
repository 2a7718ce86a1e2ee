"""The HTTP API on real node processes (Redis), real websocket clients, curl and php-cli."""

from __future__ import annotations

import asyncio
import base64
import inspect
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from fanout import ServerUtil
from node.api import CALLS
from tests.support import scaled
from tests.support.nodes import (
    ROOT,
    NodeProcess,
    client,
    http_get,
    nothing_more,
    recv,
    start_node,
    unique_namespace,
)
from tests.support.redis_servers import start_redis

KEY = "api-key-" + os.urandom(4).hex()


def post(
    port: int, path: str, body: Any = None, key: str | None = KEY, raw: bytes | None = None
) -> tuple[int, Any]:
    data = raw if raw is not None else orjson.dumps({} if body is None else body)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=scaled(10)) as answer:
            return answer.status, orjson.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


async def call(port: int, name: str, **args: Any) -> Any:
    status, answer = await asyncio.get_running_loop().run_in_executor(None, post, port, f"/api/{name}", args)
    assert status == 200, answer
    return answer["result"]


@pytest.fixture
def nodes(tmp_path: Path) -> list[NodeProcess]:
    env = {
        "FANOUT_URL": "redis://127.0.0.1:6379/0",
        "FANOUT_NAMESPACE": unique_namespace(),
        "FANOUT_API_KEY": KEY,
    }
    return [
        start_node(tmp_path, {**env, "FANOUT_NODE_ID": f"api{i}"}, app="tests.apps.control:app")
        for i in range(3)
    ]


async def test_every_call_over_http(nodes: list[NodeProcess]) -> None:
    port = nodes[0].port  # the API of one node reaches the whole cluster
    (a, a_id), (b, b_id), (c, c_id) = [await client(n.port) for n in nodes]
    assert await call(port, "join_group", client_id=a_id, groups=["room"]) is True
    assert await call(port, "join_group", client_id=b_id, groups="room") is True
    assert await call(port, "leave_group", client_id=b_id, groups="room") is True
    assert await call(port, "join_group", client_id=b_id, groups="room") is True
    assert await call(port, "bind", client_id=a_id, flag="ann") is True
    assert await call(port, "bind", client_id=a_id, flag="bob", replace=False) is False
    assert await call(port, "bind", client_id=c_id, flag="cid") is True
    assert await call(port, "unbind", client_id=c_id) is True
    assert await call(port, "set_session", client_id=a_id, data={"lang": "fr"}) is True
    assert await call(port, "update_session", client_id=a_id, data={"tz": "UTC"}) is True
    assert await call(port, "get_session", client_id=a_id) == {"lang": "fr", "tz": "UTC"}
    assert await call(port, "exists", client_id=c_id) is True
    assert await call(port, "flag_exists", flag="ann") is True
    assert await call(port, "get_flag", client_id=a_id) == "ann"
    assert await call(port, "get_client_ids_by_flag", flag="ann") == [a_id]
    assert await call(port, "get_client_ids_by_flags", flags=["ann", "x"]) == {"ann": [a_id], "x": []}
    assert await call(port, "get_connection_count") == 3
    assert await call(port, "get_group_count", group="room") == 2
    assert sorted(await call(port, "get_group_client_ids", group="room")) == sorted([a_id, b_id])
    assert await call(port, "get_groups") == ["room"]
    assert await call(port, "get_group_flags", group="room") == ["ann"]
    assert await call(port, "get_group_flag_count", group="room") == 1
    assert await call(port, "get_flags") == ["ann"] and await call(port, "get_flag_count") == 1
    assert await call(port, "get_group_sessions", group="room") == {
        a_id: {"lang": "fr", "tz": "UTC"},
        b_id: {},
    }
    assert await call(port, "is_in_group", client_id=a_id, group="room") is True
    assert await call(port, "get_presence", group="room") == {"ann": 1}
    assert [n["node_id"] for n in await call(port, "get_nodes")] == ["api0", "api1", "api2"]

    assert await call(port, "send", client_ids=c_id, data="to c") is None
    assert await recv(c) == "to c"
    assert await call(port, "send_by_flag", flags="ann", data={"x": 1}, ack=True) == 1
    assert await recv(a) == '{"x":1}'
    assert (
        await call(port, "send_to_group", groups="room", data_b64=base64.b64encode(b"\x00\xff").decode())
        is None
    )
    assert await recv(a) == b"\x00\xff" and await recv(b) == b"\x00\xff"
    assert await call(port, "send_to_all", data="all", exclude=[c_id], ack=True) == 2
    assert await recv(a) == "all" and await recv(b) == "all"
    assert await call(port, "send_bulk", pairs=[[a_id, "a1"], {"name": b_id, "data_b64": "AQ=="}]) is None
    assert await recv(a) == "a1" and await recv(b) == b"\x01"
    assert await call(port, "send_bulk_by_flag", pairs=[["ann", "for ann"]]) is None
    assert await recv(a) == "for ann"
    assert await nothing_more(c)
    assert await call(port, "dissolve_group", group="room") == 2
    assert await call(port, "close", client_ids=b_id, code=4001, reason="bye", data="last") == 1
    assert await recv(b) == "last"
    assert await call(port, "close_by_flag", flags="ann", code=4002) == 1
    assert await call(port, "close_guests", older_than=0) == 1  # c: no flag
    history = await call(port, "get_history", stream="group:room")  # (no history: nothing kept)
    assert history["offset"] == 0 and history["entries"] == [] and isinstance(history["epoch"], str)
    assert await call(port, "remove_history", stream="group:room") is None
    for name in CALLS:  # (every call was made above)
        assert name in inspect.getsource(test_every_call_over_http), name


async def test_batch_answers_in_order_with_errors_in_place(nodes: list[NodeProcess]) -> None:
    ws, cid = await client(nodes[1].port)
    batch = [
        {"call": "join_group", "args": {"client_id": cid, "groups": "room"}},
        {"call": "no_such_call"},
        {"call": "get_group_count", "args": {"group": "room"}},
        {"call": "send", "args": {"client_ids": cid, "data": "x", "bogus": 1}},
        {"call": "send_to_group", "args": {"groups": "room", "data": "batched"}},
    ]
    status, answer = await asyncio.get_running_loop().run_in_executor(
        None, post, nodes[0].port, "/api/batch", batch
    )
    assert status == 200
    results = answer["result"]
    assert results[0] == {"result": True}
    assert results[1]["status"] == 404 and results[1]["error"]["type"] == "NotFound"
    assert results[2] == {"result": 1}
    assert results[3]["status"] == 400
    assert results[4] == {"result": None}
    assert await recv(ws) == "batched"
    await ws.close()


def test_status_codes(nodes: list[NodeProcess]) -> None:
    port = nodes[0].port
    assert post(port, "/api/get_groups", key=None)[0] == 401
    assert post(port, "/api/get_groups", key="wrong")[0] == 401
    assert post(port, "/api/no_such_call")[0] == 404
    assert post(port, "/api/send", {"client_ids": "x"})[0] == 400  # data missing
    assert post(port, "/api/send", {"client_ids": "x", "data": "y", "unknown": 1})[0] == 400
    assert post(port, "/api/send", {"client_ids": "x", "data_b64": "not base64!"})[0] == 400
    assert post(port, "/api/send", raw=b"{not json")[0] == 400
    assert post(port, "/api/close", {"client_ids": "x", "code": 1005})[0] == 400  # not a sendable code
    os.kill(nodes[1].pid, signal.SIGSTOP)  # a live node that cannot answer: the query must time out
    try:
        status, answer = post(port, "/api/get_connection_count", {"timeout": 0.2})
    finally:
        os.kill(nodes[1].pid, signal.SIGCONT)
    assert status == 504 and answer["error"]["type"] == "QueryTimeout"
    status, answer = post(port, "/api/send_to_all", raw=orjson.dumps({"data": "x" * (2 << 20)}))
    assert status == 413 and "FANOUT_API_MAX_BODY" in answer["error"]["message"]


async def test_a_wrong_argument_is_a_400_naming_it(nodes: list[NodeProcess]) -> None:
    """Checked from the calls' argument table before anything is published: not a 503 from a query the
    nodes dropped, not an operator error, not "yes" taken as true; a typo'd field is named."""
    ws, cid = await client(nodes[0].port)
    port = nodes[1].port
    assert await call(port, "bind", client_id=cid, flag="ann") is True
    for name, args, message in (
        ("get_group_count", {"group": 42}, "get_group_count: group must be a string, got int 42"),
        ("flag_exists", {"flag": 42}, "flag_exists: flag must be a string, got int 42"),
        ("exists", {"client_id": 42}, "exists: client_id must be a string, got int 42"),
        ("send_by_flag", {"flags": 42, "data": "x"}, "send_by_flag: flags must be strings, got int 42"),
        (
            "send_by_flag",
            {"flags": ["ann", 4], "data": "x"},
            "send_by_flag: flags must be strings, got int 4",
        ),
        ("get_groups", {"timeout": "abc"}, "timeout must be a number of seconds > 0, got str 'abc'"),
        ("send_to_all", {"data": "x", "ack": "yes"}, "ack must be a bool (true or false), got str 'yes'"),
        ("get_group_count", {"grop": "lobby"}, "unknown field 'grop'; did you mean 'group'?"),
        ("get_group_count", {}, "get_group_count: missing field 'group' (a string)"),
    ):
        status, answer = await asyncio.get_running_loop().run_in_executor(
            None, post, port, f"/api/{name}", args
        )
        assert status == 400, (name, args, answer)
        assert answer["error"]["type"] in ("PayloadError", "BadRequest")
        assert message in answer["error"]["message"], (name, args, answer)
    assert await nothing_more(ws)  # none of them sent anything
    assert await call(port, "send_by_flag", flags="ann", data="x", ack=True, timeout=5) == 1
    assert await recv(ws) == "x"
    await ws.close()


def test_the_api_is_off_without_a_key(tmp_path: Path) -> None:
    node = start_node(tmp_path, {"FANOUT_BACKEND": "memory"}, app="tests.apps.control:app")
    assert post(node.port, "/api/get_groups")[0] == 404
    assert http_get(node.port, "/api/openapi.json")[0] == 404
    assert node.terminate() == 0


async def test_an_unreachable_broker_is_503(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    node = start_node(
        tmp_path,
        {"FANOUT_URL": redis.url, "FANOUT_API_KEY": KEY, "FANOUT_PUBLISH_TIMEOUT": "1"},
        app="tests.apps.control:app",
    )
    redis.kill()
    status, answer = await asyncio.get_running_loop().run_in_executor(
        None, post, node.port, "/api/send_to_all", {"data": "x"}
    )
    assert status == 503 and answer["error"]["type"] == "BackendUnavailable"
    node.kill()


def test_the_openapi_document_matches_the_real_routes(nodes: list[NodeProcess]) -> None:
    status, text = http_get(nodes[0].port, "/api/openapi.json")
    assert status == 200
    document = orjson.loads(text)
    paths = document["paths"]
    assert set(paths) == {f"/api/{name}" for name in CALLS} | {"/api/batch"}
    public = {
        n for n, m in inspect.getmembers(ServerUtil, inspect.iscoroutinefunction) if not n.startswith("_")
    }
    # every call is served
    assert public - {"connect", "disconnect", "watch_nodes", "check_cluster"} == set(CALLS)
    for path, item in paths.items():
        if path == "/api/batch":
            continue
        schema = item["post"]["requestBody"]["content"]["application/json"]["schema"]
        # the parameters the document names are exactly the ones the call takes (data_b64 besides data)
        method = getattr(ServerUtil, path[5:])
        params = set(list(inspect.signature(method).parameters)[1:])
        assert set(schema["properties"]) - {"data_b64"} == params, path
        # and the real route exists: a request with no arguments is refused for its arguments, not 404
        status, answer = post(nodes[0].port, path, {"timeout": 2} if "timeout" in params else {})
        assert status != 404, (path, answer)


def _run(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        args, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_the_curl_and_php_examples_run_against_a_real_node(nodes: list[NodeProcess]) -> None:
    ws, cid = await client(nodes[2].port)
    await call(nodes[0].port, "join_group", client_id=cid, groups="lobby")
    env = {"FANOUT_API_URL": f"http://127.0.0.1:{nodes[0].port}", "FANOUT_API_KEY": KEY}
    loop = asyncio.get_running_loop()
    out = await loop.run_in_executor(None, _run, ["bash", "examples/http/curl.sh"], env)
    assert out.splitlines() == ['{"result":null}', '{"result":null}', '{"result":1}']
    assert await recv(ws) == '{"text":"hello from curl"}' and await recv(ws) == b"\x00\x01"
    out = await loop.run_in_executor(None, _run, ["php", "examples/http/push.php"], env)
    assert out.strip() == "1"  # the PHP example pushed to the group and read its count
    assert orjson.loads(await recv(ws)) == {"text": "hello from PHP"}
    await ws.close()
