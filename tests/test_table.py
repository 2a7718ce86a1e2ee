"""The per-node connection table: resolution and the subscriptions membership changes require."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fanout import naming
from fanout.commands import Target
from fanout.config import Mode
from fanout.naming import Address
from fanout.table import NOT_FOUND, Change, ConnectionTable

INSTANCE = "node-1.boot1"
BASE = frozenset({naming.ALL, naming.node(INSTANCE)})


class Conn:
    """Stands for a websocket connection; the table stores it and hands it back."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id

    def __repr__(self) -> str:
        return f"Conn({self.client_id})"


def make(mode: Mode = Mode.ROUTING, *client_ids: str) -> ConnectionTable[Conn]:
    table: ConnectionTable[Conn] = ConnectionTable(INSTANCE, mode)
    for client_id in client_ids:
        table.add(client_id, Conn(client_id))
    return table


def ids(conns: list[Conn]) -> list[str]:
    return sorted(c.client_id for c in conns)


def g(name: str) -> Address:
    return naming.group(name)


def f(name: str) -> Address:
    return naming.flag(name)


# --------------------------------------------------------------------------- resolution


def test_resolve_reaches_each_connection_once_across_groups() -> None:
    table = make(Mode.ROUTING, "a", "b", "c", "d")
    table.join("a", ["g1", "g2", "g3"])
    table.join("b", ["g2"])
    table.join("c", ["g3"])
    conns = table.resolve(Target.groups("g1", "g2", "g3", "g1"))
    assert ids(conns) == ["a", "b", "c"]
    assert len(conns) == 3


def test_resolve_flags_deduplicates_and_excludes() -> None:
    table = make(Mode.ROUTING, "a", "b", "c")
    table.bind("a", "u1")
    table.bind("b", "u1")
    table.bind("c", "u2")
    assert ids(table.resolve(Target.flags("u1", "u2", "u1"))) == ["a", "b", "c"]
    assert ids(table.resolve(Target.flags("u1", "u2"), exclude=["b"])) == ["a", "c"]
    assert table.resolve(Target.flags("nobody")) == []


def test_resolve_groups_with_exclude() -> None:
    table = make(Mode.ROUTING, "a", "b")
    table.join("a", ["g"])
    table.join("b", ["g"])
    assert ids(table.resolve(Target.groups("g"), exclude=("a", "zzz"))) == ["b"]
    assert table.resolve(Target.groups("g"), exclude=("a", "b")) == []


def test_resolve_all_with_and_without_exclude() -> None:
    table = make(Mode.FANOUT, "a", "b", "c")
    assert ids(table.resolve(Target.all())) == ["a", "b", "c"]
    assert ids(table.resolve(Target.all(), exclude=["b", "unknown"])) == ["a", "c"]
    assert make(Mode.FANOUT).resolve(Target.all()) == []


def test_resolve_clients_ignores_unknown_ids_and_duplicates() -> None:
    table = make(Mode.ROUTING, "a", "b")
    assert ids(table.resolve(Target.clients("a", "x", "a", "node-9.q.1"))) == ["a"]
    assert ids(table.resolve(Target.clients("a", "b"), exclude=["a"])) == ["b"]
    assert table.resolve(Target.clients()) == []


def test_resolve_returns_the_stored_objects() -> None:
    table = make(Mode.ROUTING)
    conn = Conn("a")
    table.add("a", conn)
    assert table.resolve(Target.clients("a"))[0] is conn
    assert table.get("a") is conn
    assert "a" in table
    assert len(table) == 1


def test_adding_a_client_id_twice_is_refused() -> None:
    table = make(Mode.ROUTING, "a")
    with pytest.raises(ValueError, match="'a'"):
        table.add("a", Conn("a"))


# --------------------------------------------------------------------------- subscriptions


def test_group_address_from_first_member_to_last() -> None:
    table = make(Mode.ROUTING, "a", "b")
    assert table.wanted() == BASE
    assert table.join("a", ["lobby"]) == Change(True, frozenset({g("lobby")}))
    assert table.join("b", ["lobby"]) == Change(True)  # already subscribed
    assert table.wanted() == BASE | {g("lobby")}
    assert table.leave("a", ["lobby"]) == Change(True)  # b is still there
    assert table.leave("b", ["lobby"]) == Change(True, unsubscribe=frozenset({g("lobby")}))
    assert table.wanted() == BASE


