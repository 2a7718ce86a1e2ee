"""fanout/history.py (which targets keep a history, stream names, the positions line, a resume's replay) and
its place on the wire (fanout/protocol.py: stored sends, the positions line in front of a signed message).
Pure: no I/O."""

from __future__ import annotations

import hashlib
import hmac

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanout import protocol
from fanout.commands import Close, Command, Heartbeat, NodeInfo, Send, Target, TargetKind
from fanout.exceptions import BadSignature, ConfigError, MessageTooLarge, ProtocolError
from fanout.history import (
    ALL_STREAM,
    MAX_POSITIONS,
    Entry,
    Page,
    Policy,
    Positions,
    Replayed,
    attach_positions,
    cut_replay,
    flag_stream,
    group_stream,
    merge_replay,
    new_epoch,
    new_send_id,
    parse_stream,
    split_positions,
)
from fanout.protocol import Envelope

SECRET = b"s3cret"
STAMP = Envelope("u-lq2x8k0czz00aa11", 42, 1700000000.123, "fanout")

# --------------------------------------------------------------------------- Policy


def test_no_patterns_no_history() -> None:
    policy = Policy()
    assert not policy.enabled
    assert policy.streams_of(Target.all()) == ()
    assert policy.streams_of(Target.groups("lobby")) == ()
    assert policy.streams_of_member(["lobby"], "ann") == set()
    assert not policy.is_history(ALL_STREAM) and not policy.is_cache(ALL_STREAM)


def test_patterns_name_groups_flags_and_all() -> None:
    policy = Policy("group:room-*, flag:vip-*,all")
    assert policy.enabled
    assert policy.is_history("group:room-1") and policy.is_history("group:room-")
    assert not policy.is_history("group:lobby") and not policy.is_history("group:my-room-1")
    assert policy.is_history("flag:vip-ann") and not policy.is_history("flag:ann")
    assert not policy.is_history("flag:room-1")  # a group pattern is not a flag pattern
    assert policy.is_history(ALL_STREAM)
    assert not policy.is_history("room-1") and not policy.is_history("client:x")


def test_a_pattern_is_the_whole_name() -> None:
    policy = Policy("group:lobby,group:room,flag:a*b")
    assert policy.is_history("group:lobby") and policy.is_history("group:room")
    for other in ("group:lobby2", "group:xlobby", "group:room2", "group:lobbyroom", "group:lobby\n"):
        assert not policy.is_history(other), other
    assert policy.is_history("flag:ab") and policy.is_history("flag:a-to-b")
    assert not policy.is_history("flag:a-to-b-c") and not policy.is_history("flag:ba")


def test_a_star_matches_any_run_and_nothing_else_is_special() -> None:
    policy = Policy("group:*,flag:u.1+(x)")
    for name in ("lobby", "room 1", "a\nb", "é", "~%", "*"):
        assert policy.is_history(group_stream(name)), name
    assert policy.is_history("flag:u.1+(x)")
    assert not policy.is_history("flag:uX1+(x)") and not policy.is_history("flag:u.11(x)")


def test_all_is_history_only_when_named() -> None:
    assert not Policy("group:*,flag:*").is_history(ALL_STREAM)
    assert Policy("all").streams_of(Target.all()) == (ALL_STREAM,)
    assert Policy("group:*").streams_of(Target.all()) == ()


@pytest.mark.parametrize("raw", ["", " ", ",", " , ,"])
def test_empty_parts_are_ignored(raw: str) -> None:
    assert not Policy(raw).enabled
    assert Policy(raw + "group:a" + raw).is_history("group:a")


def test_cache_targets_keep_a_history_too() -> None:
    policy = Policy(history="group:chat-*", cache="group:ticker,flag:*")
    assert policy.is_cache("group:ticker") and policy.is_history("group:ticker")
    assert policy.is_cache("flag:ann") and policy.is_history("flag:ann")
    assert policy.is_history("group:chat-1") and not policy.is_cache("group:chat-1")
    assert not policy.is_history("group:other")
    assert Policy(cache="all").enabled and Policy(cache="all").streams_of(Target.all()) == (ALL_STREAM,)


