"""node/v1.py: the fanout.v1 client protocol's frames, both ways (pure functions, no I/O), and the test
vectors of tests/vectors/fanout_v1.json (docs/protocol.md, "fanout.v1 client frames")."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.frames import CloseCode, WebsocketError
from node.v1 import (
    MAX_RESUME_STREAMS,
    SUBPROTOCOL,
    Resume,
    control_frame,
    joined_frame,
    message_frame,
    positions_json,
    read_client_frame,
    wants_v1,
)


def unframe(frame: bytes) -> tuple[int, bytes]:
    """(opcode, payload) of one unmasked, unfragmented server frame."""
    assert frame[0] & 0x80, "FIN"
    length, at = frame[1] & 0x7F, 2
    if length == 126:
        (length,), at = struct.unpack("!H", frame[2:4]), 4
    elif length == 127:
        (length,), at = struct.unpack("!Q", frame[2:10]), 10
    assert len(frame) == at + length
    return frame[0] & 0x0F, frame[at:]


def text_of(frame: bytes) -> str:
    opcode, payload = unframe(frame)
    assert opcode == 0x1  # every fanout.v1 frame is a text frame
    return payload.decode()


def refusal(message: str | bytes) -> str:
    """The reason a v1 client's frame is refused with (1008)."""
    with pytest.raises(WebsocketError) as caught:
        read_client_frame(message)
    assert caught.value.code == CloseCode.POLICY_VIOLATION == 1008
    assert caught.value.reason
    return caught.value.reason


# --------------------------------------------------------------------------- the subprotocol


def test_a_client_opts_in_by_asking_for_the_subprotocol() -> None:
    assert SUBPROTOCOL == "fanout.v1"
    assert wants_v1(["fanout.v1"])
    assert wants_v1(["chat, fanout.v1"]) and wants_v1(["chat,fanout.v1 "]) and wants_v1(["chat", "fanout.v1"])
    assert not wants_v1([]) and not wants_v1([""]) and not wants_v1(["chat"])
    assert not wants_v1(["fanout.v2"]) and not wants_v1(["fanout.v1x"]) and not wants_v1(["FANOUT.V1"])
    assert not wants_v1(["fanout"]) and not wants_v1(["fanout.v1.1"])


# --------------------------------------------------------------------------- node -> client


def test_a_text_payload_is_a_json_string() -> None:
    body = orjson.loads(text_of(message_frame('héllo "you"\n'.encode(), False, False, None)))
    assert body == {"type": "message", "data": 'héllo "you"\n'}


def test_a_json_payload_is_spliced_in_as_its_value() -> None:
    payload = b'{"text": "hi", "n": [1, 2.5, null]}'  # spliced as it is: the publisher's own encoding
    text = text_of(message_frame(payload, False, True, None))
    assert text == '{"type":"message","data":' + payload.decode() + "}"
    assert orjson.loads(text)["data"] == {"text": "hi", "n": [1, 2.5, None]}
    for value in (b"42", b"null", b"true", b'"a str sent as JSON"', b"[]"):
        assert orjson.loads(text_of(message_frame(value, False, True, None)))["data"] == orjson.loads(value)


def test_a_binary_payload_is_data_b64() -> None:
    payload = bytes(range(256))
    body = orjson.loads(text_of(message_frame(payload, True, False, None)))
    assert set(body) == {"type", "data_b64"}
    assert base64.b64decode(body["data_b64"], validate=True) == payload
    assert "data_b64" in orjson.loads(text_of(message_frame(b"\x00", True, True, None)))  # binary wins


def test_streams_are_the_sends_offsets_and_absent_when_none() -> None:
    body = orjson.loads(text_of(message_frame(b"x", False, False, {"group:a": 41, "flag:ann": 7})))
    assert body == {"type": "message", "data": "x", "streams": {"group:a": 41, "flag:ann": 7}}
    assert "streams" not in orjson.loads(text_of(message_frame(b"x", False, False, {})))
    assert "streams" not in orjson.loads(text_of(message_frame(b"x", False, False, None)))


@pytest.mark.parametrize("size", [0, 100, 125, 126, 65535, 65536, 100_000])
def test_a_message_frame_of_any_size_is_one_frame(size: int) -> None:
    text = text_of(message_frame(b"a" * size, False, False, {"all": 1}))
    assert orjson.loads(text)["data"] == "a" * size


@given(
    st.text(max_size=60),
    st.dictionaries(st.sampled_from(["all", "group:a", "flag:b"]), st.integers(1, 2**53)),
)
def test_text_messages_carry_what_was_sent(data: str, streams: dict[str, int]) -> None:
    body = orjson.loads(text_of(message_frame(data.encode(), False, False, streams)))
    assert body["data"] == data and body.get("streams", {}) == streams