def test_rebinding_replaces_the_old_flag() -> None:
    table = make(Mode.ROUTING, "a")
    assert table.bind("a", "old") == Change(True, frozenset({f("old")}))
    change = table.bind("a", "new")
    assert change == Change(True, frozenset({f("new")}), frozenset({f("old")}))
    assert table.flag_of("a") == "new"
    assert table.resolve(Target.flags("old")) == []
    assert ids(table.resolve(Target.flags("new"))) == ["a"]
    assert table.flag_holders("old") == frozenset()
    assert table.wanted() == BASE | {f("new")}


def test_rebinding_keeps_a_flag_other_connections_still_hold() -> None:
    table = make(Mode.ROUTING, "a", "b")
    table.bind("a", "shared")
    table.bind("b", "shared")
    assert table.bind("a", "mine") == Change(True, frozenset({f("mine")}))
    assert ids(table.resolve(Target.flags("shared"))) == ["b"]


def test_binding_the_same_flag_again_changes_nothing() -> None:
    table = make(Mode.ROUTING, "a")
    table.bind("a", "u1")
    assert table.bind("a", "u1") == Change(True)
    assert table.flag_holders("u1") == {"a"}


def test_unbind() -> None:
    table = make(Mode.ROUTING, "a", "b")
    table.bind("a", "u1")
    assert table.unbind("a") == Change(True, unsubscribe=frozenset({f("u1")}))
    assert table.flag_of("a") is None
    assert table.unbind("a") == Change(True)  # exists, has no flag
    assert table.unbind("zzz") == NOT_FOUND


def test_closing_leaves_every_group_and_the_flag() -> None:
    table = make(Mode.ROUTING, "a", "b")
    table.join("a", ["solo", "shared"])
    table.join("b", ["shared"])
    table.bind("a", "u-a")
    table.bind("b", "u-b")
    table.sessions["a"]["k"] = 1
    change = table.remove("a")
    assert change == Change(True, unsubscribe=frozenset({g("solo"), f("u-a")}))
    assert "a" not in table
    assert "a" not in table.sessions
    assert table.groups_of("a") == frozenset()
    assert table.flag_of("a") is None
    assert table.group_members("shared") == {"b"}
    assert table.resolve(Target.groups("solo", "shared")) == [table.get("b")]
    assert table.resolve(Target.flags("u-a")) == []
    assert table.wanted() == BASE | {g("shared"), f("u-b")}
    assert table.remove("a") == NOT_FOUND


def test_dissolve_empties_the_group_on_this_node() -> None:
    table = make(Mode.ROUTING, "a", "b")
    table.join("a", ["room", "other"])
    table.join("b", ["room"])
    assert table.dissolve("room") == Change(True, unsubscribe=frozenset({g("room")}))
    assert table.resolve(Target.groups("room")) == []
    assert table.groups_of("a") == {"other"}
    assert table.groups_of("b") == frozenset()
    assert table.group_names() == ["other"]
    assert table.wanted() == BASE | {g("other")}
    assert table.dissolve("room") == NOT_FOUND  # no local members any more
    # b can join again and the address comes back
    assert table.join("b", ["room"]) == Change(True, frozenset({g("room")}))


def test_unknown_connections_are_not_found() -> None:
    table = make(Mode.ROUTING)
    for change in (table.join("x", ["g"]), table.leave("x", ["g"]), table.bind("x", "f"), table.unbind("x")):
        assert change == NOT_FOUND
        assert not change.found
    assert table.wanted() == BASE


def test_fanout_mode_never_changes_subscriptions() -> None:
    table = make(Mode.FANOUT, "a", "b")
    for change in (
        table.join("a", ["g1", "g2"]),
        table.bind("a", "u"),
        table.bind("a", "v"),
        table.leave("a", ["g1"]),
        table.dissolve("g2"),
        table.remove("a"),
    ):
        assert change.found
        assert change.empty
    assert table.wanted() == {naming.ALL}
    assert table.base_addresses() == {naming.ALL}


def test_fanout_mode_still_resolves_groups_and_flags() -> None:
    table = make(Mode.FANOUT, "a", "b")
    table.join("a", ["g"])
    table.bind("b", "u")
    assert ids(table.resolve(Target.groups("g"))) == ["a"]
    assert ids(table.resolve(Target.flags("u"))) == ["b"]


# --------------------------------------------------------------------------- against a model

CLIENTS = ["c1", "c2", "c3", "c4"]
GROUPS = ["g1", "g2", "g3", "with space"]
FLAGS = ["f1", "f2", "f3"]