@pytest.mark.parametrize(
    "part", ["group:", "flag:", "lobby", "groups:a", "Group:a", "ALL", "all:x", "client:x", "g:lobby", "*"]
)
def test_a_bad_pattern_is_a_config_error_naming_its_setting(part: str) -> None:
    with pytest.raises(ConfigError, match=r"^FANOUT_HISTORY: ") as caught:
        Policy(history=f"group:a,{part}")
    assert caught.value.setting == "FANOUT_HISTORY"
    assert repr(part) in str(caught.value)
    with pytest.raises(ConfigError, match=r"^FANOUT_CACHE: ") as caught:
        Policy(history="group:a", cache=part)
    assert caught.value.setting == "FANOUT_CACHE"


def test_streams_of_a_target() -> None:
    policy = Policy("group:room-*,flag:*")
    assert policy.streams_of(Target.groups("room-1", "lobby", "room-2", "room-1")) == (
        "group:room-1",
        "group:room-2",
    )
    assert policy.streams_of(Target.flags("ann", "bob", "ann")) == ("flag:ann", "flag:bob")
    assert policy.streams_of(Target.groups("lobby")) == ()
    assert policy.streams_of(Target.clients("node-1.x.1")) == ()  # client ids never have a stream
    assert policy.streams_of(Target.all()) == ()


def test_streams_of_a_member() -> None:
    policy = Policy("group:room-*,flag:vip-*,all")
    assert policy.streams_of_member(["room-1", "lobby", "room-2"], "vip-ann") == {
        "group:room-1",
        "group:room-2",
        "flag:vip-ann",
        ALL_STREAM,
    }
    assert policy.streams_of_member([], None) == {ALL_STREAM}
    assert policy.streams_of_member(["lobby"], "ann") == {ALL_STREAM}
    assert Policy("group:*").streams_of_member(["a"], "ann") == {"group:a"}
    assert Policy("flag:*").streams_of_member(["a"], "ann") == {"flag:ann"}


def test_describe_is_what_nodes_announce() -> None:
    assert Policy("group:a", "flag:b").describe() == "history=group:a;cache=flag:b"
    assert Policy().describe() == "history=;cache="


# --------------------------------------------------------------------------- stream names, ids


@given(st.text(min_size=1, max_size=30))
def test_stream_names_parse_back(name: str) -> None:
    assert parse_stream(group_stream(name)) == (TargetKind.GROUPS, name)
    assert parse_stream(flag_stream(name)) == (TargetKind.FLAGS, name)


def test_all_parses_and_other_names_do_not() -> None:
    assert parse_stream(ALL_STREAM) == (TargetKind.ALL, "")
    assert parse_stream("group:group:x") == (TargetKind.GROUPS, "group:x")
    for bad in ("", "group:", "flag:", "group", "lobby", "ALL", "all ", "Group:x", "c:x", "g:x"):
        with pytest.raises(ValueError, match="not a stream name"):
            parse_stream(bad)


def test_epochs_and_send_ids_are_random_hex() -> None:
    epochs = {new_epoch() for _ in range(50)}
    ids = {new_send_id() for _ in range(50)}
    assert len(epochs) == 50 and len(ids) == 50
    assert all(len(e) == 8 and int(e, 16) >= 0 for e in epochs)
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


def test_a_page_is_complete_after_since_when_nothing_after_it_was_trimmed() -> None:
    page = Page("e", 10, (), first=5)
    assert page.complete_after(4) and page.complete_after(9) and page.complete_after(10)
    assert not page.complete_after(3) and not page.complete_after(0)
    assert Page("e", 10, (), first=11).complete_after(10)  # none kept, none missed
    assert not Page("e", 10, (), first=11).complete_after(9)


