"""fanout/v1.py, bytes in: the node's fanout.v1 frames read into typed values, the client's written, and the
client's state (:class:`Tracker`) across connections — the resume, what it holds until ``resumed``, the
duplicates it drops. No network (the clients on it: tests/test_client.py, tests/test_client_nodes.py)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from fanout.exceptions import PayloadError
from fanout.v1 import (
    Deliver,
    Joined,
    Left,
    Message,
    Position,
    Ready,
    Resumed,
    SendFrame,
    Tracker,
    Welcome,
    message_frame,
    read_frame,
    resume_frame,
)
from tests.support.nodes import ROOT

LOBBY = "group:lobby"
VECTORS: list[dict[str, Any]] = json.loads((ROOT / "tests" / "vectors" / "fanout_v1.json").read_text())


def frame(value: object) -> str:
    return orjson.dumps(value).decode()


def welcome(client_id: str, token: str | None, streams: dict[str, tuple[str, int]]) -> str:
    positions = {s: {"epoch": e, "offset": o} for s, (e, o) in streams.items()}
    return frame({"type": "welcome", "client_id": client_id, "resume": token, "streams": positions})


def message(data: object, **offsets: int) -> str:
    streams = {s.replace("_", ":"): o for s, o in offsets.items()}
    return frame({"type": "message", "data": data, **({"streams": streams} if streams else {})})


def feed(tracker: Tracker, *frames: str) -> list[object]:
    actions: list[object] = []
    for text in frames:
        actions += tracker.receive(read_frame(text))
    return actions


def test_the_nodes_frames_are_read_into_typed_values() -> None:
    assert read_frame(welcome("n.1.1", "t", {LOBBY: ("e", 3)})) == Welcome(
        "n.1.1", "t", {LOBBY: Position("e", 3)}
    )
    assert read_frame(frame({"type": "welcome", "client_id": "n.1.1", "streams": {}})) == Welcome(
        "n.1.1", None, {}
    )
    assert read_frame(message({"a": 1}, group_lobby=4)) == Message({"a": 1}, {LOBBY: 4})
    assert read_frame(message("text")) == Message("text", {})
    assert read_frame(frame({"type": "message", "data_b64": "AP8="})) == Message(b"\x00\xff", {})
    assert read_frame(frame({"type": "joined", "stream": "flag:ann", "epoch": "e", "offset": 0})) == Joined(
        "flag:ann", Position("e", 0)
    )
    assert read_frame(frame({"type": "left", "stream": "flag:ann"})) == Left("flag:ann")
    answer = {LOBBY: {"recovered": False, "epoch": "e", "offset": 9}}
    assert read_frame(frame({"type": "resumed", "recovered": False, "streams": answer})) == Resumed(
        False, answer
    )
    # what is not a fanout.v1 frame the node would send: nothing
    for text in (
        "not json",
        b"\x00",
        "[1]",
        frame({"type": "unknown"}),
        frame({"type": "welcome"}),
        frame({"type": "joined", "stream": "x", "epoch": "e"}),
        frame({"type": "message", "data_b64": "***"}),
    ):
        assert read_frame(text) is None
    # malformed parts are left out, not trusted
    assert read_frame(frame({"type": "message", "data": 1, "streams": {LOBBY: "2", "all": True}})) == Message(
        1, {}
    )
    assert read_frame(frame({"type": "resumed", "recovered": 1, "streams": []})) == Resumed(False, {})


def test_the_clients_frames() -> None:
    assert orjson.loads(message_frame("hi")) == {"type": "message", "data": "hi"}
    assert orjson.loads(message_frame({"x": [1, None]})) == {"type": "message", "data": {"x": [1, None]}}
    assert orjson.loads(message_frame(b"\x00\x01")) == {"type": "message", "data_b64": "AAE="}
    with pytest.raises(PayloadError):
        message_frame(float("nan"))
    assert orjson.loads(resume_frame("t", {LOBBY: Position("e", 4)})) == {
        "type": "resume",
        "token": "t",
        "streams": {LOBBY: {"epoch": "e", "offset": 4}},
    }


def test_a_first_connection_takes_the_welcomes_positions_and_drops_duplicates() -> None:
    tracker = Tracker()
    tracker.opened()
    assert feed(tracker, welcome("n.1.1", "t1", {LOBBY: ("e", 10)})) == [Ready()]  # nothing to resume
    assert (tracker.token, tracker.positions) == ("t1", {LOBBY: Position("e", 10)})
    assert feed(tracker, message("a", group_lobby=11), message("b")) == [Deliver("a"), Deliver("b")]
    assert feed(tracker, message("again", group_lobby=11)) == []
    assert tracker.duplicates == 1
    feed(tracker, frame({"type": "joined", "stream": "group:x", "epoch": "f", "offset": 2}))
    assert feed(tracker, message("in both", group_lobby=11, group_x=3)) == [Deliver("in both")]  # one new
    feed(tracker, frame({"type": "left", "stream": "group:x"}))
    assert tracker.positions == {LOBBY: Position("e", 11)}
    assert feed(tracker, welcome("n.1.1", "other", {})) == []  # one welcome per connection


def test_a_resume_holds_its_streams_until_resumed_and_keeps_the_replays_order() -> None:
    tracker = Tracker()
    tracker.opened()
    feed(tracker, welcome("n.1.1", "t1", {LOBBY: ("e", 10)}), message("m11", group_lobby=11))
    tracker.closed()
    tracker.opened()
    # live ones may come before the welcome and before the node read the resume, ahead of the replay
    assert feed(tracker, message("m14", group_lobby=14), message("no stream")) == [Deliver("no stream")]
    actions = feed(tracker, welcome("n.1.2", "t2", {LOBBY: ("e", 14), "group:new": ("g", 1)}))
    assert actions == [SendFrame(resume_frame("t1", {LOBBY: Position("e", 11)})), Ready()]
    assert tracker.token == "t2"
    assert feed(tracker, message("m15", group_lobby=15), message("n2", group_new=2)) == [Deliver("n2")]
    replay = [message(f"m{n}", group_lobby=n) for n in (12, 13, 14, 15)]
    assert feed(tracker, *replay) == []
    answer = {LOBBY: {"recovered": True, "epoch": "e", "offset": 15}}
    resumed = frame({"type": "resumed", "recovered": True, "streams": answer})
    assert feed(tracker, resumed) == [
        Deliver("m12"),
        Deliver("m13"),
        Deliver("m14"),
        Deliver("m15"),
        Resumed(True, answer),
    ]
    assert tracker.duplicates == 2
    assert tracker.positions == {LOBBY: Position("e", 15), "group:new": Position("g", 2)}
    assert feed(tracker, message("m16", group_lobby=16)) == [Deliver("m16")]  # live again


def test_a_connection_that_ends_before_resumed_delivers_nothing_it_held() -> None:
    tracker = Tracker()
    tracker.opened()
    feed(tracker, welcome("n.1.1", "t1", {LOBBY: ("e", 10)}))
    tracker.closed()
    tracker.opened()
    feed(tracker, welcome("n.1.2", "t2", {LOBBY: ("e", 12)}), message("m11", group_lobby=11))
    tracker.closed()
    tracker.opened()
    actions = feed(tracker, welcome("n.1.3", "t3", {LOBBY: ("e", 12)}))
    assert actions[0] == SendFrame(resume_frame("t2", {LOBBY: Position("e", 10)}))  # asked again


def test_not_recovered_streams_take_the_nodes_position_and_unanswered_ones_are_dropped() -> None:
    tracker = Tracker()
    tracker.opened()
    feed(tracker, welcome("n.1.1", "t1", {LOBBY: ("e", 10), "group:gone": ("g", 5), "group:both": ("b", 1)}))
    tracker.closed()
    tracker.opened()
    feed(tracker, welcome("n.1.2", "t2", {"group:both": ("b", 7)}))
    # an unknown or used token: nothing restored, no stream answered
    assert feed(tracker, frame({"type": "resumed", "recovered": False, "streams": {}})) == [
        Resumed(False, {})
    ]
    assert tracker.positions == {"group:both": Position("b", 7)}  # the welcome's, the rest dropped
    tracker.closed()
    tracker.opened()
    feed(tracker, welcome("n.1.3", "t3", {}))
    answer = {"group:both": {"recovered": False, "epoch": "b2", "offset": 30}}
    feed(tracker, frame({"type": "resumed", "recovered": False, "streams": answer}))
    assert tracker.positions == {"group:both": Position("b2", 30)}


def test_without_a_token_there_is_no_resume() -> None:
    tracker = Tracker()
    tracker.opened()
    feed(tracker, welcome("n.1.1", None, {LOBBY: ("e", 10)}))
    tracker.closed()
    tracker.opened()
    assert feed(tracker, message("early", group_lobby=12)) == [Deliver("early")]  # nothing held
    assert feed(tracker, welcome("n.1.2", "t2", {LOBBY: ("e", 12)})) == [Ready()]
    assert tracker.positions == {LOBBY: Position("e", 12)}


@pytest.mark.parametrize(
    "vector", [v for v in VECTORS if v["direction"] == "node->client"], ids=lambda v: v["name"]
)
def test_every_node_frame_of_the_vectors_is_read(vector: dict[str, Any]) -> None:
    read = read_frame(vector["text"])
    assert read is not None
    kind = orjson.loads(vector["text"])["type"]
    assert type(read).__name__.lower() == kind
    if isinstance(read, Message):
        assert read.streams == orjson.loads(vector["text"]).get("streams", {})


@pytest.mark.parametrize(
    "vector",
    [v for v in VECTORS if v["direction"] == "client->node" and "close" not in v["reads_as"]],
    ids=lambda v: v["name"],
)
def test_the_client_writes_the_vectors_frames(vector: dict[str, Any]) -> None:
    reads_as = vector["reads_as"]
    if "resume" in reads_as:
        streams = {s: Position(p["epoch"], p["offset"]) for s, p in reads_as["resume"]["streams"].items()}
        written = resume_frame(reads_as["resume"]["token"], streams)
    elif "bytes_hex" in reads_as:
        written = message_frame(bytes.fromhex(reads_as["bytes_hex"]))
    else:
        data = orjson.loads(vector["text"])["data"]
        written = message_frame(data)
    assert orjson.loads(written) == orjson.loads(vector["text"])
