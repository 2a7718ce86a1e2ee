"""Wire format v2: round trips, raw payloads, envelopes, signing, bounds, and rejection of malformed input."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fanout import protocol
from fanout.commands import (
    Bind,
    Bye,
    Close,
    CloseGuests,
    Command,
    DissolveGroup,
    Heartbeat,
    JoinGroup,
    LeaveGroup,
    NodeInfo,
    PresenceChange,
    PresenceSnapshot,
    Query,
    QueryKind,
    Reply,
    Request,
    Send,
    SendBulk,
    SetSession,
    Target,
    TargetKind,
    Unbind,
)
from fanout.exceptions import (
    BadSignature,
    FanoutError,
    MessageTooLarge,
    PayloadError,
    ProtocolError,
    UnsupportedVersion,
)
from fanout.history import Positions, attach_positions
from fanout.protocol import Envelope

CID = "node-1.lq2x8k0c0a1b2c3d.1"

# --------------------------------------------------------------------------- strategies

names = st.text(max_size=40)  # hypothesis' text() is surrogate-free: orjson cannot encode lone surrogates
name_tuples = st.lists(names, max_size=5).map(tuple)
secrets = st.none() | st.binary(min_size=1, max_size=40)
requests = st.none() | st.builds(Request, names, names)
dedupe_ids = st.none() | st.text(max_size=20)
i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | i64 | finite | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
close_codes = st.sampled_from([1000, 1001, 1002, 1003, *range(1007, 1015)]) | st.integers(3000, 4999)


@st.composite
def targets(draw: st.DrawFn) -> Target:
    kind = draw(st.sampled_from(TargetKind))
    if kind is TargetKind.ALL:
        return Target.all()
    return Target(kind, draw(name_tuples))


payloads = (
    st.binary(max_size=200)
    | st.text(max_size=100).map(lambda s: s.encode())
    | st.lists(st.sampled_from([b"\n", b";", b"v1;", b"\r\n", b"\x00", b"{}"]), max_size=8).map(b"".join)
)

sends = st.builds(Send, targets(), payloads, st.booleans(), name_tuples, requests, dedupe_ids)
closes = st.builds(Close, targets(), close_codes, st.text(max_size=30), name_tuples, requests, dedupe_ids)
node_infos = st.builds(
    NodeInfo,
    instance=names,
    node_id=names,
    connections=st.integers(0, 2**40),
    ttl=st.floats(0, protocol.MAX_TTL),
    started_at=finite,
    host=names,
    port=st.integers(0, 65535),
    mode=st.sampled_from(["", "fanout", "routing"]),
    signed=st.booleans(),
    extra=json_objects,
)
errors = st.none() | st.tuples(st.text(max_size=20), st.text(max_size=40))
commands: st.SearchStrategy[Command] = st.one_of(
    sends,
    closes,
    st.builds(JoinGroup, names, name_tuples, requests),
    st.builds(LeaveGroup, names, name_tuples, requests),
    st.builds(DissolveGroup, names, requests),
    st.builds(Bind, names, names, requests),
    st.builds(Unbind, names, requests),
    st.builds(SetSession, names, json_objects, st.booleans(), requests),
    st.builds(Query, st.sampled_from(QueryKind), st.builds(Request, names, names), names),
    st.builds(Reply, names, names, json_values, st.none()),
    st.builds(Reply, names, names, st.none(), st.tuples(st.text(max_size=20), st.text(max_size=40))),
    st.builds(Heartbeat, node_infos),
    st.builds(Bye, names),
)


envelopes = st.builds(
    Envelope,
    origin=names,
    seq=st.integers(0, 2**62),
    sent_at=st.integers(0, 2**41).map(lambda ms: ms / 1000),
    namespace=names,
)
#: what a signed message must carry (signing without one is refused)
ENV = Envelope("u-test", 7, 1700000000.5, "fanout")


def sign(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).hexdigest().encode()


def enc(command: Command, secret: bytes | None = None, envelope: Envelope | None = None) -> bytes:
    """Encode, with the standard envelope when signing."""
    if envelope is None:
        envelope = ENV if secret else protocol.NO_ENVELOPE
    return protocol.encode(command, secret, envelope)


def raw(header: dict[str, Any], payload: bytes = b"", sig: bytes = b"") -> bytes:
    return b"v2;" + sig + b";" + orjson.dumps(header) + b"\n" + payload


# --------------------------------------------------------------------------- round trips


@settings(max_examples=400)
@given(commands, secrets)
def test_every_command_round_trips(command: Command, secret: bytes | None) -> None:
    assume(not _unsigned_signer(command, secret))
    message = enc(command, secret)
    assert protocol.decode(message, secret) == command


@settings(max_examples=300)
@given(commands, envelopes, secrets)
def test_envelopes_round_trip(command: Command, envelope: Envelope, secret: bytes | None) -> None:
    assume(not _unsigned_signer(command, secret))
    message = protocol.open_message(
        protocol.encode(command, secret, envelope), secret, None, envelope.namespace
    )
    assert message.command == command
    expected_ns = envelope.namespace if secret else None  # the namespace travels only when signed
    assert message.envelope == Envelope(envelope.origin, envelope.seq, envelope.sent_at, expected_ns)


def _unsigned_signer(command: Command, secret: bytes | None) -> bool:
    """A heartbeat saying its node signs, not signed: refused both ways (see below)."""
    return isinstance(command, Heartbeat) and command.node.signed and not secret


@given(commands)
def test_signature_is_ignored_by_a_reader_without_secret(command: Command) -> None:
    assert protocol.decode(enc(command, b"key")) == command


def test_signing_needs_the_whole_envelope() -> None:
    for envelope in (
        protocol.NO_ENVELOPE,
        Envelope("u-1", 1, 1700000000.0, None),
        Envelope("u-1", 1, None, "ns"),
        Envelope(None, 0, 1700000000.0, "ns"),
    ):
        with pytest.raises(PayloadError):
            protocol.encode(Send(Target.all(), b"x"), b"key", envelope)


def test_a_signed_header_without_its_envelope_is_rejected() -> None:
    for missing in ("ns", "ts", "o"):
        header = {"op": "send", "t": "all", "o": "u-1", "s": 1, "ts": 1700000000000, "ns": "fanout"}
        del header[missing]
        body = orjson.dumps(header) + b"\nx"
        with pytest.raises(BadSignature, match="envelope"):
            protocol.decode(b"v2;" + sign(SECRET, body) + b";" + body, SECRET)


def test_a_command_signed_for_another_namespace_is_rejected() -> None:
    message = protocol.encode(Send(Target.all(), b"x"), SECRET, Envelope("u-1", 1, 1700000000.0, "ns-a"))
    assert isinstance(protocol.decode(message, SECRET, namespace="ns-a"), Send)
    with pytest.raises(protocol.WrongNamespace) as info:
        protocol.decode(message, SECRET, namespace="ns-b")
    assert info.value.reason == "namespace"
    # and renaming the namespace in the header breaks the signature
    forged = message.replace(b'"ns":"ns-a"', b'"ns":"ns-b"')
    with pytest.raises(BadSignature):
        protocol.decode(forged, SECRET, namespace="ns-b")


@pytest.mark.parametrize("kind", list(QueryKind))
def test_each_query_kind_round_trips(kind: QueryKind) -> None:
    query = Query(kind, Request("7.abcd", "u-xyz"), "arg")
    assert protocol.decode(enc(query)) == query
    header = orjson.loads(enc(query).split(b"\n", 1)[0][4:])
    assert header == {"op": "query", "q": kind.value, "arg": "arg", "rid": "7.abcd", "rto": "u-xyz"}


@given(commands, secrets)
def test_layout_prefix_signature_header_newline(command: Command, secret: bytes | None) -> None:
    assume(not _unsigned_signer(command, secret))
    message = enc(command, secret)
    assert message.startswith(b"v2;")
    sig, rest = message[3:].split(b";", 1)
    header, payload = rest.split(b"\n", 1)
    assert isinstance(orjson.loads(header), dict)
    assert payload == (command.payload if isinstance(command, Send) else b"")
    if secret:
        assert sig == sign(secret, rest)
        assert len(sig) == 64
    else:
        assert sig == b""


@given(st.binary(max_size=5000), secrets)
def test_binary_payload_is_carried_raw(payload: bytes, secret: bytes | None) -> None:
    command = Send(Target.clients(CID), payload, binary=True)
    message = enc(command, secret)
    header = {"op": "send", "t": "c", "n": [CID], "bin": True}
    if secret:
        header.update(o=ENV.origin, s=ENV.seq, ts=round(ENV.sent_at * 1000), ns=ENV.namespace)  # type: ignore[arg-type]
    header = orjson.dumps(header)
    sig_len = 64 if secret else 0
    # no base64, no escaping: exactly prefix + signature + ';' + header + '\n' + payload
    assert len(message) == 3 + sig_len + 1 + len(header) + 1 + len(payload)
    assert message.endswith(b"\n" + payload)


def test_payload_with_newlines_and_semicolons_survives() -> None:
    payload = b"v2;;{}\n\n;;\nv2;x"
    sent = Send(Target.groups("a;b\nc"), payload)
    assert protocol.decode(enc(sent)).payload == payload
    assert protocol.decode(enc(sent, b"k"), b"k") == sent


def test_defaults_are_left_out_of_the_header() -> None:
    message = enc(Send(Target.all(), b"x"))
    assert message == b'v2;;{"op":"send","t":"all"}\nx'
    message = enc(Close(Target.flags("u1")))
    assert message == b'v2;;{"op":"close","t":"f","n":["u1"],"code":1000}\n'


def test_empty_names_are_allowed() -> None:
    for command in (
        Send(Target.groups(""), b""),
        Bind("", ""),
        JoinGroup("", ("",)),
        Query(QueryKind.GROUPS, Request("", "")),
    ):
        assert protocol.decode(enc(command)) == command


def test_decoded_targets_are_shared_and_kept_within_bounds() -> None:
    """Decoding reuses the Target of a recent same target (frozen: sharing is safe), forgets them all
    past ``_TARGETS_KEPT``, and a kind it does not know is refused, never kept."""
    first = protocol.decode(enc(Send(Target.groups("lobby"), b"x")))
    again = protocol.decode(enc(Send(Target.groups("lobby"), b"y")))
    assert isinstance(first, Send) and isinstance(again, Send)
    assert again.target is first.target and again.target == Target.groups("lobby")
    assert protocol.decode(enc(Close(Target.flags("lobby")))) == Close(Target.flags("lobby"))
    for n in range(protocol._TARGETS_KEPT + 10):
        decoded = protocol.decode(enc(Send(Target.clients(f"c{n}"), b"x")))
        assert isinstance(decoded, Send) and decoded.target == Target.clients(f"c{n}")
    assert len(protocol._TARGETS) <= protocol._TARGETS_KEPT
    with pytest.raises(ProtocolError, match="bad 'send' command"):
        protocol.decode(b'v2;;{"op":"send","t":"q","n":["a"]}\nx')
    assert ("q", ("a",)) not in protocol._TARGETS


# --------------------------------------------------------------------------- bounds


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def test_nesting_limit_is_the_same_both_ways() -> None:
    assert protocol.decode(enc(SetSession(CID, _nested(protocol.MAX_DEPTH)))) is not None
    with pytest.raises(PayloadError, match="deeper"):
        enc(SetSession(CID, _nested(protocol.MAX_DEPTH + 1)))
    with pytest.raises(PayloadError, match="deeper"):
        enc(Reply("1", "n.b", [_nested(protocol.MAX_DEPTH)]))
    # a 300-deep session from a rogue publisher is refused on arrival, not stored and unreadable later
    deep = b'{"k":' * 299 + b"{}" + b"}" * 299  # orjson itself cannot even write this deep
    message = b'v2;;{"op":"session","c":"%s","data":%s}\n' % (CID.encode(), deep)
    with pytest.raises(ProtocolError, match="deeper"):
        protocol.decode(message)


def test_heartbeat_ttl_is_bounded() -> None:
    info = NodeInfo("n.b", "n", 0, protocol.MAX_TTL)
    assert protocol.decode(enc(Heartbeat(info))) == Heartbeat(info)
    with pytest.raises(PayloadError):
        enc(Heartbeat(NodeInfo("n.b", "n", 0, protocol.MAX_TTL + 1)))
    forged = raw({"op": "hb", "node": {"instance": "n.b", "node_id": "n", "connections": 0, "ttl": 1e9}})
    with pytest.raises(ProtocolError, match="ttl"):
        protocol.decode(forged)


def test_a_heartbeat_says_a_mode_there_is_and_signs_if_it_says_its_node_signs() -> None:
    node = {"instance": "n.b", "node_id": "n", "connections": 0, "ttl": 3.0}
    for mode in ("", "fanout", "routing"):
        info = NodeInfo("n.b", "n", 0, 3.0, mode=mode)
        assert protocol.decode(enc(Heartbeat(info))) == Heartbeat(info)
    with pytest.raises(PayloadError, match="mode"):
        enc(Heartbeat(NodeInfo("n.b", "n", 0, 3.0, mode="bogus")))
    with pytest.raises(ProtocolError, match="mode"):
        protocol.decode(raw({"op": "hb", "node": {**node, "mode": "bogus"}}))
    signer = NodeInfo("n.b", "n", 0, 3.0, mode="routing", signed=True)
    with pytest.raises(PayloadError, match="signed"):
        enc(Heartbeat(signer))
    with pytest.raises(ProtocolError, match="signs"):
        protocol.decode(raw({"op": "hb", "node": {**node, "signed": True}}))
    # signed by a secret this reader does not have: the claim is consistent, and kept
    assert protocol.decode(enc(Heartbeat(signer), b"key")) == Heartbeat(signer)


def test_name_lists_are_bounded() -> None:
    many = tuple(f"g{i}" for i in range(protocol.MAX_NAMES + 1))
    with pytest.raises(PayloadError):
        enc(Send(Target.groups(*many), b"x"))
    with pytest.raises(PayloadError):
        enc(JoinGroup(CID, many))
    with pytest.raises(ProtocolError):
        protocol.decode(raw({"op": "send", "t": "g", "n": list(many)}))
    enc(Send(Target.groups(*many[:-1]), b"x"))


def test_lone_surrogates_are_refused_when_encoding() -> None:
    with pytest.raises(PayloadError):
        enc(Send(Target.groups("a\ud800"), b"x"))


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=500)
@given(st.binary(max_size=300), secrets, st.none() | st.integers(0, 300))
def test_random_bytes_raise_only_protocol_errors(
    data: bytes, secret: bytes | None, max_size: int | None
) -> None:
    with contextlib.suppress(ProtocolError):
        protocol.decode(data, secret, max_size)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_after_the_prefix_raise_only_protocol_errors(data: bytes) -> None:
    for message in (b"v2;;" + data, b"v2;" + data):
        with contextlib.suppress(ProtocolError):
            protocol.decode(message)


ops = st.sampled_from(["send", "close", "join", "leave", "dissolve", "bind", "unbind", "session"])
ops |= st.sampled_from(["query", "reply", "hb", "bye"])
fields = st.sampled_from(["t", "n", "x", "mid", "bin", "code", "reason", "c", "g", "f", "data", "merge"])
fields |= st.sampled_from(["q", "arg", "rid", "rto", "node", "res", "err", "o", "s", "ts", "ns"])


@settings(max_examples=800)
@given(ops, st.dictionaries(fields, json_values, max_size=8), st.binary(max_size=20))
def test_fuzzed_headers_decode_or_raise_protocol_error(
    op: str, header: dict[str, Any], payload: bytes
) -> None:
    try:
        command = protocol.decode(raw({"op": op, **header}, payload))
    except ProtocolError:
        return
    # whatever decodes is a well-typed command that encodes again
    assert protocol.decode(enc(command)) == command


# --------------------------------------------------------------------------- malformed input

GOOD = enc(JoinGroup(CID, ("lobby",), Request("1.ab", "u-1")))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"v",
        b"v1",
        b"hello",
        b"{}",
        b"V2;;{}\n",
        b"v2;;",
        b"v2;;{}",  # no newline after the header
        b"v2;;{}\n",  # no op
        b"v2;;[]\n",
        b'v2;;"send"\n',
        b'v2;;{"op":"send"\n',  # truncated JSON
        b"v2;;\xff\xfe\n",
        b'v2;;{"op":"nope"}\n',
        b'v2;;{"op":5}\n',
        b'v2;;{"op":null}\n',
        b"v2;" + b"a" * 65 + b";{}\n",  # signature field longer than any signature
        b"v2" + b"a" * 80,
    ],
)
def test_malformed_messages_are_rejected(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(data)
    assert type(info.value) is ProtocolError
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("cut", range(len(GOOD)))
def test_every_truncation_of_a_header_is_rejected(cut: int) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(GOOD[:cut])


def test_every_truncation_of_a_signed_message_is_rejected() -> None:
    message = enc(Send(Target.groups("lobby"), b"payload bytes"), b"k")
    for cut in range(len(message)):
        with pytest.raises(ProtocolError):
            protocol.decode(message[:cut], b"k")


@pytest.mark.parametrize("data", [b"v1;;{}\n", b"v0;;{}\n", b"v3;;{}\n", b"v20;;{}\n", b"v2.1;;{}\n", b"v;"])
def test_other_versions_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedVersion) as info:
        protocol.decode(data)
    assert info.value.reason == "version"


def test_a_valid_v1_or_v3_looking_command_is_unsupported() -> None:
    for version in (b"v1", b"v3"):
        with pytest.raises(UnsupportedVersion):
            protocol.decode(version + GOOD[2:])


REQUIRED: dict[str, tuple[dict[str, Any], list[str], type]] = {
    "send": ({"op": "send", "t": "g", "n": ["a"]}, ["t", "n"], Send),
    "close": ({"op": "close", "t": "c", "n": [CID], "code": 1000}, ["t", "n"], Close),
    "join": ({"op": "join", "c": CID, "g": ["a"]}, ["c", "g"], JoinGroup),
    "leave": ({"op": "leave", "c": CID, "g": ["a"]}, ["c", "g"], LeaveGroup),
    "dissolve": ({"op": "dissolve", "g": "a"}, ["g"], DissolveGroup),
    "bind": ({"op": "bind", "c": CID, "f": "u1"}, ["c", "f"], Bind),
    "unbind": ({"op": "unbind", "c": CID}, ["c"], Unbind),
    "session": ({"op": "session", "c": CID, "data": {}, "merge": False}, ["c", "data"], SetSession),
    "query": ({"op": "query", "q": "groups", "arg": "", "rid": "1", "rto": "u"}, ["q", "rid", "rto"], Query),
    "reply": ({"op": "reply", "rid": "1", "node": "n.b", "res": 1}, ["rid", "node"], Reply),
    "hb": (
        {"op": "hb", "node": {"instance": "n.b", "node_id": "n", "connections": 0, "ttl": 3}},
        ["node"],
        Heartbeat,
    ),
    "bye": ({"op": "bye", "node": "n.b"}, ["node"], Bye),
}
MISSING = [(op, key) for op, (_, keys, _) in REQUIRED.items() for key in keys]


@pytest.mark.parametrize("op", list(REQUIRED))
def test_minimal_headers_decode(op: str) -> None:
    header, _, expected = REQUIRED[op]
    command = protocol.decode(raw(header))
    assert type(command) is expected
    assert protocol.decode(enc(command)) == command


@pytest.mark.parametrize(("op", "key"), MISSING)
def test_missing_required_fields_are_rejected(op: str, key: str) -> None:
    header = dict(REQUIRED[op][0])
    del header[key]
    with pytest.raises(ProtocolError, match=op):
        protocol.decode(raw(header))


@pytest.mark.parametrize("key", ["instance", "node_id", "connections", "ttl"])
def test_heartbeat_node_record_needs_its_fields(key: str) -> None:
    header = orjson.loads(orjson.dumps(REQUIRED["hb"][0]))
    del header["node"][key]
    with pytest.raises(ProtocolError):
        protocol.decode(raw(header))


WRONG_TYPES = [
    ("send", "t", "x"),  # unknown target kind
    ("send", "t", 1),
    ("send", "n", "a"),  # a string, not a list
    ("send", "n", [1]),
    ("send", "x", [None]),
    ("send", "bin", 1),
    ("send", "bin", "true"),
    ("send", "mid", 5),
    ("send", "rid", 5),
    ("close", "code", "1000"),
    ("close", "code", 1000.0),
    ("close", "code", True),
    ("close", "code", 999),
    ("close", "code", 1004),
    ("close", "code", 1005),  # reserved: never sent in a close frame
    ("close", "code", 1006),
    ("close", "code", 1015),
    ("close", "code", 2999),
    ("close", "code", 5000),
    ("close", "reason", None),
    ("join", "c", None),
    ("join", "g", "lobby"),
    ("leave", "g", [["a"]]),
    ("dissolve", "g", ["a"]),
    ("bind", "f", 42),
    ("unbind", "c", {}),
    ("session", "data", [1, 2]),
    ("session", "merge", "yes"),
    ("session", "merge", 1),
    ("query", "q", "everything"),
    ("query", "arg", 3),
    ("query", "rto", None),
    ("reply", "node", 3),
    ("reply", "err", "oops"),
    ("reply", "err", ["BackendError"]),
    ("reply", "err", ["BackendError", 3]),
    ("send", "o", 5),
    ("send", "s", "1"),
    ("send", "ts", 1.5),
    ("send", "ns", 1),
    ("hb", "node", "n.b"),
    ("bye", "node", None),
]


@pytest.mark.parametrize(("op", "key", "value"), WRONG_TYPES)
def test_wrong_types_are_rejected(op: str, key: str, value: Any) -> None:
    header = {**REQUIRED[op][0], key: value}
    with pytest.raises(ProtocolError):
        protocol.decode(raw(header))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("connections", "3"),
        ("connections", 1.5),
        ("ttl", "3"),
        ("ttl", None),
        ("ttl", -1),
        ("ttl", 61),
        ("port", "80"),
        ("mode", 1),
        ("signed", "yes"),
        ("extra", []),
    ],
)
def test_wrong_types_in_heartbeat_are_rejected(key: str, value: Any) -> None:
    header = orjson.loads(orjson.dumps(REQUIRED["hb"][0]))
    header["node"][key] = value
    with pytest.raises(ProtocolError):
        protocol.decode(raw(header))


def test_request_id_without_reply_address_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(raw({"op": "bind", "c": CID, "f": "u", "rid": "1"}))


def test_valid_close_codes_are_accepted() -> None:
    for code in (1000, 1001, 1003, 1007, 1014, 3000, 4999):
        close = protocol.decode(raw({"op": "close", "t": "all", "code": code}))
        assert isinstance(close, Close)
        assert close.code == code


# --------------------------------------------------------------------------- signing

SECRET = b"s3cret"
SIGNED = enc(Send(Target.groups("lobby"), b"hello", request=Request("1.a", "u-1")), SECRET)


def test_signed_message_verifies() -> None:
    assert isinstance(protocol.decode(SIGNED, SECRET), Send)


def test_unsigned_message_is_rejected_when_a_secret_is_set() -> None:
    unsigned = enc(Send(Target.groups("lobby"), b"hello"))
    with pytest.raises(BadSignature, match="unsigned") as info:
        protocol.decode(unsigned, SECRET)
    assert info.value.reason == "signature"


def test_message_signed_with_another_secret_is_rejected() -> None:
    forged = enc(Send(Target.groups("lobby"), b"hello"), b"guess")
    with pytest.raises(BadSignature):
        protocol.decode(forged, SECRET)


@pytest.mark.parametrize("at", ["payload", "header", "signature"])
def test_tampering_is_detected(at: str) -> None:
    message = bytearray(SIGNED)
    index = {"payload": len(message) - 1, "header": SIGNED.index(b"lobby"), "signature": 3}[at]
    message[index] ^= 0x01
    with pytest.raises(BadSignature):
        protocol.decode(bytes(message), SECRET)


def test_appended_payload_with_valid_header_is_detected() -> None:
    with pytest.raises(BadSignature):
        protocol.decode(SIGNED + b" and more", SECRET)


def test_signature_is_lower_case_hex_and_case_sensitive() -> None:
    sig = SIGNED[3:67]
    assert sig == sig.lower()
    int(sig, 16)
    with pytest.raises(BadSignature):
        protocol.decode(SIGNED[:3] + sig.upper() + SIGNED[67:], SECRET)


def test_hand_signed_message_verifies() -> None:
    header = {
        "op": "send",
        "t": "g",
        "n": ["lobby"],
        "o": "php-1",
        "s": 1,
        "ts": 1700000000000,
        "ns": "fanout",
    }
    body = orjson.dumps(header) + b"\nhi"
    message = b"v2;" + sign(SECRET, body) + b";" + body
    assert protocol.decode(message, SECRET, namespace="fanout") == Send(Target.groups("lobby"), b"hi")


@settings(max_examples=200)
@given(commands, st.binary(min_size=1, max_size=16))
def test_any_other_secret_is_rejected(command: Command, other: bytes) -> None:
    # (not SECRET + other: HMAC pads short keys with zero bytes, so b's3cret\0' signs like b's3cret')
    message = enc(command, other + SECRET)
    with pytest.raises(BadSignature):
        protocol.decode(message, SECRET)


# --------------------------------------------------------------------------- size limit


def test_max_size_is_inclusive() -> None:
    message = enc(Send(Target.all(), b"x" * 1000))
    assert isinstance(protocol.decode(message, max_size=len(message)), Send)
    with pytest.raises(MessageTooLarge) as info:
        protocol.decode(message, max_size=len(message) - 1)
    assert info.value.reason == "oversized"
    assert str(len(message)) in str(info.value)


def test_size_is_checked_before_anything_else() -> None:
    with pytest.raises(MessageTooLarge):
        protocol.decode(b"garbage" * 10, SECRET, max_size=10)


def test_protocol_errors_belong_to_the_package_tree() -> None:
    for error in (ProtocolError, UnsupportedVersion, BadSignature, MessageTooLarge):
        assert issubclass(error, FanoutError)
        assert issubclass(error, ValueError)
    assert protocol.VERSION == 2
    assert issubclass(protocol.WrongNamespace, BadSignature)


# --------------------------------------------------------------------------- test vectors

VECTORS_FILE = Path(__file__).parent / "vectors" / "protocol_v2.json"
OTHER = "node-2.lq2x8k1d9z8y7x6w.2a"
RID = Request("1c.0f3a9b2e", "u-lq2x8k0czz00aa11")
#: the envelope of the stamped and signed vectors: sender, its 42nd message, 2023-11-14T22:13:20.123Z
STAMP = Envelope("u-lq2x8k0czz00aa11", 42, 1700000000.123, "fanout")

#: name -> (the command the vector encodes, the secret it is signed with); see VECTOR_ENVELOPES
VECTOR_COMMANDS: dict[str, tuple[Command, str | None]] = {
    "send-text-to-group": (Send(Target.groups("lobby"), b'{"text":"hi"}'), None),
    "send-text-to-groups-deduped": (
        Send(Target.groups("lobby", "room 1"), "héllo".encode(), dedupe_id="9f86d081884c7d65"),
        None,
    ),
    "send-binary-to-clients-with-exclude": (
        Send(Target.clients(CID, OTHER), b"\x00\x01\n;\xff", binary=True, exclude=(OTHER,)),
        None,
    ),
    "send-to-flag": (Send(Target.flags("user-42"), b"you have mail"), None),
    "send-to-all-with-request": (Send(Target.all(), b"ping", request=RID), None),
    "close-by-flag": (Close(Target.flags("user-42"), 4001, "logged out elsewhere"), None),
    "close-clients-default-code": (Close(Target.clients(CID)), None),
    "join": (JoinGroup(CID, ("lobby", "room 1"), RID), None),
    "leave": (LeaveGroup(CID, ("lobby",)), None),
    "dissolve": (DissolveGroup("room 1", RID), None),
    "bind": (Bind(CID, "user-42", RID), None),
    "unbind": (Unbind(CID), None),
    "session-replace": (SetSession(CID, {"name": "ann"}), None),
    "session-merge": (SetSession(CID, {"lang": "fr", "score": 3}, merge=True, request=RID), None),
    "query-connections": (Query(QueryKind.CONNECTIONS, RID), None),
    "query-exists": (Query(QueryKind.EXISTS, RID, CID), None),
    "query-group-clients": (Query(QueryKind.GROUP_CLIENTS, RID, "lobby"), None),
    "reply": (Reply(RID.id, "node-1.lq2x8k0c0a1b2c3d", {"count": 2, "ids": [CID]}), None),
    "reply-bool": (Reply(RID.id, "node-1.lq2x8k0c0a1b2c3d", True), None),
    "reply-error": (
        Reply(RID.id, "node-1.lq2x8k0c0a1b2c3d", None, ("BackendError", "Redis refused subscribe: NOPERM")),
        None,
    ),
    "heartbeat": (
        Heartbeat(
            NodeInfo(
                instance="node-1.lq2x8k0c0a1b2c3d",
                node_id="node-1",
                connections=2,
                ttl=3.0,
                started_at=1700000000.5,
                host="10.0.0.5",
                port=8765,
                mode="routing",
                signed=False,
            )
        ),
        None,
    ),
    "bye": (Bye("node-1.lq2x8k0c0a1b2c3d"), None),
    "bulk-to-clients": (
        SendBulk(
            TargetKind.CLIENTS, ((CID, b"hi ann", False), (OTHER, b"\x00\x01", True), (CID, b"bye", False))
        ),
        None,
    ),
    "bulk-to-flags": (SendBulk(TargetKind.FLAGS, (("user-42", b"a", False), ("user-7", b"bc", False))), None),
    "close-with-last-frame": (
        Close(Target.flags("user-42"), 4001, "kicked", last=b'{"type":"kicked"}'),
        None,
    ),
    "close-guests": (CloseGuests(30.0, 4003, "sign in", request=RID), None),
    "bind-no-replace": (Bind(CID, "user-42", RID, replace=False), None),
    "query-in-group": (Query(QueryKind.IN_GROUP, RID, CID, ("lobby",)), None),
    "query-flags-clients": (Query(QueryKind.FLAGS_CLIENTS, RID, "", ("user-42", "user-7")), None),
    "reply-page": (Reply(RID.id, "node-1.lq2x8k0c0a1b2c3d", [CID], None, 1, 3), None),
    "presence-snapshot": (
        PresenceSnapshot("node-1.lq2x8k0c0a1b2c3d", {"lobby": ("user-42", "user-7"), "room-1": ("user-7",)}),
        None,
    ),
    "presence-change": (PresenceChange("node-1.lq2x8k0c0a1b2c3d", "lobby", "user-42", "leave"), None),
    "stamped-send-to-group": (Send(Target.groups("lobby"), b'{"text":"hi"}'), None),
    "signed-send-to-group": (Send(Target.groups("lobby"), b'{"text":"hi"}'), "s3cret"),
    "signed-close-by-flag": (Close(Target.flags("user-42"), 1008, "policy"), "s3cret"),
    "stored-send-to-groups": (
        Send(
            Target.groups("lobby", "room-1"),
            b'{"text":"hi"}',
            dedupe_id="9f86d081884c7d65",
            json=True,
            sid="5f1c0a9e3b7d2c41",
        ),
        None,
    ),
    "signed-stored-send-to-group": (
        Send(Target.groups("lobby"), b'{"text":"hi"}', json=True, sid="5f1c0a9e3b7d2c41"),
        "s3cret",
    ),
    "keyed-send-to-flag-with-request": (
        Send(Target.flags("user-42"), b"order 1001 shipped", request=RID, idempotency_key="outbox:1001"),
        None,
    ),
    "keyed-bulk-to-clients": (
        SendBulk(TargetKind.CLIENTS, ((CID, b"a", False),), None, "orders-7#0"),
        None,
    ),
}
#: the vectors that carry an envelope (every signed one must)
VECTOR_ENVELOPES = {
    "stamped-send-to-group",
    "signed-send-to-group",
    "signed-close-by-flag",
    "signed-stored-send-to-group",
}
#: the vectors of stored sends: the positions line the store put in front (outside the signature)
VECTOR_POSITIONS: dict[str, Positions] = {
    "stored-send-to-groups": {"group:lobby": ("3f2a9c1e", 41), "group:room-1": ("77ab01cd", 7)},
    "signed-stored-send-to-group": {"group:lobby": ("3f2a9c1e", 41)},
}


def vector_envelope(name: str) -> Envelope:
    return STAMP if name in VECTOR_ENVELOPES else protocol.NO_ENVELOPE


#: name -> what the vector means, for a reader of the vectors file
VECTOR_DESCRIPTIONS = {
    "send-text-to-group": 'send the text frame {"text":"hi"} to group lobby',
    "send-text-to-groups-deduped": "text frame héllo (UTF-8) to groups lobby and 'room 1', with a dedupe id",
    "send-binary-to-clients-with-exclude": "binary frame 00 01 0a 3b ff to two clients, excluding the second",
    "send-to-flag": "send the text frame 'you have mail' to every connection bound to flag user-42",
    "send-to-all-with-request": "send the text frame ping to everyone; each node replies how many it reached",
    "close-by-flag": "close every connection bound to flag user-42 with code 4001 and a reason",
    "close-clients-default-code": "close one client with the default code 1000 and no reason",
    "join": "add a client to groups lobby and 'room 1'; the owning node replies whether the client exists",
    "leave": "remove a client from group lobby, no reply wanted",
    "dissolve": "every member of group 'room 1' leaves it; each node replies how many left",
    "bind": "bind a client to flag user-42 (replacing its old flag); the owner replies",
    "unbind": "remove a client's flag, no reply wanted",
    "session-replace": 'replace a client\'s session with {"name":"ann"}',
    "session-merge": 'merge {"lang":"fr","score":3} into a client\'s session; the owner replies',
    "query-connections": "ask every node for its number of connections",
    "query-exists": "ask the owning node whether a client id is connected",
    "query-group-clients": "ask every node for the client ids of its members of group lobby",
    "reply": "a node's answer (a JSON object) to request 1c.0f3a9b2e",
    "reply-bool": "a node's answer true to request 1c.0f3a9b2e",
    "reply-error": "a node could not do what request 1c.0f3a9b2e asked: the broker refused a subscription",
    "heartbeat": "node instance node-1.lq2x8k0c0a1b2c3d (routing mode, unsigned) is alive with 2 "
    "connections; dead if silent for 3 s",
    "bye": "node instance node-1.lq2x8k0c0a1b2c3d leaves cleanly",
    "bulk-to-clients": "one bulk: 'hi ann' then 'bye' (text) to the first client, 00 01 (binary) to the "
    "second; l gives each payload's length, in order",
    "bulk-to-flags": "one bulk: 'a' to every connection bound to user-42, 'bc' to those bound to user-7",
    "close-with-last-frame": 'close flag user-42 with code 4001 after a last text frame {"type":"kicked"}',
    "close-guests": "close every connection with no flag that has been open 30 s or more, code 4003; "
    "each node replies how many it closed",
    "bind-no-replace": "bind a client to flag user-42 unless it already has a flag; the owner replies",
    "query-in-group": "ask the owning node whether a client is in group lobby",
    "query-flags-clients": "ask every node for the client ids bound to flags user-42 and user-7",
    "reply-page": "page 1 (counting from 0) of 3 of a node's answer to request 1c.0f3a9b2e",
    "presence-snapshot": "a node's presence contribution: the flags it holds in each presence group",
    "presence-change": "the presence leader announces that user-42 left lobby",
    "stamped-send-to-group": "send-text-to-group with an envelope: sender u-lq2x8k0czz00aa11, its "
    "message 42, sent at 1700000000.123",
    "signed-send-to-group": "stamped-send-to-group signed with the secret s3cret for namespace fanout",
    "signed-close-by-flag": "close flag user-42 with code 1008 and reason policy, stamped like "
    "stamped-send-to-group, signed with s3cret for namespace fanout",
    "stored-send-to-groups": 'the JSON value {"text":"hi"} to groups lobby and room-1, both history '
    "streams: stored with send id 5f1c0a9e3b7d2c41 at offset 41 of group:lobby (epoch 3f2a9c1e) and 7 of "
    "group:room-1 (epoch 77ab01cd), the positions line in front; the copy published on g.lobby (each copy "
    "carries the same line and mid)",
    "signed-stored-send-to-group": "a stored send to group lobby, stamped like stamped-send-to-group and "
    "signed with s3cret for namespace fanout; its positions line (offset 41) is outside the signature",
    "keyed-send-to-flag-with-request": "send to flag user-42 with idempotency key outbox:1001: a node "
    "applies the key once within FANOUT_IDEMPOTENCY_WINDOW and answers a repeat with the first's count",
    "keyed-bulk-to-clients": "the first command (#0) of a bulk call with idempotency key orders-7: each "
    "command of the call carries a key of its own",
}


def vector_bytes(vector: dict[str, Any]) -> bytes:
    if "hex" in vector:
        return bytes.fromhex(vector["hex"])
    return vector["text"].encode()


def load_vectors() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
    return vectors


def make_vectors() -> list[dict[str, Any]]:
    """What the vectors file holds; run this module as a script to rewrite it (then review it)."""
    out = []
    for name, (command, secret) in VECTOR_COMMANDS.items():
        data = protocol.encode(command, secret.encode() if secret else None, vector_envelope(name))
        data = attach_positions(data, VECTOR_POSITIONS.get(name, {}))
        vector: dict[str, Any] = {"name": name, "command": VECTOR_DESCRIPTIONS[name], "secret": secret}
        try:
            vector["text"] = data.decode()
        except UnicodeDecodeError:
            vector["hex"] = data.hex()
        out.append(vector)
    return out


def test_vectors_file_covers_every_named_vector() -> None:
    vectors = load_vectors()
    assert [v["name"] for v in vectors] == list(VECTOR_COMMANDS)
    assert [v["command"] for v in vectors] == [VECTOR_DESCRIPTIONS[n] for n in VECTOR_COMMANDS]
    for vector in vectors:
        assert set(vector) in ({"name", "command", "secret", "text"}, {"name", "command", "secret", "hex"})
    assert any("hex" in v for v in vectors)
    assert any(v["secret"] for v in vectors)


@pytest.mark.parametrize("vector", load_vectors(), ids=lambda v: v["name"])
def test_vector_decodes_to_the_command(vector: dict[str, Any]) -> None:
    command, secret = VECTOR_COMMANDS[vector["name"]]
    assert vector["secret"] == secret
    key = secret.encode() if secret else None
    message = protocol.open_message(vector_bytes(vector), key, None, "fanout")
    assert message.command == command
    assert getattr(message.command, "positions", None) == VECTOR_POSITIONS.get(vector["name"])
    envelope = vector_envelope(vector["name"])
    assert message.envelope == (
        envelope if key else Envelope(envelope.origin, envelope.seq, envelope.sent_at)
    )


@pytest.mark.parametrize("vector", load_vectors(), ids=lambda v: v["name"])
def test_command_encodes_to_the_vector(vector: dict[str, Any]) -> None:
    command, secret = VECTOR_COMMANDS[vector["name"]]
    key = secret.encode() if secret else None
    data = protocol.encode(command, key, vector_envelope(vector["name"]))
    assert attach_positions(data, VECTOR_POSITIONS.get(vector["name"], {})) == vector_bytes(vector)


def test_signed_vectors_fail_under_another_secret() -> None:
    for vector in load_vectors():
        if vector["secret"]:
            with pytest.raises(BadSignature):
                protocol.decode(vector_bytes(vector), b"not-" + vector["secret"].encode())


if __name__ == "__main__":
    VECTORS_FILE.parent.mkdir(exist_ok=True)
    text = json.dumps(make_vectors(), indent=2, ensure_ascii=False)
    VECTORS_FILE.write_text(text + "\n", encoding="utf-8")