def test_control_frames() -> None:
    assert orjson.loads(text_of(joined_frame("group:a", "3f2a9c1e", 41))) == {
        "type": "joined",
        "stream": "group:a",
        "epoch": "3f2a9c1e",
        "offset": 41,
    }
    assert (
        text_of(control_frame({"type": "left", "stream": "group:a"})) == '{"type":"left","stream":"group:a"}'
    )
    assert positions_json({"group:a": ("e", 4), "all": ("f", 0)}) == {
        "group:a": {"epoch": "e", "offset": 4},
        "all": {"epoch": "f", "offset": 0},
    }


# --------------------------------------------------------------------------- client -> node


def test_a_json_string_reaches_the_app_as_str() -> None:
    assert read_client_frame('{"type":"message","data":"héllo"}') == "héllo"
    assert read_client_frame('{"type":"message","data":""}') == ""


def test_another_json_value_reaches_the_app_as_its_json_text() -> None:
    assert read_client_frame('{"type":"message","data":{"a": [1, 2]}}') == '{"a":[1,2]}'
    assert read_client_frame('{"type":"message","data":3}') == "3"
    assert read_client_frame('{"type":"message","data":null}') == "null"
    assert read_client_frame('{"type":"message","data":[true]}') == "[true]"


def test_data_b64_reaches_the_app_as_bytes() -> None:
    assert read_client_frame('{"type":"message","data_b64":"AAEK/w=="}') == b"\x00\x01\n\xff"
    assert read_client_frame('{"type":"message","data_b64":""}') == b""
    assert read_client_frame(b'{"type":"message","data_b64":""}'.decode()) == b""


def test_a_resume_frame() -> None:
    frame = {
        "type": "resume",
        "token": "tok",
        "streams": {"group:a": {"epoch": "e", "offset": 4}, "all": {"epoch": "f", "offset": 0}},
    }
    assert read_client_frame(json.dumps(frame)) == Resume("tok", {"group:a": ("e", 4), "all": ("f", 0)})
    assert read_client_frame('{"type":"resume","token":"t"}') == Resume("t", {})  # state only


def test_a_resume_may_name_up_to_its_bound_of_streams() -> None:
    streams = {f"group:{i}": {"epoch": "e", "offset": i} for i in range(MAX_RESUME_STREAMS)}
    found = read_client_frame(json.dumps({"type": "resume", "token": "t", "streams": streams}))
    assert isinstance(found, Resume) and len(found.streams) == MAX_RESUME_STREAMS
    streams["all"] = {"epoch": "e", "offset": 0}
    assert "1000" in refusal(json.dumps({"type": "resume", "token": "t", "streams": streams}))


@pytest.mark.parametrize(
    "frame, reason",
    [
        ("not json", "not JSON"),
        ("", "not JSON"),
        ('{"type":"message","data":1', "not JSON"),
        ('["message","hi"]', "unknown fanout.v1 frame type None"),
        ('"hi"', "unknown fanout.v1 frame type None"),
        ("{}", "unknown fanout.v1 frame type None"),
        ('{"data":"hi"}', "unknown fanout.v1 frame type None"),
        ('{"type":"Message","data":"hi"}', "unknown fanout.v1 frame type 'Message'"),
        ('{"type":"welcome","client_id":"x"}', "unknown fanout.v1 frame type 'welcome'"),
        ('{"type":"resumed"}', "unknown"),
        ('{"type":7}', "unknown fanout.v1 frame type 7"),
        ('{"type":"message"}', "without data"),
        ('{"type":"message","data_b64":"not base64!"}', "not base64"),
        ('{"type":"message","data_b64":"AAE"}', "not base64"),
        ('{"type":"message","data_b64":5}', "not base64"),
        ('{"type":"message","data_b64":null}', "not base64"),
        ('{"type":"message","data_b64":"é"}', "not base64"),
        ('{"type":"resume"}', "token"),
        ('{"type":"resume","token":5}', "token"),
        ('{"type":"resume","token":"t","streams":[]}', "token"),
        ('{"type":"resume","token":"t","streams":{"lobby":{"epoch":"e","offset":1}}}', "not a stream"),
        ('{"type":"resume","token":"t","streams":{"group:":{"epoch":"e","offset":1}}}', "not a stream"),
        ('{"type":"resume","token":"t","streams":{"all":[1,"e"]}}', "not an object"),
        ('{"type":"resume","token":"t","streams":{"all":{"offset":1}}}', "epoch and an offset"),
        ('{"type":"resume","token":"t","streams":{"all":{"epoch":"e"}}}', "epoch and an offset"),
        ('{"type":"resume","token":"t","streams":{"all":{"epoch":1,"offset":1}}}', "epoch and an offset"),
        ('{"type":"resume","token":"t","streams":{"all":{"epoch":"e","offset":-1}}}', "epoch and an offset"),
        ('{"type":"resume","token":"t","streams":{"all":{"epoch":"e","offset":1.0}}}', "epoch and an offset"),
        (
            '{"type":"resume","token":"t","streams":{"all":{"epoch":"e","offset":true}}}',
            "epoch and an offset",
        ),
    ],
)
def test_anything_else_is_refused_with_1008_and_a_reason(frame: str, reason: str) -> None:
    assert reason in refusal(frame)


