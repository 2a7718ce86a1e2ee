"""Where a command is published. Pure: no I/O.

* fanout mode: every command goes to ``ALL`` (one channel / one fanout exchange).
* routing mode: a command goes to the addresses of its targets - ``ALL`` for broadcasts, the owning
  node's address for client ids (one publish per owner, carrying only that owner's ids), one address
  per group or flag. A command published on several addresses carries a ``dedupe_id`` so that a node
  receiving it more than once applies it once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace

from . import naming
from .commands import Close, Send, Target, TargetKind
from .config import Mode
from .ids import owner_of
from .naming import Address


def split_by_owner(client_ids: Iterable[str]) -> dict[str, list[str]]:
    """Client ids grouped by owning node instance; malformed ids (no owner) are left out."""
    owners: dict[str, list[str]] = {}
    for client_id in client_ids:
        owner = owner_of(client_id)
        if owner is not None:
            owners.setdefault(owner, []).append(client_id)
    return owners


def owner_address(owner: str, mode: Mode) -> Address:
    return naming.ALL if mode is Mode.FANOUT else naming.node(owner)


def new_dedupe_id() -> str:
    return os.urandom(8).hex()


def route(command: Send | Close, mode: Mode) -> list[tuple[Address, Send | Close]]:
    """The (address, command) pairs to publish so every targeted connection gets ``command``."""
    target = command.target
    if mode is Mode.FANOUT or target.kind is TargetKind.ALL:
        if target.kind is TargetKind.CLIENTS and not split_by_owner(target.names):
            return []
        return [(naming.ALL, command)]
    if target.kind is TargetKind.CLIENTS:
        return [
            (naming.node(owner), replace(command, target=Target(TargetKind.CLIENTS, tuple(ids))))
            for owner, ids in split_by_owner(target.names).items()
        ]
    make = naming.group if target.kind is TargetKind.GROUPS else naming.flag
    names = list(dict.fromkeys(target.names))
    if len(names) > 1:
        command = replace(command, dedupe_id=new_dedupe_id())
    return [(make(name), command) for name in names]