# --------------------------------------------------------------------------- the positions line

epochs = st.text(max_size=12)
offsets = st.integers(1, 2**53)
positions_maps = st.dictionaries(st.text(max_size=20), st.tuples(epochs, offsets), max_size=8)


@given(positions_maps, st.binary(max_size=60))
def test_the_positions_line_round_trips(positions: Positions, message: bytes) -> None:
    data = attach_positions(b"v2;;" + message, positions)
    found, rest = split_positions(data)
    assert rest == b"v2;;" + message
    if positions:
        assert found == positions and list(found) == list(positions)
        line, _, after = data.partition(b"\n")
        assert line.startswith(b"h1 ") and after == rest
        assert orjson.loads(line[3:]) == {s: [o, e] for s, (e, o) in positions.items()}
    else:
        assert found is None and data == rest  # no positions: no line


def test_the_positions_line_layout() -> None:
    data = attach_positions(b"v2;;{}\nx", {"group:lobby": ("3f2a9c1e", 41), ALL_STREAM: ("0b7d", 7)})
    assert data == b'h1 {"group:lobby":[41,"3f2a9c1e"],"all":[7,"0b7d"]}\nv2;;{}\nx'


def test_a_message_without_a_positions_line_is_left_as_it_is() -> None:
    for data in (b"v2;;{}\n", b"", b"h1", b"h2 {}\nv2;;{}\n", b" h1 {}\n"):
        assert split_positions(data) == (None, data)


def test_the_positions_line_may_name_up_to_its_bound_of_streams() -> None:
    many = {f"group:{i}": ("e", i + 1) for i in range(MAX_POSITIONS)}
    assert split_positions(attach_positions(b"v2;;", many)) == (many, b"v2;;")
    too_many = {**many, "all": ("e", 1)}
    with pytest.raises(ProtocolError, match="at most 1000"):
        split_positions(attach_positions(b"v2;;", too_many))


@pytest.mark.parametrize(
    "line",
    [
        b"h1 ",  # no end
        b'h1 {"all":[1,"e"]}',  # no end
        b"h1 not json\n",
        b"h1 {\n",
        b'h1 [["all",1,"e"]]\n',
        b'h1 "all"\n',
        b"h1 null\n",
        b'h1 {"all":1}\n',
        b'h1 {"all":{"offset":1,"epoch":"e"}}\n',
        b'h1 {"all":[1]}\n',
        b'h1 {"all":[1,"e","x"]}\n',
        b'h1 {"all":["e",1]}\n',
        b'h1 {"all":[0,"e"]}\n',
        b'h1 {"all":[-1,"e"]}\n',
        b'h1 {"all":[1.0,"e"]}\n',
        b'h1 {"all":[true,"e"]}\n',
        b'h1 {"all":["1","e"]}\n',
        b'h1 {"all":[1,null]}\n',
        b'h1 {"all":[1,7]}\n',
        b'h1 {"all":[1,"e"],"group:a":[2]}\n',
    ],
)
def test_a_malformed_positions_line_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        split_positions(line + b"v2;;{}\n")
    assert caught.value.reason == "malformed"
    with pytest.raises(ProtocolError):
        protocol.decode(line + _stored())


# --------------------------------------------------------------------------- stored sends on the wire


def _stored(secret: bytes | None = None) -> bytes:
    """A stored send as its publisher wrote it (before the store put the positions line in front)."""
    send = Send(Target.groups("lobby"), b'{"text":"hi"}', json=True, sid="5f1c0a9e3b7d2c41")
    return protocol.encode(send, secret, STAMP if secret else protocol.NO_ENVELOPE)


stored_sends = st.builds(
    Send,
    st.sampled_from([Target.all(), Target.groups("lobby", "room 1"), Target.flags("ann")]),
    st.text(max_size=40).map(str.encode),
    st.just(False),
    st.lists(st.text(max_size=10), max_size=2).map(tuple),
    json=st.booleans(),
    sid=st.none() | st.text(min_size=1, max_size=20),
)


