"""The pure core (commands, encoding, the receive side, naming, routing, the per-node table, admission)
does no I/O and imports none of the network libraries, so it can be tested bytes-in/bytes-out and reused
by publishers in any setting."""

from __future__ import annotations

import subprocess
import sys

from tests.support.nodes import ROOT

PURE = [
    "commands",
    "protocol",
    "receive",
    "naming",
    "ids",
    "table",
    "routing",
    "directory",
    "config",
    "exceptions",
    "admission",
    "tokens",
    "presence",
    "events",
    "arguments",
    "history",
    "positioning",
    "idempotency",
    "v1",
]


def test_the_pure_core_imports_no_network_library() -> None:
    probe = (
        "import sys\n"
        + "".join(f"import fanout.{module}\n" for module in PURE)
        + "print(sorted(m for m in ('redis', 'aio_pika', 'aiormq', 'websockets') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_memory_only_user_never_imports_the_broker_clients() -> None:
    probe = (
        "import sys, asyncio\n"
        "from fanout import NoLiveNodes, ServerUtil\n"
        "async def main():\n"
        "    async with ServerUtil('memory://', in_process=True, heartbeat_interval=0.1) as util:\n"
        "        try:\n"
        "            await util.send_to_all('x')\n"
        "        except NoLiveNodes:  # no node in this process: published, and said so\n"
        "            pass\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in ('redis', 'aio_pika', 'websockets') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_nodes_websocket_wire_imports_no_asyncio() -> None:
    probe = "import sys\nimport node.wire\nprint('asyncio' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
