"""An echo application for the node: every text or binary message comes back as it came.

What a websocket conformance suite needs of a server (docs/benchmarks.md, "Conformance"):

    FANOUT_WELCOME=0 FANOUT_CLIENT_RATE=0 FANOUT_PING_INTERVAL=0 FANOUT_MAX_FRAME=16777216 \\
        python -m node --app bench.echo_app:Echo --port 9001
    ../shared/tools/autobahn/run.sh ws://127.0.0.1:9001/
"""

from __future__ import annotations

from typing import Any


class Echo:
    async def on_connect(self, request: Any) -> None:
        return None  # every client is a guest: the suite sends no credentials

    async def on_message(self, conn: Any, data: str | bytes) -> None:
        await conn.send(data)