@given(stored_sends, st.none() | st.just(SECRET))
def test_a_send_with_its_id_and_json_flag_round_trips(send: Send, secret: bytes | None) -> None:
    data = protocol.encode(send, secret, STAMP if secret else protocol.NO_ENVELOPE)
    decoded = protocol.decode(data, secret)
    assert decoded == send
    assert isinstance(decoded, Send) and (decoded.json, decoded.sid) == (send.json, send.sid)
    assert decoded.positions is None


def test_a_stored_send_says_so_in_its_header() -> None:
    header = orjson.loads(_stored().split(b"\n", 1)[0][4:])
    assert header == {"op": "send", "t": "g", "n": ["lobby"], "j": True, "sid": "5f1c0a9e3b7d2c41"}
    plain = orjson.loads(protocol.encode(Send(Target.all(), b"hi")).split(b"\n", 1)[0][4:])
    assert "j" not in plain and "sid" not in plain
    binary = Send(Target.all(), b"\x00", binary=True, json=True, sid="x")
    header = orjson.loads(protocol.encode(binary).split(b"\n", 1)[0][4:])
    assert header["bin"] is True and "j" not in header  # binary data is never JSON


@pytest.mark.parametrize("key, value", [("j", 1), ("j", "true"), ("sid", 5), ("sid", ["x"])])
def test_a_stored_send_with_wrong_types_is_refused(key: str, value: object) -> None:
    header = {"op": "send", "t": "all", key: value}
    with pytest.raises(ProtocolError):
        protocol.decode(b"v2;;" + orjson.dumps(header) + b"\nhi")


def test_a_stored_send_with_its_positions_line_decodes_with_its_positions() -> None:
    positions = {"group:lobby": ("3f2a9c1e", 41), "group:room-1": ("77ab01cd", 7)}
    message = protocol.open_message(attach_positions(_stored(), positions))
    assert isinstance(message.command, Send)
    assert message.command.positions == positions
    assert message.command == protocol.decode(_stored())  # positions do not make another send
    assert message.envelope == protocol.NO_ENVELOPE


@pytest.mark.parametrize(
    "command",
    [
        Send(Target.groups("lobby"), b"not stored"),  # no sid: not a stored send
        Close(Target.groups("lobby")),
        Heartbeat(NodeInfo("node-1.x", "node-1", 0, 3.0)),
    ],
    ids=["send-without-sid", "close", "heartbeat"],
)
def test_a_positions_line_in_front_of_anything_but_a_stored_send_is_refused(command: Command) -> None:
    data = attach_positions(protocol.encode(command), {"group:lobby": ("e", 1)})
    with pytest.raises(ProtocolError, match="stored send"):
        protocol.decode(data)


def test_a_second_positions_line_is_refused() -> None:
    once = attach_positions(_stored(), {"group:lobby": ("e", 1)})
    with pytest.raises(ProtocolError, match="more than one"):
        protocol.decode(attach_positions(once, {"group:lobby": ("e", 2)}))


def test_an_empty_positions_line_is_no_positions_at_all() -> None:
    command = protocol.decode(b"h1 {}\n" + _stored())
    assert isinstance(command, Send) and command.positions == {}


def test_the_size_limit_counts_the_positions_line() -> None:
    data = attach_positions(_stored(), {"group:lobby": ("e", 1)})
    assert protocol.decode(data, max_size=len(data))
    with pytest.raises(MessageTooLarge):
        protocol.decode(data, max_size=len(data) - 1)


def test_a_message_behind_a_positions_line_is_checked_as_usual() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(b'h1 {"all":[1,"e"]}\nnot a message')
    with pytest.raises(ProtocolError):
        protocol.decode(b'h1 {"all":[1,"e"]}\n' + b"v1;;{}\n")


