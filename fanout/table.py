"""The per-node table of connections, groups, flags and sessions. Pure: no I/O.

It answers three questions for the node:

* which local connections does a command reach? (:meth:`ConnectionTable.resolve`: each connection
  once, exclusions applied);
* which addresses must the node be subscribed to right now? (:meth:`ConnectionTable.wanted`), and,
  for each change of membership, which addresses it adds or drops (:class:`Change`) - in routing mode
  a group or flag address is wanted from its first local member to its last;
* what is this node's part of the answer to a query? (:meth:`ConnectionTable.answer`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from . import naming
from .commands import Json, QueryKind, Target, TargetKind
from .config import Mode
from .ids import owner_of
from .naming import Address

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Change:
    """The outcome of a membership change: did the connection exist, and what to (un)subscribe."""

    found: bool
    subscribe: frozenset[Address] = frozenset()
    unsubscribe: frozenset[Address] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.subscribe or self.unsubscribe)


NOT_FOUND = Change(found=False)
_UNCHANGED = Change(found=True)

#: queries about one connection: only the node that owns it answers
OWNER_QUERIES = frozenset({QueryKind.EXISTS, QueryKind.SESSION, QueryKind.FLAG_OF, QueryKind.IN_GROUP})


class ConnectionTable(Generic[C]):
    """Connections of one node instance, keyed by client id, with their groups, flag and session."""

    def __init__(self, instance: str, mode: Mode) -> None:
        self.instance = instance
        self.mode = mode
        self.connections: dict[str, C] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self._groups: dict[str, set[str]] = {}  # group -> client ids
        self._member_of: dict[str, set[str]] = {}  # client id -> groups
        self._flags: dict[str, set[str]] = {}  # flag -> client ids
        self._flag_of: dict[str, str] = {}  # client id -> flag

    # ------------------------------------------------------------------ addresses

    def base_addresses(self) -> frozenset[Address]:
        """What the node needs with no connection at all."""
        if self.mode is Mode.FANOUT:
            return frozenset({naming.ALL})
        return frozenset({naming.ALL, naming.node(self.instance)})

    def wanted(self) -> frozenset[Address]:
        """Every address the node must be subscribed to now."""
        if self.mode is Mode.FANOUT:
            return self.base_addresses()
        return (
            self.base_addresses()
            | {naming.group(g) for g in self._groups}
            | {naming.flag(f) for f in self._flags}
        )

    def _change(self, added: Iterable[Address] = (), dropped: Iterable[Address] = ()) -> Change:
        if self.mode is Mode.FANOUT:
            return _UNCHANGED
        return Change(True, frozenset(added), frozenset(dropped))

    # ------------------------------------------------------------------ connections

    def __len__(self) -> int:
        return len(self.connections)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self.connections

    def get(self, client_id: str) -> C | None:
        return self.connections.get(client_id)

    def add(self, client_id: str, connection: C) -> None:
        if client_id in self.connections:
            raise ValueError(f"client id {client_id!r} is already in the table")
        self.connections[client_id] = connection
        self.sessions[client_id] = {}

    def remove(self, client_id: str) -> Change:
        """Forget a closed connection: it leaves all its groups and its flag."""
        if self.connections.pop(client_id, None) is None:
            return NOT_FOUND
        self.sessions.pop(client_id, None)
        groups_left = self.leave(client_id, tuple(self._member_of.get(client_id, ())))
        flag_left = self.unbind(client_id)
        return self._change(dropped=groups_left.unsubscribe | flag_left.unsubscribe)

    # ------------------------------------------------------------------ groups

    def join(self, client_id: str, groups: Iterable[str]) -> Change:
        if client_id not in self.connections:
            return NOT_FOUND
        mine = self._member_of.setdefault(client_id, set())
        added = []
        for name in groups:
            members = self._groups.get(name)
            if members is None:
                members = self._groups[name] = set()
                added.append(naming.group(name))
            members.add(client_id)
            mine.add(name)
        return self._change(added=added)

    def leave(self, client_id: str, groups: Iterable[str]) -> Change:
        # no "found" check: remove() calls this after the connection is gone
        mine = self._member_of.get(client_id)
        if mine is None:
            return self._change() if client_id in self.connections else NOT_FOUND
        dropped = []
        for name in groups:
            if name not in mine:
                continue
            mine.discard(name)
            members = self._groups[name]
            members.discard(client_id)
            if not members:
                del self._groups[name]
                dropped.append(naming.group(name))
        if not mine:
            del self._member_of[client_id]
        return self._change(dropped=dropped)

    def dissolve(self, group: str) -> Change:
        """Every local member leaves ``group``; ``found`` says whether it had local members."""
        members = self._groups.pop(group, None)
        if members is None:
            return NOT_FOUND
        for client_id in members:
            mine = self._member_of[client_id]
            mine.discard(group)
            if not mine:
                del self._member_of[client_id]
        return self._change(dropped=[naming.group(group)])

    def groups_of(self, client_id: str) -> frozenset[str]:
        return frozenset(self._member_of.get(client_id, ()))

    def group_members(self, group: str) -> frozenset[str]:
        return frozenset(self._groups.get(group, ()))

    def group_names(self) -> list[str]:
        return list(self._groups)

    # ------------------------------------------------------------------ flags

    def bind(self, client_id: str, flag: str) -> Change:
        """Bind ``client_id`` to ``flag``; a connection has one flag, so this replaces the old one."""
        if client_id not in self.connections:
            return NOT_FOUND
        old = self._flag_of.get(client_id)
        if old == flag:
            return self._change()
        dropped = self.unbind(client_id).unsubscribe if old is not None else frozenset()
        holders = self._flags.get(flag)
        added = []
        if holders is None:
            holders = self._flags[flag] = set()
            added.append(naming.flag(flag))
        holders.add(client_id)
        self._flag_of[client_id] = flag
        # re-binding to a flag whose address we just dropped is a no-op on the broker
        return self._change(added=set(added) - dropped, dropped=dropped - set(added))

    def unbind(self, client_id: str) -> Change:
        old = self._flag_of.pop(client_id, None)
        if old is None:
            return self._change() if client_id in self.connections else NOT_FOUND
        holders = self._flags[old]
        holders.discard(client_id)
        if holders:
            return self._change()
        del self._flags[old]
        return self._change(dropped=[naming.flag(old)])

    def flag_of(self, client_id: str) -> str | None:
        return self._flag_of.get(client_id)

    def flag_holders(self, flag: str) -> frozenset[str]:
        return frozenset(self._flags.get(flag, ()))

    # ------------------------------------------------------------------ resolution

    def resolve(self, target: Target, exclude: Iterable[str] = ()) -> list[C]:
        """The local connections ``target`` reaches, each once, minus ``exclude``."""
        conns = self.connections
        if target.kind is TargetKind.ALL:
            if not exclude:
                return list(conns.values())
            skip = set(exclude)
            return [c for cid, c in conns.items() if cid not in skip]
        ids: set[str]
        if target.kind is TargetKind.CLIENTS:
            ids = {cid for cid in target.names if cid in conns}
        else:
            index = self._groups if target.kind is TargetKind.GROUPS else self._flags
            ids = set()
            for name in target.names:
                members = index.get(name)
                if members:
                    ids |= members
        if exclude:
            ids.difference_update(exclude)
        return [conns[cid] for cid in ids]

    # ------------------------------------------------------------------ queries

    def owns(self, client_id: str) -> bool:
        """Whether ``client_id`` was handed out by this node instance (open or not)."""
        return owner_of(client_id) == self.instance

    def answers(self, kind: QueryKind, arg: str) -> bool:
        """Whether this node answers the query (per-connection queries: only the owner does)."""
        return kind not in OWNER_QUERIES or self.owns(arg)

    def answer(self, kind: QueryKind, arg: str, args: tuple[str, ...] = ()) -> Json:
        """This node's part of the answer (``NODE``, the node's own record, is not the table's)."""
        match kind:
            case QueryKind.IN_GROUP:
                return bool(args) and args[0] in self._member_of.get(arg, ())
            case QueryKind.GROUP_FLAGS:
                flags = {self._flag_of.get(cid) for cid in self._groups.get(arg, ())}
                return sorted(f for f in flags if f is not None)
            case QueryKind.FLAGS:
                return sorted(self._flags)
            case QueryKind.GROUP_SESSIONS:
                return {cid: self.sessions.get(cid, {}) for cid in sorted(self._groups.get(arg, ()))}
            case QueryKind.FLAGS_CLIENTS:
                return {flag: sorted(self._flags[flag]) for flag in args if flag in self._flags}
            case QueryKind.PRESENCE:
                counts: dict[str, int] = {}
                for cid in self._groups.get(arg, ()):
                    flag = self._flag_of.get(cid)
                    if flag is not None:
                        counts[flag] = counts.get(flag, 0) + 1
                return counts
            case QueryKind.EXISTS:
                return arg in self.connections
            case QueryKind.SESSION:
                return self.sessions.get(arg)
            case QueryKind.FLAG_OF:
                return self._flag_of.get(arg)
            case QueryKind.FLAG_EXISTS:
                return arg in self._flags
            case QueryKind.FLAG_CLIENTS:
                return sorted(self._flags.get(arg, ()))
            case QueryKind.CONNECTIONS:
                return len(self.connections)
            case QueryKind.GROUP_COUNT:
                return len(self._groups.get(arg, ()))
            case QueryKind.GROUP_CLIENTS:
                return sorted(self._groups.get(arg, ()))
            case QueryKind.GROUPS:
                return list(self._groups)
            case QueryKind.NODE:
                raise ValueError("the NODE query is answered by the node, not its table")