class TableMachine(RuleBasedStateMachine):
    """Random operations on a table against a plain model, checking every Change on the way."""

    mode = Mode.ROUTING

    def __init__(self) -> None:
        super().__init__()
        self.table = make(self.mode)
        self.conns: set[str] = set()
        self.groups: dict[str, set[str]] = {}
        self.flag: dict[str, str] = {}
        # what a backend applying every Change in order would be subscribed to
        self.subscribed = set(self.table.base_addresses())

    def expected_wanted(self) -> set[Address]:
        if self.mode is Mode.FANOUT:
            return {naming.ALL}
        return (
            {naming.ALL, naming.node(INSTANCE)}
            | {g(name) for name, members in self.groups.items() if members}
            | {f(name) for name in self.flag.values()}
        )

    def apply(self, change: Change, found: bool) -> None:
        assert change.found is found
        if self.mode is Mode.FANOUT:
            assert change.empty
            return
        assert not change.subscribe & change.unsubscribe
        assert not change.subscribe & self.subscribed, "subscribes to an address it already has"
        assert change.unsubscribe <= self.subscribed, "drops an address it does not have"
        self.subscribed = (self.subscribed | change.subscribe) - change.unsubscribe

    @rule(client=st.sampled_from(CLIENTS))
    def add(self, client: str) -> None:
        if client in self.conns:
            with pytest.raises(ValueError):
                self.table.add(client, Conn(client))
            return
        self.table.add(client, Conn(client))
        self.conns.add(client)

    @rule(client=st.sampled_from(CLIENTS))
    def remove(self, client: str) -> None:
        change = self.table.remove(client)
        found = client in self.conns
        self.conns.discard(client)
        for members in self.groups.values():
            members.discard(client)
        self.flag.pop(client, None)
        self.apply(change, found)

    @rule(client=st.sampled_from(CLIENTS), groups=st.lists(st.sampled_from(GROUPS), max_size=3))
    def join(self, client: str, groups: list[str]) -> None:
        change = self.table.join(client, groups)
        found = client in self.conns
        if found:
            for name in groups:
                self.groups.setdefault(name, set()).add(client)
        self.apply(change, found)

    @rule(client=st.sampled_from(CLIENTS), groups=st.lists(st.sampled_from(GROUPS), max_size=3))
    def leave(self, client: str, groups: list[str]) -> None:
        change = self.table.leave(client, groups)
        found = client in self.conns
        for name in groups:
            self.groups.get(name, set()).discard(client)
        self.apply(change, found)

    @rule(client=st.sampled_from(CLIENTS), flag=st.sampled_from(FLAGS))
    def bind(self, client: str, flag: str) -> None:
        change = self.table.bind(client, flag)
        found = client in self.conns
        if found:
            self.flag[client] = flag
        self.apply(change, found)

    @rule(client=st.sampled_from(CLIENTS))
    def unbind(self, client: str) -> None:
        change = self.table.unbind(client)
        self.flag.pop(client, None)
        self.apply(change, client in self.conns)

    @rule(group=st.sampled_from(GROUPS))
    def dissolve(self, group: str) -> None:
        change = self.table.dissolve(group)
        members = self.groups.pop(group, set())
        self.apply(change, bool(members))

    @precondition(lambda self: self.mode is Mode.ROUTING)
    @invariant()
    def changes_track_wanted(self) -> None:
        assert self.subscribed == self.table.wanted()

    @invariant()
    def wanted_is_base_plus_groups_and_flags(self) -> None:
        assert self.table.wanted() == self.expected_wanted()

    @invariant()
    def resolution_matches_the_model(self) -> None:
        table = self.table
        assert set(table.connections) == self.conns
        for name in GROUPS:
            assert ids(table.resolve(Target.groups(name))) == sorted(self.groups.get(name, ()))
        for name in FLAGS:
            holders = sorted(c for c, flag in self.flag.items() if flag == name)
            assert ids(table.resolve(Target.flags(name))) == holders
        everyone = ids(table.resolve(Target.groups(*GROUPS), exclude=["c1"]))
        assert everyone == sorted(set().union(*self.groups.values()) - {"c1"})
        for client in CLIENTS:
            assert table.flag_of(client) == self.flag.get(client)
            assert table.groups_of(client) == {n for n, m in self.groups.items() if client in m}
        assert sorted(table.group_names()) == sorted(n for n, m in self.groups.items() if m)


class FanoutTableMachine(TableMachine):
    mode = Mode.FANOUT


TestRoutingTable = TableMachine.TestCase
TestRoutingTable.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestFanoutTable = FanoutTableMachine.TestCase
TestFanoutTable.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