def test_the_signature_still_verifies_with_a_positions_line_in_front() -> None:
    signed = _stored(SECRET)
    positions = {"group:lobby": ("3f2a9c1e", 41)}
    message = protocol.open_message(attach_positions(signed, positions), SECRET, None, "fanout")
    assert isinstance(message.command, Send) and message.command.positions == positions
    assert message.envelope == STAMP
    # the signature covers the message, not the line: the store wrote the line after the publisher signed
    sig = hmac.new(SECRET, signed.split(b";", 2)[2], hashlib.sha256).hexdigest().encode()
    assert signed.startswith(b"v2;" + sig + b";")
    other = protocol.open_message(attach_positions(signed, {"group:lobby": ("3f2a9c1e", 42)}), SECRET)
    assert isinstance(other.command, Send) and other.command.positions == {"group:lobby": ("3f2a9c1e", 42)}


def test_a_signed_message_behind_a_positions_line_is_still_checked() -> None:
    signed = attach_positions(_stored(SECRET), {"group:lobby": ("e", 1)})
    tampered = signed.replace(b'"hi"', b'"ho"')
    with pytest.raises(BadSignature):
        protocol.decode(tampered, SECRET)
    with pytest.raises(BadSignature):
        protocol.decode(signed, b"another secret")
    with pytest.raises(BadSignature):
        protocol.decode(attach_positions(_stored(), {"group:lobby": ("e", 1)}), SECRET)  # unsigned
    with pytest.raises(protocol.WrongNamespace):
        protocol.open_message(signed, SECRET, None, "other")


# --------------------------------------------------------------------------- a resume's replay


def _entry(offset: int, sid: str, **others: int) -> Entry:
    return Entry(offset, sid, sid.encode(), positions=others)


def _page(*entries: Entry) -> Page:
    top = entries[-1].offset if entries else 0
    return Page("e", top, entries, entries[0].offset if entries else top + 1)


def _replay(pages: dict[str, Page]) -> list[tuple[bytes, dict[str, int]]]:
    return [(r.payload, r.offsets) for r in merge_replay(pages)]


def test_a_replay_of_one_stream_is_its_entries_in_order() -> None:
    pages = {"group:a": _page(_entry(3, "x"), _entry(4, "y"))}
    assert _replay(pages) == [(b"x", {"group:a": 3}), (b"y", {"group:a": 4})]
    assert merge_replay({}) == [] and merge_replay({"group:a": _page()}) == []


def test_a_send_in_two_replayed_streams_is_replayed_once_with_both_offsets() -> None:
    pages = {
        "group:a": _page(_entry(5, "x"), _entry(6, "both"), _entry(7, "y")),
        "group:b": _page(_entry(2, "both"), _entry(3, "z")),
    }
    assert _replay(pages) == [
        (b"x", {"group:a": 5}),
        (b"both", {"group:a": 6, "group:b": 2}),
        (b"y", {"group:a": 7}),
        (b"z", {"group:b": 3}),
    ]


def test_a_replay_waits_for_a_shared_send_to_be_next_in_every_stream() -> None:
    pages = {
        "group:a": _page(_entry(1, "shared")),
        "group:b": _page(_entry(1, "b1"), _entry(2, "b2"), _entry(3, "shared")),
    }
    assert [p for p, _ in _replay(pages)] == [b"b1", b"b2", b"shared"]


def test_crossing_orders_still_replay_each_send_once() -> None:
    # possible only across Redis Cluster slots: x before y in a, y before x in b
    pages = {
        "group:a": _page(_entry(1, "x"), _entry(2, "y")),
        "group:b": _page(_entry(1, "y"), _entry(2, "x")),
    }
    assert _replay(pages) == [(b"x", {"group:a": 1, "group:b": 2}), (b"y", {"group:a": 2, "group:b": 1})]


