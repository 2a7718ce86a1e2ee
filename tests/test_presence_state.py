"""The presence state machine, without a network: joins, debounced leaves, leaders following each other."""

from __future__ import annotations

from fanout.presence import JOIN, LEAVE, PresenceState, compile_patterns


def test_patterns() -> None:
    pattern = compile_patterns("room-*, lobby")
    assert pattern is not None
    assert [bool(pattern.match(g)) for g in ("room-1", "room-", "lobby", "lobby2", "xroom-1", "room")] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    assert compile_patterns(" , ") is None
    assert compile_patterns("a.b") is not None and not compile_patterns("a.b").match("axb")  # type: ignore[union-attr]


def test_two_tabs_are_one_presence_and_the_leave_waits_for_the_debounce() -> None:
    state = PresenceState(debounce=3)
    state.update("n1", {("room", "ann")})
    assert state.step({"n1", "n2"}, 0) == [("room", "ann", JOIN)]
    state.update("n2", {("room", "ann")})  # her second tab, on another node
    assert state.step({"n1", "n2"}, 1) == []
    state.update("n1", set())
    assert state.step({"n1", "n2"}, 2) == []  # still here through n2
    state.update("n2", set())
    assert state.step({"n1", "n2"}, 3) == []  # gone, but the debounce runs
    assert state.step({"n1", "n2"}, 5.9) == []
    assert state.step({"n1", "n2"}, 6.0) == [("room", "ann", LEAVE)]
    assert state.step({"n1", "n2"}, 20) == []


def test_back_within_the_debounce_is_neither_a_leave_nor_a_join() -> None:
    state = PresenceState(debounce=3)
    state.update("n1", {("room", "bob")})
    assert state.step({"n1"}, 0) == [("room", "bob", JOIN)]
    state.update("n1", set())
    assert state.step({"n1"}, 1) == []
    state.update("n1", {("room", "bob")})
    assert state.step({"n1"}, 2) == []
    assert state.step({"n1"}, 10) == []


def test_a_dead_nodes_pairs_leave() -> None:
    state = PresenceState(debounce=1)
    state.update("n1", {("room", "carol")})
    assert state.step({"n1"}, 0) == [("room", "carol", JOIN)]
    assert state.step(set(), 1) == []  # n1 no longer live
    assert state.step(set(), 2) == [("room", "carol", LEAVE)]


def test_a_new_leader_goes_on_from_what_the_old_one_announced() -> None:
    leader, follower = PresenceState(debounce=1), PresenceState(debounce=1)
    for state in (leader, follower):
        state.update("n1", {("room", "gus")})  # the leader's own user
        state.update("n3", {("room", "dave"), ("room", "eve")})
    live = {"n1", "n2", "n3"}
    announced = leader.step(live, 0)
    assert announced == [("room", "dave", JOIN), ("room", "eve", JOIN), ("room", "gus", JOIN)]
    for group, flag, change in (announced[0], announced[2]):  # it told of dave and gus, then died
        follower.took(group, flag, change)
    # n2 leads now: eve was never announced; gus (on the dead leader) leaves after the debounce
    assert follower.step({"n2", "n3"}, 0.5) == [("room", "eve", JOIN)]
    assert follower.step({"n2", "n3"}, 1.6) == [("room", "gus", LEAVE)]


def test_seeded_pairs_are_not_announced_again() -> None:
    state = PresenceState(debounce=1)
    state.update("old", {("room", "fay")})
    state.seed({("room", "fay")})
    assert state.step({"old"}, 0) == []
