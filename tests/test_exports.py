"""The public names (pinned: removing one is a breaking change) and the fork-safety of SyncServerUtil."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import fanout
import node
from fanout import SyncServerUtil
from tests.support.nodes import client, recv, start_node, unique_namespace


def test_fanout_exports() -> None:
    assert sorted(fanout.__all__) == [
        "Admit",
        "BackendError",
        "BackendKind",
        "BackendUnavailable",
        "BadSignature",
        "ConfigError",
        "ConfigMismatch",
        "ConnectRequest",
        "FanoutError",
        "MessageTooLarge",
        "Mode",
        "NoLiveNodes",
        "NodeRecord",
        "NotConnected",
        "Outbox",
        "PayloadError",
        "ProtocolError",
        "QueryTimeout",
        "Reject",
        "ServerUtil",
        "Settings",
        "SyncServerUtil",
        "UnsupportedVersion",
        "Worker",
        "WorkerOptions",
        "__version__",
        "tokens",
    ]
    for name in fanout.__all__:
        assert getattr(fanout, name) is not None
    errors = [
        getattr(fanout, n)
        for n in fanout.__all__
        if n.endswith(
            (
                "Error",
                "Timeout",
                "Unavailable",
                "Signature",
                "Large",
                "Version",
                "Connected",
                "Mismatch",
                "Nodes",
            )
        )
    ]
    assert all(issubclass(e, fanout.FanoutError) for e in errors)


def test_node_exports() -> None:
    assert sorted(node.__all__) == ["Connection", "Node", "NodeOptions"]


async def test_sync_server_util_reconnects_in_a_forked_child(tmp_path: Path) -> None:
    """A SyncServerUtil connected before fork() (gunicorn/Celery prefork) works in the child."""
    namespace = unique_namespace()
    env = {"FANOUT_URL": "redis://127.0.0.1:6379/0", "FANOUT_NAMESPACE": namespace}
    node_process = start_node(tmp_path, env)
    ws, client_id = await client(node_process.port)
    sync = SyncServerUtil("redis://127.0.0.1:6379/0", namespace=namespace, heartbeat_interval=0.5)

    def parent_then_fork() -> list[int]:
        results = [sync.get_connection_count()]  # connected in the parent
        pid = os.fork()
        if pid == 0:  # the child must get its own connection, not wait on the parent's loop thread
            code = 1
            try:
                code = 0 if sync.send(client_id, "from the child", ack=True) == 1 else 2
            finally:
                os._exit(code)
        results.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        results.append(sync.get_connection_count())  # the parent's connection still works
        sync.disconnect()
        return results

    results = await asyncio.get_running_loop().run_in_executor(None, parent_then_fork)
    assert results == [1, 0, 1]
    assert await recv(ws) == "from the child"
    await ws.close()
    assert node_process.terminate() == 0
