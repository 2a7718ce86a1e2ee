"""``fanout-node --processes N``: N node processes on one port, started and stopped as one."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from fanout import ServerUtil
from tests.support import scaled
from tests.support.nodes import client, recv, run_module, start_node, unique_namespace
from tests.support.workers import wait_until

URL = "redis://127.0.0.1:6379/0"


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


async def _nodes(util: ServerUtil, count: int) -> list[dict[str, object]]:
    for _ in range(100):
        nodes = await util.get_nodes()
        if len(nodes) == count:
            return nodes
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {count} nodes, got {await util.get_nodes()}")


async def test_two_processes_share_one_port_and_stop_together(tmp_path: Path) -> None:
    ns = unique_namespace()
    env = {"FANOUT_URL": URL, "FANOUT_NAMESPACE": ns, "FANOUT_NODE_ID": "multi", "FANOUT_ACCEPT_RATE": "0"}
    parent = start_node(tmp_path, env, extra_args=["--processes", "2"])
    async with ServerUtil(URL, namespace=ns, heartbeat_interval=0.5) as util:
        nodes = await _nodes(util, 2)
        assert sorted(str(n["node_id"]) for n in nodes) == ["multi-0", "multi-1"]
        clients = [await client(parent.port) for _ in range(60)]
        await asyncio.sleep(1.2)  # the next heartbeats carry the counts
        counts = {str(n["node_id"]): int(str(n["connections"])) for n in await util.get_nodes()}
        assert sum(counts.values()) == 60
        assert min(counts.values()) > 0, counts  # the kernel spread the connections over both
        assert await util.send_to_all("to everyone", ack=True) == 60
        for ws, _ in clients:
            assert await recv(ws) == "to everyone"
        parent.proc.send_signal(signal.SIGTERM)
        assert parent.proc.wait(timeout=scaled(15)) == 0
        for _ in range(50):
            if not util.live_nodes():
                break
            await asyncio.sleep(0.1)
        assert util.live_nodes() == set()  # both said goodbye


async def test_one_process_dying_stops_the_others_and_the_status_says_so(tmp_path: Path) -> None:
    ns = unique_namespace()
    env = {"FANOUT_URL": URL, "FANOUT_NAMESPACE": ns, "FANOUT_NODE_ID": "pair"}
    parent = start_node(tmp_path, env, extra_args=["--processes", "2"])
    async with ServerUtil(URL, namespace=ns, heartbeat_interval=0.5) as util:
        await _nodes(util, 2)
        children = _children(parent.proc.pid)
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)
        assert parent.proc.wait(timeout=scaled(15)) != 0
        assert "exited with status" in parent.log_path.read_text()


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's new parent may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_the_processes_exit_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    ns = unique_namespace()
    env = {"FANOUT_URL": URL, "FANOUT_NAMESPACE": ns, "FANOUT_NODE_ID": "orphans"}
    parent = start_node(tmp_path, env, extra_args=["--processes", "2"])
    async with ServerUtil(URL, namespace=ns, heartbeat_interval=0.5) as util:
        await _nodes(util, 2)
    children = [int(pid) for pid in _children(parent.proc.pid)]
    assert len(children) == 2
    parent.proc.send_signal(signal.SIGKILL)  # no chance to stop them itself
    parent.proc.wait(timeout=scaled(5))
    try:
        wait_until(lambda: not any(_running(pid) for pid in children), 15, "the orphans to exit")
    finally:
        for pid in filter(_running, children):
            os.kill(pid, signal.SIGKILL)
    assert "Traceback" not in parent.log()  # they stopped as on SIGTERM


def test_processes_need_a_fixed_port() -> None:
    result = run_module("node", "--processes", "2", "--port", "0", env={"FANOUT_BACKEND": "memory"})
    assert result.returncode == 2
    assert "--processes" in result.stderr and "port" in result.stderr
