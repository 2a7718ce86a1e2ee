from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.nodes import STARTED


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
