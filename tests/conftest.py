from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from fanout import Settings
from node import Node, NodeOptions
from tests.apps.control import ControlApp
from tests.support.nodes import STARTED, unique_namespace

MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture(autouse=True)
def _no_node_outlives_its_test() -> Iterator[None]:
    """A test that fails half-way must not leave its node processes behind (they hold ports and brokers).

    Only nodes started during the test itself: wider-scoped fixtures start theirs before this runs and
    stop them in their own teardown.
    """
    before = len(STARTED)
    yield
    while len(STARTED) > before:
        node = STARTED.pop()
        if node.proc.poll() is None:
            node.kill()


@pytest.fixture
async def make_node() -> AsyncIterator[MakeNode]:
    """Start in-process nodes: ``await make_node(app=None, settings=None, **NodeOptions fields)``.

    Memory backend in a fresh namespace unless ``settings`` is given, the control app unless ``app`` is;
    every node is stopped at the end of the test.
    """
    started: list[Node] = []

    async def make(app: object | None = None, settings: Settings | None = None, **options: Any) -> Node:
        node = Node(
            settings or Settings.create(f"memory://{unique_namespace()}", heartbeat_interval=0.2),
            NodeOptions(port=0, node_id="solo", **options),
            app if app is not None else ControlApp(),
        )
        await node.start()
        started.append(node)
        return node

    yield make
    for node in started:
        await node.stop()
