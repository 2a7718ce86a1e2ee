"""A worker application for tests: it records every event it handles, one JSON line per event.

The file is ``$RECORDING_WORKER_DIR/<pid>.jsonl`` (one per worker process, appended and flushed at once,
so a worker killed mid-way leaves what it had handled). What a client sends steers it:

* ``slow:<seconds>`` - the handler sleeps first (a worker can be killed in the middle of it);
* ``fail`` - the handler raises, unless the file ``$RECORDING_WORKER_DIR/heal`` exists;
* ``session:<n>`` - the handler sets ``{"n": n}`` in the connection's session (then the next event of
  that connection must see it);
* ``echo:<text>`` - the handler sends ``<text>`` back to the client through ``event.util``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import orjson

from fanout.events import Event


class RecordingWorker:
    def __init__(self) -> None:
        self.dir = Path(os.environ["RECORDING_WORKER_DIR"])
        self.file = (self.dir / f"{os.getpid()}.jsonl").open("ab", buffering=0)

    def _record(self, event: Event, **extra: Any) -> None:
        line = {
            "pid": os.getpid(),
            "id": event.event_id,
            "kind": event.kind.value,
            "cid": event.client_id,
            "node": event.node_id,
            "seq": event.seq,
            "redelivered": event.redelivered,
            "t": time.time(),
            "session": event.session,
            "flag": event.flag,
            "code": event.code,
            "reason": event.reason,
            "resumed_from": event.resumed_from,
            **extra,
        }
        self.file.write(orjson.dumps(line) + b"\n")

    async def on_open(self, event: Event) -> None:
        self._record(event)

    async def on_close(self, event: Event) -> None:
        self._record(event)

    async def on_presence(self, event: Event) -> None:
        self._record(event, group=event.group, change=event.change)

    async def on_message(self, event: Event) -> None:
        data = event.data if isinstance(event.data, str) else ""
        if data.startswith("slow:"):
            self._record(event, data=data, phase="start")
            await asyncio.sleep(float(data[5:]))
        elif data == "fail" and not (self.dir / "heal").exists():
            raise RuntimeError("told to fail")
        elif data.startswith("session:"):
            await event.util.update_session(event.client_id, {"n": int(data[8:])})
        elif data.startswith("echo:"):
            await event.util.send(event.client_id, data[5:])
        self._record(event, data=data)


app = RecordingWorker


def read_records(directory: Path) -> list[dict[str, Any]]:
    """Every record of every worker process, in handling order (by time)."""
    records = []
    for path in directory.glob("*.jsonl"):
        # a worker may be writing its next line right now: only whole lines (ending in a newline) count
        for line in path.read_bytes().split(b"\n")[:-1]:
            if line.strip():
                records.append(orjson.loads(line))
    return sorted(records, key=lambda r: r["t"])
