"""The ``fanout`` command against a real node process on Redis, with real websocket clients."""

from __future__ import annotations

import asyncio
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from tests.support.nodes import client, nothing_more, recv, run_module, start_node, unique_namespace

ENV = {"FANOUT_URL": "redis://127.0.0.1:6379/0", "FANOUT_HEARTBEAT_INTERVAL": "0.5"}


async def fanout(env: dict[str, str], *args: str, stdin: str | None = None) -> Any:
    """Run the CLI; return its parsed JSON output (None when it prints nothing)."""
    result = await asyncio.get_running_loop().run_in_executor(
        None, lambda: run_module("fanout", *args, env=env, input_text=stdin)
    )
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout) if result.stdout.strip() else None


async def test_every_cli_command(tmp_path: Path) -> None:
    env = {**ENV, "FANOUT_NAMESPACE": unique_namespace()}
    node = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "cli-node", "FANOUT_APP": "tests.apps.control:app"})
    (a, a_id), (b, b_id) = await client(node.port), await client(node.port)

    assert await fanout(env, "join", a_id, "lobby", "red") is True
    assert await fanout(env, "join", b_id, "lobby") is True
    assert await fanout(env, "send-to-group", "lobby", '{"text":"hi"}') is None
    assert await recv(a) == '{"text":"hi"}' and await recv(b) == '{"text":"hi"}'  # verbatim, no envelope
    assert await fanout(env, "send-to-group", "lobby", "red", "once", "--ack") == 2
    assert await recv(a) == "once" and await recv(b) == "once"
    assert await nothing_more(a)
    assert await fanout(env, "send", a_id, "bin", "--binary") is None
    assert await recv(a) == b"bin"
    assert await fanout(env, "send-to-all", "-", "--exclude", b_id, stdin="from stdin") is None
    assert await recv(a) == "from stdin"
    assert await fanout(env, "bind", b_id, "user-5") is True
    assert await fanout(env, "send-by-flag", "user-5", "flagged", "--ack") == 1
    assert await recv(b) == "flagged"
    assert await fanout(env, "get-flag", b_id) == "user-5"
    assert await fanout(env, "flag-exists", "user-5") is True
    assert await fanout(env, "flag-clients", "user-5") == [b_id]
    assert await fanout(env, "set-session", a_id, '{"lang":"fr"}') is True
    assert await fanout(env, "update-session", a_id, '{"tz":"UTC"}') is True
    assert await fanout(env, "session", a_id) == {"lang": "fr", "tz": "UTC"}
    assert await fanout(env, "count") == 2
    assert await fanout(env, "group-count", "lobby") == 2
    assert sorted(await fanout(env, "group-clients", "lobby")) == sorted([a_id, b_id])
    assert await fanout(env, "groups") == ["lobby", "red"]
    assert await fanout(env, "exists", a_id) is True
    nodes = await fanout(env, "nodes")
    assert [(n["node_id"], n["connections"]) for n in nodes] == [("cli-node", 2)]
    assert await fanout(env, "stats") == {
        "nodes": 1,
        "connections": 2,
        "groups": 2,
        "per_node": {"cli-node": 2},
    }
    assert await fanout(env, "leave", a_id, "red") is True
    assert await fanout(env, "dissolve", "lobby") == 2
    assert await fanout(env, "groups") == []
    assert await fanout(env, "unbind", b_id) is True
    assert await fanout(env, "flag-exists", "user-5") is False
    await fanout(env, "bind", a_id, "user-6")
    assert await fanout(env, "close-by-flag", "user-6", "--code", "4006", "--reason", "flag") == 1
    with pytest.raises(ConnectionClosed) as closed:
        await recv(a)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4006
    assert await fanout(env, "close", b_id, "--code", "4007", "--reason", "bye") == 1
    with pytest.raises(ConnectionClosed) as closed:
        await recv(b)
    assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == (
        4007,
        "bye",
    )
    assert await fanout(env, "exists", b_id) is False
    assert node.terminate() == 0


async def test_the_seeds_calls_from_the_cli(tmp_path: Path) -> None:
    env = {**ENV, "FANOUT_NAMESPACE": unique_namespace()}
    node = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "cli-node", "FANOUT_APP": "tests.apps.control:app"})
    (a, a_id), (b, b_id), (c, c_id) = [await client(node.port) for _ in range(3)]
    assert await fanout(env, "join", a_id, "room") is True and await fanout(env, "join", b_id, "room") is True
    assert await fanout(env, "bind", a_id, "ann") is True
    assert await fanout(env, "bind", a_id, "bob", "--no-replace") is False
    assert await fanout(env, "bind", b_id, "bob", "--no-replace") is True
    assert await fanout(env, "group-flags", "room") == ["ann", "bob"]
    assert await fanout(env, "group-flag-count", "room") == 2
    assert await fanout(env, "flags") == ["ann", "bob"] and await fanout(env, "flag-count") == 2
    assert await fanout(env, "group-sessions", "room") == {a_id: {}, b_id: {}}
    assert await fanout(env, "flags-clients", "ann", "zed") == {"ann": [a_id], "zed": []}
    assert await fanout(env, "in-group", a_id, "room") is True
    assert await fanout(env, "in-group", c_id, "room") is False
    assert await fanout(env, "presence", "room") == {"ann": 1, "bob": 1}
    await fanout(env, "send-bulk", orjson.dumps([[a_id, "for a"], [c_id, "for c"]]).decode())
    assert await recv(a) == "for a" and await recv(c) == "for c"
    await fanout(env, "send-bulk-by-flag", "-", stdin='[["bob", "for bob"]]')
    assert await recv(b) == "for bob"
    assert await fanout(env, "close", a_id, "--data", "last words") == 1
    assert await recv(a) == "last words"
    await asyncio.sleep(0.2)
    assert await fanout(env, "close-guests", "--older-than", "0.1", "--data", "guests out") == 1
    assert await recv(c) == "guests out"
    with pytest.raises(ConnectionClosed):
        await recv(c)
    assert await nothing_more(b)
    await b.close()
    assert node.terminate() == 0


