"""Presence: who is in a group, cluster-wide, per flag (user). Pure: the caller passes the clock.

Every node with presence on publishes its *contribution* - for each presence group, the flags of its
local members - whenever it changes and every few seconds. Every node keeps the contributions of the
live nodes, and runs :class:`PresenceState` on their union: a (group, flag) pair that appears is a
**join**, one that disappears is a **leave** once it has stayed away for ``debounce`` seconds (a quick
reconnect, or a user's second tab, is not a leave). Two tabs of one user are one pair: one presence.

Only the *leader* (the live node with the smallest instance id) steps the state machine and announces
the transitions; it also tells the other nodes what it announced (:meth:`PresenceState.took`), so when it
dies the next leader knows what was announced and goes on from there - the leaves of the dead leader's
own users included. (A leader that dies between announcing to the members and telling the nodes leaves
that one transition to be announced again: at least once.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

Pair = tuple[str, str]  #: (group, flag)

JOIN = "join"
LEAVE = "leave"


def compile_patterns(raw: str) -> re.Pattern[str] | None:
    """``"room-*,lobby"`` -> a regex matching those group names (``*`` is any run); None if empty."""
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        return None
    return re.compile("|".join("(?:" + ".*".join(map(re.escape, p.split("*"))) + ")" for p in parts) + r"\Z")


@dataclass
class PresenceState:
    debounce: float
    contributions: dict[str, frozenset[Pair]] = field(default_factory=dict)  #: node -> its pairs
    announced: set[Pair] = field(default_factory=set)  #: pairs whose join was announced (and no leave yet)
    leaving: dict[Pair, float] = field(default_factory=dict)  #: pair -> when its leave is due

    def update(self, node: str, pairs: Iterable[Pair]) -> None:
        """A node's whole contribution (its snapshot)."""
        self.contributions[node] = frozenset(pairs)

    def forget(self, node: str) -> None:
        self.contributions.pop(node, None)

    def present(self, live: Iterable[str]) -> set[Pair]:
        """The pairs of the live nodes."""
        out: set[Pair] = set()
        for node in live:
            out |= self.contributions.get(node, frozenset())
        return out

    def seed(self, pairs: Iterable[Pair]) -> None:
        """Take ``pairs`` as already announced (what a node finds when it starts or comes back)."""
        self.announced |= set(pairs)

    def took(self, group: str, flag: str, change: str) -> None:
        """The leader announced this (a node that is not the leader follows what it says)."""
        if change == JOIN:
            self.announced.add((group, flag))
        else:
            self.announced.discard((group, flag))
        self.leaving.pop((group, flag), None)

    def step(self, live: Iterable[str], now: float) -> list[tuple[str, str, str]]:
        """The transitions due now: ``(group, flag, "join" | "leave")``, joins first."""
        present = self.present(live)
        out: list[tuple[str, str, str]] = []
        for pair in sorted(present - self.announced):
            self.announced.add(pair)
            out.append((*pair, JOIN))
        for pair in list(self.leaving):
            if pair in present:
                del self.leaving[pair]  # back within the debounce: never left
        for pair in sorted(self.announced - present):
            due = self.leaving.setdefault(pair, now + self.debounce)
            if due <= now:
                del self.leaving[pair]
                self.announced.discard(pair)
                out.append((*pair, LEAVE))
        return out
