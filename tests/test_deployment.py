"""docker-compose.yml: valid for every backend and mode, and its node services really form a cluster.

Here the node services run as local processes with the environment compose would give them (service host
names pointed at the local brokers); tests/test_containers.py runs the real images with podman.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from fanout import ServerUtil
from tests.support.nodes import (
    ROOT,
    STARTED,
    NodeProcess,
    demo_client,
    free_port,
    recv,
    scaled,
    unique_namespace,
)

LOCAL_HOSTS = {"redis://redis:": "redis://127.0.0.1:", "@rabbitmq:": "@127.0.0.1:"}
#: the node services of each profile, and the broker service they depend on
NODES = {"redis": ("node1", "node2", "node3"), "amqp": ("amqp-node1", "amqp-node2", "amqp-node3")}
BROKERS = {"redis": "redis", "amqp": "rabbitmq"}


def compose_config(env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        ["docker-compose", "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


@pytest.mark.parametrize("backend", ["redis", "amqp"])
@pytest.mark.parametrize("mode", ["routing", "fanout"])
def test_compose_file_is_valid(backend: str, mode: str) -> None:
    config = compose_config({"FANOUT_MODE": mode})
    services = config["services"]
    assert {"redis", "rabbitmq", "lb", *NODES["redis"], *NODES["amqp"]} <= set(services)
    assert [p["published"] for p in services["lb"]["ports"]] == [8080]
    assert "profiles" not in services["lb"] and "depends_on" not in services["lb"]  # starts with no node up
    assert services[BROKERS[backend]]["profiles"] == [backend]
    for number, name in enumerate(NODES[backend], 1):
        service = services[name]
        environment = service["environment"]
        assert (environment["FANOUT_BACKEND"], environment["FANOUT_MODE"]) == (backend, mode)
        assert environment["FANOUT_NODE_ID"] == f"node{number}"
        assert service["profiles"] == [backend]
        assert service["depends_on"] == {BROKERS[backend]: {"condition": "service_healthy"}}
        assert environment["FANOUT_URL"].startswith("redis://redis:" if backend == "redis" else "amqp://")
        assert "fanout-nodes" in service["networks"]["default"]["aliases"]


def _start_service(service: dict[str, Any], tmp_path: Path, name: str) -> NodeProcess:
    env = {k: str(v) for k, v in service["environment"].items()}
    for remote, local in LOCAL_HOSTS.items():
        env["FANOUT_URL"] = env["FANOUT_URL"].replace(remote, local)
    port = free_port()
    env.update(FANOUT_HOST="127.0.0.1", FANOUT_PORT=str(port), FANOUT_HEARTBEAT_INTERVAL="0.5")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    full_env.update(env)
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"  # fanout-node
    assert "entrypoint" not in service and "command" not in service  # the image's: fanout-node
    log_path = tmp_path / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(["fanout-node"], env=full_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    node = NodeProcess(port, full_env, proc, log_path)
    STARTED.append(node)
    node.wait_healthy()
    return node


async def _next_not_presence(ws: Any) -> Any:
    """The next frame that is not a presence event: the compose file turns presence on in the demo's lobby,
    so each client also hears the others join, at a moment that depends on the presence leader's timing."""
    while (message := orjson.loads(await recv(ws))).get("type") == "presence":
        pass
    return message


@pytest.mark.parametrize("backend", ["redis", "amqp"])
async def test_compose_node_services_form_a_cluster(backend: str, tmp_path: Path) -> None:
    assert shutil.which("fanout-node", path=str(Path(sys.executable).parent))
    namespace = unique_namespace()
    config = compose_config({"FANOUT_NAMESPACE": namespace})
    nodes = [_start_service(config["services"][n], tmp_path, n) for n in NODES[backend]]
    try:
        clients = [await demo_client(node.port) for node in nodes]  # the demo chat admits them to "lobby"
        for ws, _ in clients:
            assert orjson.loads(await recv(ws))["type"] == "online"  # who is online, first
        url, history = nodes[0].env["FANOUT_URL"], nodes[0].env.get("FANOUT_HISTORY", "")
        async with ServerUtil(url, namespace=namespace, heartbeat_interval=0.5, history=history) as util:
            await asyncio.sleep(scaled(1))
            records = await util.get_nodes()
            assert [r["node_id"] for r in records] == ["node1", "node2", "node3"]
            assert await util.send_to_group("lobby", {"text": "hello"}, ack=True) == 3
            for ws, _ in clients:
                assert await _next_not_presence(ws) == {"text": "hello"}
            await clients[0][0].send('{"text": "from node1", "name": "ann"}')  # the demo chat, across nodes
            for ws, _ in clients:
                message = await _next_not_presence(ws)
                assert (message["type"], message["text"], message["node"]) == ("chat", "from node1", "node1")
        for ws, _ in clients:
            await ws.close()
    finally:
        codes = [node.terminate() for node in nodes]
    assert codes == [0, 0, 0]
