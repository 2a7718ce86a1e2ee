"""The real thing: the project's image built from its Dockerfile, docker-compose.yml brought up with podman.

For each broker profile: clients through the load balancer land on all three nodes, the demo chat
crosses them, a publish from outside the cluster arrives (``fanout`` run in a node container, and a
publisher on the host through the broker's published port), a stopped node's clients reconnect to the
others within seconds and the node gets new clients again once started, and the load balancer restarted
while a node is down serves. Base images are cached in podman's store (tests/support/containers.py);
every container, network and volume of the compose project is removed, pass or fail.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection

from fanout import ServerUtil
from tests.support import containers, free_port, scaled
from tests.support.nodes import ROOT, demo_client


@pytest.fixture(autouse=True, scope="module")
def _tools() -> None:
    """No skipping: a machine without the tools fails here, saying what to install."""
    missing = containers.missing_tools()
    assert not missing, f"needs {', '.join(missing)} (scripts/test.sh installs them from Debian)"


IMAGE = "localhost/fanout-node:latest"
NODES = {"redis": ("node1", "node2", "node3"), "amqp": ("amqp-node1", "amqp-node2", "amqp-node3")}
BROKERS = {"redis": "redis", "amqp": "rabbitmq"}


@pytest.fixture(scope="module")
def image() -> Iterator[dict[str, float]]:
    """Base and stand-in images (cached), then the project's image from its Dockerfile; their timings."""
    timings = containers.setup()
    start = time.monotonic()
    containers.build(ROOT, IMAGE)
    timings["project image"] = time.monotonic() - start
    print("\ncontainer setup timings:", {k: round(v, 1) for k, v in timings.items()})
    yield timings