def test_a_binary_frame_is_refused() -> None:
    assert "JSON text" in refusal(b'{"type":"message","data":"hi"}')


@given(st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_random_text_is_read_or_refused_with_1008(text: str) -> None:
    try:
        read_client_frame(text)
    except WebsocketError as error:
        assert error.code == CloseCode.POLICY_VIOLATION and error.reason


# --------------------------------------------------------------------------- test vectors

VECTORS_FILE = Path(__file__).parent / "vectors" / "fanout_v1.json"
EPOCH, OTHER_EPOCH = "3f2a9c1e", "77ab01cd"
TOKEN = "q3Z9x8Hk2mN4pR7sT1vW5yB6cD0eF2gJ"
CID = "node-1.lq2x8k0c0a1b2c3d.1"

#: node -> client ``message`` vectors: name -> message_frame's arguments (payload, binary, json, streams)
MESSAGES: dict[str, tuple[bytes, bool, bool, dict[str, int] | None]] = {
    "message-text": ("héllo".encode(), False, False, None),
    "message-json-in-a-stream": (b'{"text":"hi"}', False, True, {"group:lobby": 41}),
    "message-in-two-streams": (b'{"text":"hi"}', False, True, {"group:lobby": 42, "flag:ann": 7}),
    "message-binary": (b"\x00\x01\n\xff", True, False, {"all": 3}),
}
#: node -> client control frames: name -> the object the node writes
CONTROLS: dict[str, dict[str, Any]] = {
    "welcome": {
        "type": "welcome",
        "client_id": CID,
        "resume": TOKEN,
        "streams": {
            "group:lobby": {"epoch": EPOCH, "offset": 40},
            "flag:ann": {"epoch": OTHER_EPOCH, "offset": 6},
        },
    },
    "welcome-without-a-store": {"type": "welcome", "client_id": CID, "streams": {}},
    "joined": {"type": "joined", "stream": "group:room-1", "epoch": EPOCH, "offset": 12},
    "left": {"type": "left", "stream": "group:room-1"},
    "resumed": {
        "type": "resumed",
        "recovered": False,
        "streams": {
            "group:lobby": {"recovered": True, "epoch": EPOCH, "offset": 42},
            "flag:ann": {"recovered": False, "epoch": "9c0d11aa", "offset": 3},
        },
    },
}
#: client -> node vectors: name -> what the node makes of the frame
CLIENT: dict[str, str | bytes | Resume | None] = {
    "client-message-text": "hi",
    "client-message-json": '{"move":[3,4]}',
    "client-message-binary": b"\x00\x01\n\xff",
    "client-resume": Resume(TOKEN, {"group:lobby": (EPOCH, 40), "flag:ann": (OTHER_EPOCH, 6)}),
    "client-unknown-type": None,  # refused: closed with 1008
}
#: every vector: name -> (direction, what it means)
DESCRIPTIONS = {
    "welcome": (
        "node->client",
        "the first frame: the client id, a resume token, the positions of the history "
        "streams the connection is in (group lobby, flag ann)",
    ),
    "welcome-without-a-store": (
        "node->client",
        "a welcome from a node without a store (AMQP without "
        "FANOUT_HISTORY_URL): no resume token, no streams",
    ),
    "message-text": ("node->client", "the text héllo, sent as a str to a target without history"),
    "message-json-in-a-stream": (
        "node->client",
        'the JSON value {"text":"hi"} (sent as a dict), offset 41 of stream group:lobby',
    ),
    "message-in-two-streams": (
        "node->client",
        "one send that reached the connection through two of its streams: once, with both offsets",
    ),
    "message-binary": ("node->client", "the bytes 00 01 0a ff, as base64, offset 3 of stream all"),
    "joined": ("node->client", "the connection entered stream group:room-1 (join_group) at offset 12"),
    "left": ("node->client", "the connection left stream group:room-1"),
    "resumed": (
        "node->client",
        "the end of a replay: group:lobby recovered up to 42, flag:ann could not "
        "be (its epoch changed), so recovered is false",
    ),
    "client-message-text": ("client->node", "on_message gets the str hi"),
    "client-message-json": ("client->node", 'on_message gets the str {"move":[3,4]} (the JSON text of data)'),
    "client-message-binary": ("client->node", "on_message gets the bytes 00 01 0a ff"),
    "client-resume": (
        "client->node",
        "the first frame after the welcome: come back with the old "
        "connection's token and the last offset received in each stream",
    ),
    "client-unknown-type": ("client->node", "not a frame a client sends: closed with 1008 and a reason"),
}
#: the client frames, as a client writes them
CLIENT_TEXT = {
    "client-message-text": '{"type":"message","data":"hi"}',
    "client-message-json": '{"type":"message","data":{"move":[3,4]}}',
    "client-message-binary": '{"type":"message","data_b64":"AAEK/w=="}',
    "client-resume": orjson.dumps(
        {
            "type": "resume",
            "token": TOKEN,
            "streams": {
                "group:lobby": {"epoch": EPOCH, "offset": 40},
                "flag:ann": {"epoch": OTHER_EPOCH, "offset": 6},
            },
        }
    ).decode(),
    "client-unknown-type": '{"type":"welcome","client_id":"x"}',
}


def vector_text(name: str) -> str:
    """The frame's text, as the reference implementation writes it."""
    if name in MESSAGES:
        return text_of(message_frame(*MESSAGES[name]))
    if name in CONTROLS:
        return text_of(control_frame(CONTROLS[name]))
    return CLIENT_TEXT[name]


def make_vectors() -> list[dict[str, Any]]:
    """What the vectors file holds; run this module as a script to rewrite it (then review it)."""
    vectors = []
    for name, (direction, meaning) in DESCRIPTIONS.items():
        vector: dict[str, Any] = {
            "name": name,
            "direction": direction,
            "meaning": meaning,
            "text": vector_text(name),
        }
        if name in CLIENT:
            vector["reads_as"] = _reads_as(CLIENT[name])
        vectors.append(vector)
    return vectors


def _reads_as(value: str | bytes | Resume | None) -> dict[str, Any]:
    """What the node makes of a client frame, in JSON: the app's str or bytes, a resume, or a close."""
    if value is None:
        return {"close": 1008}
    if isinstance(value, Resume):
        return {"resume": {"token": value.token, "streams": positions_json(value.streams)}}
    if isinstance(value, bytes):
        return {"bytes_hex": value.hex()}
    return {"str": value}


def load_vectors() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
    return vectors


def test_the_vectors_file_is_what_the_reference_implementation_writes() -> None:
    assert load_vectors() == make_vectors()
    assert {v["name"] for v in load_vectors()} == set(MESSAGES) | set(CONTROLS) | set(CLIENT)


@pytest.mark.parametrize("vector", load_vectors(), ids=lambda v: v["name"])
def test_each_vector(vector: dict[str, Any]) -> None:
    name, text = vector["name"], vector["text"]
    frame = orjson.loads(text)
    assert isinstance(frame, dict) and isinstance(frame["type"], str)
    if vector["direction"] == "node->client":
        assert text == vector_text(name)
        if name in MESSAGES:
            payload, binary, is_json, streams = MESSAGES[name]
            if binary:
                assert base64.b64decode(frame["data_b64"]) == payload
            else:
                assert frame["data"] == (orjson.loads(payload) if is_json else payload.decode())
            assert frame.get("streams") == streams
        else:
            assert frame == CONTROLS[name]
        return
    expected = CLIENT[name]
    if expected is None:
        refusal(text)
    else:
        assert read_client_frame(text) == expected
    assert vector["reads_as"] == _reads_as(expected)


def test_the_welcome_and_joined_vectors_are_what_the_node_builds() -> None:
    welcome = CONTROLS["welcome"]
    assert welcome["streams"] == positions_json({"group:lobby": (EPOCH, 40), "flag:ann": (OTHER_EPOCH, 6)})
    joined = CONTROLS["joined"]
    assert text_of(joined_frame(joined["stream"], joined["epoch"], joined["offset"])) == vector_text("joined")


if __name__ == "__main__":
    VECTORS_FILE.parent.mkdir(exist_ok=True)
    VECTORS_FILE.write_text(json.dumps(make_vectors(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