def test_a_replay_keeps_what_each_send_was() -> None:
    entry = Entry(1, "s", b"\x00\xff", binary=True, exclude=("c-1",))
    text = Entry(2, "t", b'{"a":1}', json=True)
    assert merge_replay({"all": _page(entry, text)}) == [
        Replayed(b"\x00\xff", True, False, {"all": 1}, ("c-1",)),
        Replayed(b'{"a":1}', False, True, {"all": 2}, ()),
    ]


@st.composite
def replay_cases(draw: st.DrawFn) -> tuple[dict[str, Page], list[set[str]]]:
    """Sends in one global order (the store's), each in some of three streams; each stream's page is
    what a client missed there: a suffix of its entries."""
    streams = ["group:a", "group:b", "flag:c"]
    membership = draw(st.lists(st.sets(st.sampled_from(streams), min_size=1), max_size=25))
    logs: dict[str, list[Entry]] = {s: [] for s in streams}
    for i, member in enumerate(membership):
        offsets = {s: len(logs[s]) + 1 for s in member}
        for s in member:
            others = {o: off for o, off in offsets.items() if o != s}
            logs[s].append(Entry(offsets[s], f"s{i}", f"s{i}".encode(), positions=others))
    pages = {}
    for s, log in logs.items():
        since = draw(st.integers(0, len(log)))
        pages[s] = _page(*log[since:])
    return pages, membership


@settings(max_examples=200)
@given(replay_cases())
def test_random_replays_give_each_send_once_in_every_streams_order(
    case: tuple[dict[str, Page], list[set[str]]],
) -> None:
    pages, _ = case
    replay = merge_replay(pages)
    payloads = [r.payload for r in replay]
    expected: dict[bytes, dict[str, int]] = {e.payload: {} for page in pages.values() for e in page.entries}
    for stream, page in pages.items():
        for e in page.entries:
            expected[e.payload][stream] = e.offset
    assert sorted(payloads) == sorted(expected)  # each once
    assert {r.payload: r.offsets for r in replay} == expected  # with its offset in each page it is in
    for stream, page in pages.items():
        order = [r.offsets[stream] for r in replay if stream in r.offsets]
        assert order == [e.offset for e in page.entries]  # each stream's order


def test_a_send_appended_after_another_stream_was_read_is_cut_from_the_replay() -> None:
    # "a" read first (top 6), then "b": "late" went to both after "a" was read (its offset in a is 7)
    pages = {
        "group:a": _page(_entry(5, "x"), _entry(6, "both", **{"group:b": 2})),
        "group:b": _page(
            _entry(2, "both", **{"group:a": 6}), _entry(3, "late", **{"group:a": 7}), _entry(4, "z")
        ),
    }
    cut, tops = cut_replay(pages, {"group:a": 6, "group:b": 4})
    # "late" and what follows it in b come live (with both offsets), after the replay
    assert tops == {"group:a": 6, "group:b": 2}
    assert _replay(cut) == [(b"x", {"group:a": 5}), (b"both", {"group:a": 6, "group:b": 2})]
    assert cut["group:b"].epoch == "e"
    # a stream of the resume that is not replayed (not recovered) counts with the top it was read at
    cut, tops = cut_replay({"group:b": pages["group:b"]}, {"group:a": 6, "group:b": 4})
    assert tops["group:b"] == 2 and [e.sid for e in cut["group:b"].entries] == ["both"]
    # a cut in one stream can cut another: "c" entries beyond b's new top go too
    pages["group:c"] = _page(_entry(1, "c1"), _entry(2, "cz", **{"group:b": 4}), _entry(3, "c3"))
    cut, tops = cut_replay(pages, {"group:a": 6, "group:b": 4, "group:c": 3})
    assert tops == {"group:a": 6, "group:b": 2, "group:c": 1}
    # nothing to cut: the pages as they were
    assert cut_replay({"group:a": pages["group:a"]}, {"group:a": 6}) == (
        {"group:a": pages["group:a"]},
        {"group:a": 6},
    )