# the first test pays for the image fixture: on a new machine that builds the base and stand-in images
# (debootstrap, several minutes) before the project's image
@pytest.mark.timeout(900)
def test_image_runs_unprivileged_with_pinned_dependencies(image: dict[str, float]) -> None:
    script = (
        "import importlib.metadata as m, json, os;"
        "print(json.dumps([os.getuid(), {d.metadata['Name'].lower().replace('_', '-'): d.version"
        " for d in m.distributions()}]))"
    )
    result = containers.podman("run", "--rm", "--entrypoint", "python", IMAGE, "-c", script)
    uid, installed = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert uid != 0
    pins = {}
    for line in (ROOT / "deploy" / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    assert installed.pop("fanout") == "0.1.0"
    assert installed == {k: v for k, v in pins.items() if k != "setuptools"}  # all pinned, no leftovers


async def frame_where(ws: ClientConnection, check: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    """The next frame for which ``check`` holds (presence frames and the like come in between)."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        frame = orjson.loads(await asyncio.wait_for(ws.recv(), max(deadline - time.monotonic(), 0.01)))
        if check(frame):
            return frame


async def lb_client(port: int, name: str = "ann") -> tuple[ClientConnection, str]:
    """A demo chat client through the load balancer, and the node id from its ``online`` frame."""
    ws, _ = await demo_client(port, name)
    online = await frame_where(ws, lambda f: f.get("type") == "online")
    return ws, online["node"]


async def clients_until(
    port: int, wanted: set[str], timeout: float = 15.0
) -> list[tuple[ClientConnection, str]]:
    """Connect clients through the load balancer until they cover every node in ``wanted``."""
    clients: list[tuple[ClientConnection, str]] = []
    deadline = time.monotonic() + scaled(timeout)
    while not wanted <= {node for _, node in clients}:
        assert time.monotonic() < deadline, f"clients landed on {sorted({n for _, n in clients})} only"
        try:
            clients.append(await lb_client(port))
        except (OSError, AssertionError, TimeoutError):  # the LB answers 502 while no node is up yet
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.05)
    return clients


async def eventually(probe: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not await probe():
        assert time.monotonic() - start < scaled(timeout), what
        await asyncio.sleep(0.2)
    return time.monotonic() - start


def container(project: str, service: str) -> str:
    return f"{project}_{service}_1"


def wait_healthy(name: str, timeout: float) -> float:
    """Run the container's health check (podman does not here by itself) until it passes."""
    start = time.monotonic()
    while containers.podman("healthcheck", "run", name, check=False).returncode != 0:
        assert time.monotonic() - start < scaled(timeout), f"{name} not healthy:\n{logs(name)}"
        time.sleep(0.5)
    return time.monotonic() - start


def logs(name: str) -> str:
    result = containers.podman("logs", "--tail", "40", name, check=False)
    return result.stdout + result.stderr


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["redis", "amqp"])
async def test_compose_cluster_in_containers(backend: str, image: dict[str, float]) -> None:
    project = f"fanouttest{uuid.uuid4().hex[:8]}"
    lb_port, broker_port = free_port(), free_port()
    environ = {
        "FANOUT_LB_PORT": str(lb_port),
        "FANOUT_REDIS_PORT" if backend == "redis" else "FANOUT_AMQP_PORT": str(broker_port),
        "FANOUT_NAMESPACE": "fanout",
        "FANOUT_MODE": "routing",
    }
    profiles = (backend,)
    names = [container(project, s) for s in NODES[backend]]
    broker = container(project, BROKERS[backend])
    timings: dict[str, float] = {}
    clients: list[tuple[ClientConnection, str]] = []

    def up(*services: str) -> None:
        containers.compose(project, "up", "-d", *services, profiles=profiles, extra_env=environ)

    try:
        start = time.monotonic()
        # the broker first, until its health check passes (podman-compose on podman 4.3 skips
        # `condition: service_healthy`); then the nodes must start without a single restart
        up(BROKERS[backend])
        wait_healthy(broker, 90)
        up()
        for name in names:
            wait_healthy(name, 30)
        timings["up"] = time.monotonic() - start
        restarts = [
            containers.podman("inspect", "--format", "{{.RestartCount}}", n).stdout.strip() for n in names
        ]
        assert restarts == ["0", "0", "0"], [logs(n) for n in names]
        label = f"label=io.podman.compose.project={project}"
        running = containers.podman("ps", "--filter", label, "--format", "{{.Names}}").stdout.split()
        assert sorted(running) == sorted([broker, *names, container(project, "lb")])  # not the other broker

        # through the load balancer, on all three nodes
        clients = await clients_until(lb_port, {"node1", "node2", "node3"})
        by_node = {node: ws for ws, node in clients}

        # the demo chat crosses nodes
        await by_node["node1"].send('{"text": "from node1", "name": "ann"}')
        for ws, _ in clients:
            chat = await frame_where(ws, lambda f: f.get("type") == "chat")
            assert (chat["text"], chat["node"]) == ("from node1", "node1")

        # a publish from outside: `fanout` in a node container (FANOUT_URL is in its environment) ...
        containers.podman("exec", names[1], "fanout", "send-to-group", "lobby", '{"text": "from exec"}')
        for ws, _ in clients:
            assert (await frame_where(ws, lambda f: "type" not in f))["text"] == "from exec"
        # ... and a publisher on the host through the broker's published port
        url = (
            f"redis://127.0.0.1:{broker_port}/0"
            if backend == "redis"
            else f"amqp://guest:guest@127.0.0.1:{broker_port}/"
        )
        # the Redis nodes keep the lobby's history (compose's FANOUT_HISTORY): a publisher says the same
        history = "group:lobby" if backend == "redis" else ""
        async with ServerUtil(url, namespace="fanout", history=history) as util:
            assert await util.send_to_group("lobby", {"text": "from the host"}, ack=True) == len(clients)
            assert {r["node_id"] for r in await util.get_nodes()} == {"node1", "node2", "node3"}
        for ws, _ in clients:
            assert (await frame_where(ws, lambda f: "type" not in f))["text"] == "from the host"

        # node2 stops: its clients reconnect through the LB to the others within seconds
        doomed = [ws for ws, node in clients if node == "node2"]
        start = time.monotonic()
        # (in a thread: the clients must answer the node's closing handshake meanwhile)
        await asyncio.to_thread(containers.podman, "stop", "-t", "10", names[1])
        timings["node stop"] = time.monotonic() - start
        start = time.monotonic()
        for ws in doomed:
            await ws.wait_closed()
            _, node = await asyncio.wait_for(lb_client(lb_port), scaled(5))
            assert node in {"node1", "node3"}
        timings["reconnect"] = time.monotonic() - start
        assert timings["node stop"] < scaled(5)
        assert timings["reconnect"] < scaled(5) + len(doomed)

        # the load balancer restarted while node2 is down: it starts and serves
        await asyncio.to_thread(containers.podman, "restart", "-t", "5", container(project, "lb"))
        start = time.monotonic()
        survivors = await clients_until(lb_port, {"node1", "node3"}, timeout=10)
        timings["lb restart to serving"] = time.monotonic() - start
        assert {node for _, node in survivors} == {"node1", "node3"}
        clients += survivors

        # node2 started again (on a new address): it gets new clients again
        containers.podman("start", names[1])
        start = time.monotonic()
        wait_healthy(names[1], 20)
        dns = containers.podman("exec", container(project, "lb"), "getent", "ahostsv4", "fanout-nodes").stdout
        print("fanout-nodes:", sorted({line.split()[0] for line in dns.splitlines()}))
        clients += await clients_until(lb_port, {"node2"}, timeout=20)
        timings["node back in rotation"] = time.monotonic() - start
    finally:
        for ws, _ in clients:
            await ws.close()
        print(f"\n{backend} timings:", {k: round(v, 1) for k, v in timings.items()})
        start = time.monotonic()
        containers.remove_project(project)
        print(f"{backend} down: {time.monotonic() - start:.1f} s")
    assert containers.leftovers(project) == []
