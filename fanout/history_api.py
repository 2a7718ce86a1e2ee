"""Continuity at the publisher's edge: what ``get_history`` answers, and the history settings that nodes
announce in their heartbeats and publishers compare with theirs. No I/O.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from .config import Settings
from .exceptions import ConfigMismatch
from .history import Page

#: what each announced history setting is called in the messages
_VARIABLES = {
    "history": "FANOUT_HISTORY",
    "cache": "FANOUT_CACHE",
    "size": "FANOUT_HISTORY_SIZE",
    "ttl": "FANOUT_HISTORY_TTL",
}


def _patterns(raw: str) -> str:
    """A pattern list in one spelling: ``"group:b, group:a"`` and ``"group:a,group:b"`` are the same."""
    return ",".join(sorted({part.strip() for part in raw.split(",") if part.strip()}))


def announced(settings: Settings) -> dict[str, Any]:
    """The history settings a node announces (``NodeInfo.extra["history"]``) and a publisher must share:
    which targets keep a history or are cache targets, how many entries and for how long."""
    return {
        "history": _patterns(settings.history),
        "cache": _patterns(settings.cache),
        "size": settings.history_size,
        "ttl": float(settings.history_ttl),
    }


def mismatch(ours: dict[str, Any], theirs: Any, node_id: str, namespace: str) -> ConfigMismatch | None:
    """What differs between this publisher's history settings and what node ``node_id`` announced
    (``None`` for a node that announces none: one from before history existed)."""
    if theirs is None or theirs == ours:  # (every publish checks every live node: the usual case first)
        return None
    if not isinstance(theirs, dict):
        theirs = {}
    differences = [
        (_VARIABLES[key], value, theirs.get(key)) for key, value in ours.items() if theirs.get(key) != value
    ]
    if not differences:
        return None
    said = "; ".join(f"{variable} {mine!r} here, {found!r} there" for variable, mine, found in differences)
    return ConfigMismatch(
        differences[0][0],
        f"this publisher's history settings differ from those of node {node_id} of namespace {namespace!r} "
        f"({said}): sends to history targets would not be stored and recovered as the nodes expect",
    )


def answer(page: Page) -> dict[str, Any]:
    """``get_history``'s answer: ``{"epoch", "offset", "entries": [{"offset", "data"}, ...]}``, each
    ``data`` as the sender gave it (a JSON payload as its value, text as ``str``, binary as ``bytes``)."""
    entries = []
    for entry in page.entries:
        data: Any
        if entry.binary:
            data = entry.payload
        elif entry.json:
            data = orjson.loads(entry.payload)
        else:
            data = entry.payload.decode("utf-8", "replace")
        entries.append({"offset": entry.offset, "data": data})
    return {"epoch": page.epoch, "offset": page.offset, "entries": entries}


def as_json(result: dict[str, Any]) -> dict[str, Any]:
    """``get_history``'s answer fit for JSON (the HTTP API, the CLI): binary data as ``data_b64``."""
    entries = [
        {"offset": entry["offset"], "data_b64": base64.b64encode(entry["data"]).decode()}
        if isinstance(entry.get("data"), bytes)
        else entry
        for entry in result.get("entries", ())
    ]
    return {**result, "entries": entries}


def positions_room(streams: tuple[str, ...] | list[str]) -> int:
    """At most how many bytes the positions line of a send to ``streams`` adds to its message."""
    return 4 + sum(6 * len(stream) + 40 for stream in streams)


__all__ = ["announced", "answer", "as_json", "mismatch", "positions_room"]