def test_cli_usage_errors_exit_2() -> None:
    result = run_module("fanout", "set-session", "x.y.1", "[1, 2]", env=ENV)
    assert result.returncode == 2 and "JSON object" in result.stderr
    result = run_module("fanout", "frobnicate", env=ENV)
    assert result.returncode == 2
    # bad arguments are bad usage too, found before any broker is asked (no node runs in this namespace)
    env = {**ENV, "FANOUT_NAMESPACE": unique_namespace()}
    for args, error in (
        ((), "required: COMMAND"),
        (("count", "--timeout", "-1"), "--timeout"),
        (("--timeout", "soon", "count"), "--timeout"),
        (("count", "--mode", "both"), "--mode"),
        (("count", "--url", "ftp://x"), "--url"),
        (("--namespace", "no spaces", "count"), "--namespace"),
        (("close", "x.y.1", "--code", "99999"), "close code"),
        (("send-bulk", "not json"), "pairs are not JSON"),
        (("send-bulk-by-flag", "{}"), "JSON list"),
        (("send-bulk", '[["x.y.1", "a"], [42, "b"]]'), "send_bulk: pairs must be (name, data) pairs"),
        (("close-guests", "--older-than", "nan"), "--older-than: 'nan' is not a number of seconds >= 0"),
        (("close-guests", "--older-than", "-1"), "--older-than"),
        (("close", "x.y.1", "--reason", "r" * 124), "at most 123 bytes"),
    ):
        result = run_module("fanout", *args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert error in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    result = run_module("fanout", "count", env={**env, "FANOUT_LOG_LEVEL": "chatty"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "FANOUT_LOG_LEVEL" in result.stderr


def test_cli_version_and_help() -> None:
    result = run_module("fanout", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"fanout {metadata.version('fanout')}"
    result = run_module("fanout", "--help")
    assert result.returncode == 0
    for text in ("FANOUT_URL", "FANOUT_NAMESPACE", "FANOUT_MODE", "FANOUT_SECRET", "--url", "--version"):
        assert text in result.stdout, text
    result = run_module("fanout", "send-to-group", "--help")
    assert result.returncode == 0 and "--url" in result.stdout and "--timeout" in result.stdout


async def test_cli_global_options_before_or_after_the_command(tmp_path: Path) -> None:
    namespace = unique_namespace()
    node = start_node(tmp_path, {**ENV, "FANOUT_NAMESPACE": namespace})  # tests.apps.lobby: guests in lobby
    ws, _ = await client(node.port)
    url = ENV["FANOUT_URL"]
    # the options win over the environment, which points elsewhere
    env = {"FANOUT_URL": "redis://127.0.0.1:1/0", "FANOUT_NAMESPACE": "elsewhere", "FANOUT_BACKEND": "amqp"}
    assert (
        await fanout(env, "--url", url, "--namespace", namespace, "send-to-group", "lobby", "before") is None
    )
    assert await recv(ws) == "before"
    after = ("--url", url, "--namespace", namespace, "--mode", "routing", "--timeout", "3", "--ack")
    assert await fanout(env, "send-to-group", "lobby", "after", *after) == 1
    assert await recv(ws) == "after"
    mixed = ("--url", url, "count", "--namespace", namespace, "--timeout", "3")
    assert await fanout(env, *mixed) == 1
    # --mode reaches the cluster check: the nodes use routing mode
    result = run_module(
        "fanout", "--url", url, "count", "--namespace", namespace, "--mode", "fanout", env=env
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert await nothing_more(ws)
    await ws.close()
    assert node.terminate() == 0


def test_node_port_in_use_is_one_line_and_status_1(tmp_path: Path) -> None:
    env = {**ENV, "FANOUT_NAMESPACE": unique_namespace()}
    first = start_node(tmp_path, env)
    result = run_module("node", env={**env, "FANOUT_PORT": str(first.port)})
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"fanout-node: cannot listen on 127.0.0.1:{first.port}: address already in use"
    ]
    first.wait_healthy()  # the first node is not disturbed
    assert first.terminate() == 0


def test_missing_amqp_vhost_is_one_readable_line() -> None:
    vhost = f"nope-{uuid.uuid4().hex[:8]}"
    env = {"FANOUT_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}", "FANOUT_NAMESPACE": unique_namespace()}
    for module, args in (("fanout", ("count",)), ("node", ("--port", "0"))):
        result = run_module(module, *args, env=env)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert f"the broker refused virtual host '{vhost}'" in lines[0], lines[0]
        assert "InvalidFrameError" not in lines[0] and "guest:guest" not in lines[0]
