"""The ``fanout`` command against a real node process on Redis, with real websocket clients."""

from __future__ import annotations

import asyncio
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


def test_cli_usage_errors_exit_2() -> None:
    result = run_module("fanout", "set-session", "x.y.1", "[1, 2]", env=ENV)
    assert result.returncode == 2 and "JSON object" in result.stderr
    result = run_module("fanout", "frobnicate", env=ENV)
    assert result.returncode == 2
