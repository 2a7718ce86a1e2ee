"""Where sends and closes are published, in fanout and routing mode."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fanout import naming
from fanout.commands import Close, Request, Send, Target, TargetKind
from fanout.config import Mode
from fanout.routing import new_dedupe_id, owner_address, route, split_by_owner

A1, A2 = "node-a.b0.1", "node-a.b0.2"
B1 = "node.b.x1.7"  # a node id with dots: the owner is everything before the last dot
OWNER_A, OWNER_B = "node-a.b0", "node.b.x1"


def test_fanout_mode_publishes_once_on_all() -> None:
    for target in (Target.clients(A1, B1), Target.groups("g1", "g2"), Target.flags("u"), Target.all()):
        command = Send(target, b"x", exclude=(A2,))
        assert route(command, Mode.FANOUT) == [(naming.ALL, command)]


def test_fanout_mode_keeps_the_command_as_is() -> None:
    close = Close(Target.groups("a", "b", "a"), 4000, "bye")
    [(address, routed)] = route(close, Mode.FANOUT)
    assert address == naming.ALL
    assert routed is close  # one publish: no dedupe id needed


def test_broadcast_in_routing_mode_goes_to_all() -> None:
    command = Send(Target.all(), b"x", exclude=(A1,))
    assert route(command, Mode.ROUTING) == [(naming.ALL, command)]


def test_client_ids_go_to_their_owners_only() -> None:
    request = Request("1", "u-1")
    command = Send(Target.clients(A1, B1, A2), b"x", binary=True, exclude=(A2,), request=request)
    routes = route(command, Mode.ROUTING)
    assert routes == [
        (naming.node(OWNER_A), Send(Target.clients(A1, A2), b"x", True, (A2,), request)),
        (naming.node(OWNER_B), Send(Target.clients(B1), b"x", True, (A2,), request)),
    ]
    for _, routed in routes:
        assert routed.dedupe_id is None  # each connection is named on one node only


def test_malformed_client_ids_are_dropped() -> None:
    command = Close(Target.clients("garbage", A1, "", "no-dots", "x.y"), 1000)
    assert route(command, Mode.ROUTING) == [(naming.node(OWNER_A), Close(Target.clients(A1), 1000))]


def test_only_malformed_client_ids_publish_nothing() -> None:
    for mode in Mode:
        assert route(Send(Target.clients("garbage", ""), b"x"), mode) == []
        assert route(Send(Target.clients(), b"x"), mode) == []


def test_one_group_is_one_publish_without_dedupe() -> None:
    command = Send(Target.groups("lobby"), b"x")
    assert route(command, Mode.ROUTING) == [(naming.group("lobby"), command)]


def test_several_groups_share_one_dedupe_id() -> None:
    command = Send(Target.groups("g1", "g2", "g1", "g3"), b"x", exclude=(A1,))
    routes = route(command, Mode.ROUTING)
    assert [address for address, _ in routes] == [naming.group(n) for n in ("g1", "g2", "g3")]
    dedupe_ids = {routed.dedupe_id for _, routed in routes}
    assert len(dedupe_ids) == 1
    [dedupe_id] = dedupe_ids
    assert dedupe_id
    for _, routed in routes:
        # every copy names all the groups, so a node in g1 and g2 delivers once (and only once)
        assert routed.target == command.target
        assert routed.exclude == (A1,)


def test_flags_route_like_groups() -> None:
    routes = route(Close(Target.flags("u1", "u2"), 4001, "r"), Mode.ROUTING)
    assert [address for address, _ in routes] == [naming.flag("u1"), naming.flag("u2")]
    assert routes[0][1].dedupe_id == routes[1][1].dedupe_id is not None
    assert route(Close(Target.flags("u1", "u1")), Mode.ROUTING)[0][1].dedupe_id is None


def test_each_multi_address_send_gets_a_fresh_dedupe_id() -> None:
    command = Send(Target.groups("g1", "g2"), b"x")
    first = route(command, Mode.ROUTING)[0][1].dedupe_id
    second = route(command, Mode.ROUTING)[0][1].dedupe_id
    assert first != second
    assert len({new_dedupe_id() for _ in range(1000)}) == 1000


def test_empty_group_list_publishes_nothing() -> None:
    assert route(Send(Target.groups(), b"x"), Mode.ROUTING) == []


def test_split_by_owner() -> None:
    assert split_by_owner([A1, B1, "bad", A2]) == {OWNER_A: [A1, A2], OWNER_B: [B1]}
    assert split_by_owner([]) == {}


def test_owner_address() -> None:
    assert owner_address(OWNER_B, Mode.ROUTING) == naming.node(OWNER_B)
    assert owner_address(OWNER_B, Mode.FANOUT) == naming.ALL


owners = st.sampled_from(["n1.a", "n2.b", "x.y.z.c"])
client_ids = st.builds(lambda o, s: f"{o}.{s}", owners, st.sampled_from(["1", "2", "a", "zz"]))


@given(st.lists(client_ids | st.sampled_from(["junk", "", "a.b"]), max_size=12))
def test_routing_by_owner_covers_every_valid_id_exactly_once(names: list[str]) -> None:
    routes = route(Send(Target.clients(*names), b"x"), Mode.ROUTING)
    addresses = [address for address, _ in routes]
    assert len(set(addresses)) == len(addresses)
    delivered = []
    for address, routed in routes:
        assert routed.target.kind is TargetKind.CLIENTS
        assert address == naming.node(routed.target.names[0].rpartition(".")[0])
        assert all(name.rpartition(".")[0] == address.name for name in routed.target.names)
        delivered.extend(routed.target.names)
    assert sorted(delivered) == sorted(n for n in names if n.count(".") >= 2)
