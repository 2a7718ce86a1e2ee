"""Channel names and routing keys: readable when possible, never colliding, never too long."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanout import naming
from fanout.naming import Address, Kind, safe_segment

NAMED_KINDS = [Kind.NODE, Kind.GROUP, Kind.FLAG, Kind.INBOX]
PLAIN_CHARS = "abcXYZ019_-."

# any str, lone surrogates included (a name is a Python str before it is anything else)
every_char = st.characters(exclude_categories=())
any_text = st.text(max_size=100) | st.text(every_char, max_size=300)
any_text |= st.text(every_char, min_size=1000, max_size=10_000)
plain_ish = st.text(st.sampled_from(PLAIN_CHARS + "%~ "), max_size=120)
names = any_text | plain_ish | st.sampled_from(["", "~", "%", "%7E", "~7E", "a" * 64, "a" * 65, "a" * 97])
addresses = st.builds(Address, st.sampled_from(NAMED_KINDS), names)


def hashed(name: str) -> str:
    return "~" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:40]


# --------------------------------------------------------------------------- readability


@pytest.mark.parametrize("name", ["lobby", "user-42", "room_1", "a.b.c", "A" * 64, "0", "-", "."])
def test_plain_names_appear_as_is(name: str) -> None:
    assert safe_segment(name) == name
    assert naming.group(name).channel("fanout") == f"fanout:g:{name}"
    assert naming.group(name).key() == f"g.{name}"
    assert naming.flag(name).channel("app") == f"app:f:{name}"
    assert naming.flag(name).key() == f"f.{name}"


def test_fixed_addresses() -> None:
    assert naming.ALL.channel("fanout") == "fanout:all"
    assert naming.ALL.key() == "all"
    assert naming.HEARTBEAT.channel("fanout") == "fanout:hb"
    assert naming.HEARTBEAT.key() == "hb"
    assert naming.node("n1.abc").channel("ns") == "ns:n:n1.abc"
    assert naming.node("n1.abc").key() == "n.n1.abc"
    assert naming.inbox("u-1").channel("ns") == "ns:i:u-1"
    assert naming.inbox("u-1").key() == "i.u-1"


@pytest.mark.parametrize(
    ("name", "segment"),
    [
        ("room 1", "room%201"),
        ("a:b", "a%3Ab"),
        ("%", "%25"),
        ("~", "%7E"),
        ("a~b", "a%7Eb"),
        ("é", "%C3%A9"),
        ("a/b?c#d", "a%2Fb%3Fc%23d"),
        ("", ""),
        ("a" * 65, "a" * 65),  # too long to be plain, short enough to stay readable
    ],
)
def test_other_names_are_percent_escaped(name: str, segment: str) -> None:
    assert safe_segment(name) == segment


def test_long_names_are_hashed() -> None:
    name = "x" * 97
    assert safe_segment(name) == hashed(name)
    assert re.fullmatch(r"~[0-9a-f]{40}", safe_segment(name))
    # a name whose escaping grows past 96 characters is hashed too
    assert safe_segment("é" * 17) == hashed("é" * 17)
    assert safe_segment("é" * 16) == "%C3%A9" * 16


def test_a_name_that_looks_hashed_does_not_collide_with_the_hashed_name() -> None:
    long_name = "room " * 40
    lookalike = hashed(long_name)  # "~" + 40 hex digits: a legal group name
    assert safe_segment(long_name) == lookalike
    assert safe_segment(lookalike) != lookalike
    assert naming.group(lookalike).channel("ns") != naming.group(long_name).channel("ns")


def test_a_name_that_looks_escaped_does_not_collide_with_the_escaped_name() -> None:
    assert safe_segment("room 1") == "room%201"
    assert safe_segment("room%201") == "room%25201"


def test_lone_surrogates_are_named_too() -> None:
    assert safe_segment("\ud800") == "%ED%A0%80"
    assert safe_segment("\ud800" * 50) == hashed("\ud800" * 50)


# --------------------------------------------------------------------------- properties


@settings(max_examples=500)
@given(names)
def test_segments_are_short_ascii_and_never_contain_separators(name: str) -> None:
    segment = safe_segment(name)
    assert segment.isascii()
    assert len(segment) <= 96
    assert ":" not in segment
    assert not any(c.isspace() for c in segment)
    if re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        assert segment == name  # plain names readable as-is
    else:
        assert segment == "" or "%" in segment or segment.startswith("~") or len(segment) > 64


@settings(max_examples=300)
@given(addresses, st.text(st.sampled_from(PLAIN_CHARS), min_size=1, max_size=64))
def test_channels_and_keys_fit_every_broker_limit(address: Address, namespace: str) -> None:
    # Redis channels have no hard limit but stay short; AMQP routing keys are shortstr (255 bytes)
    assert len(address.channel(namespace).encode()) <= 255
    assert len(address.key().encode()) <= 255


def lookalikes(name: str) -> list[str]:
    """Names built to hit ``name``'s segment: its escaped and hashed forms, case changes, padding."""
    return [safe_segment(name), hashed(name), name.upper(), name.lower(), name + " ", name[:64], name[:-1]]


@settings(max_examples=300)
@given(st.lists(names, max_size=10))
def test_segments_are_injective(batch: list[str]) -> None:
    candidates = set(batch)
    for name in batch:
        candidates.update(lookalikes(name))
    segments = {safe_segment(name) for name in candidates}
    assert len(segments) == len(candidates)


@settings(max_examples=300)
@given(st.lists(addresses, max_size=10))
def test_distinct_addresses_get_distinct_channels_and_keys(batch: list[Address]) -> None:
    candidates = set(batch)
    for address in batch:
        candidates.update(Address(kind, other) for kind in NAMED_KINDS for other in lookalikes(address.name))
    assert len({a.channel("fanout") for a in candidates}) == len(candidates)
    assert len({a.key() for a in candidates}) == len(candidates)


@given(names)
def test_kinds_never_share_a_channel(name: str) -> None:
    addresses = [Address(kind, name) for kind in NAMED_KINDS] + [naming.ALL, naming.HEARTBEAT]
    assert len({a.channel("fanout") for a in addresses}) == len(addresses)
    assert len({a.key() for a in addresses}) == len(addresses)


@given(names)
def test_segment_kinds_are_disjoint(name: str) -> None:
    """A plain segment has no '%' or '~', an escaped one no '~', a hashed one starts with '~'."""
    segment = safe_segment(name)
    if segment.startswith("~"):
        assert re.fullmatch(r"~[0-9a-f]{40}", segment)
        assert segment == hashed(name)
    else:
        assert "~" not in segment


def test_adversarial_pairs_stay_apart() -> None:
    pairs = [
        ("a b", "a%20b"),
        ("~", "%7E"),
        ("~", "%7e"),
        ("a" * 64, "a" * 64 + " "),
        ("x" * 97, hashed("x" * 97)),
        ("", " "),
        ("g.lobby", "lobby"),
    ]
    for a, b in pairs:
        assert safe_segment(a) != safe_segment(b), (a, b)
    assert naming.group("x").key() != naming.flag("x").key()
    assert naming.group("all").key() != naming.ALL.key()
    assert naming.group("hb").channel("ns") != naming.HEARTBEAT.channel("ns")
