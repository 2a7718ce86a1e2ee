"""The receive side, bytes in: decode, freshness and replay (with a secret), sender order, dedupe, lag."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fanout import protocol
from fanout.commands import Heartbeat, JoinGroup, NodeInfo, Send, Target
from fanout.protocol import Encoder, Envelope
from fanout.receive import LAG_BUCKETS, LagHistogram, Receiver, ReplayGuard

NS = "chat"
KEY = b"s3cret"
NOW = 1_800_000_000.0


def receiver(secret: bytes | None = KEY, window: float = 60.0) -> Receiver:
    return Receiver(secret=secret, namespace=NS, max_message=1 << 20, replay_window=window)


def send(text: str) -> Send:
    return Send(Target.groups("lobby"), text.encode())


def test_a_signed_command_is_applied_once_however_often_it_is_replayed() -> None:
    rx = receiver()
    message = Encoder("u-1", NS, KEY).encode(send("pay 10"), NOW)
    assert rx.take([message], NOW) == [send("pay 10")]
    for i in range(100):
        assert rx.take([message], NOW + i * 0.1) == []
    assert rx.dropped["replay"] == 100
    # in one batch, too
    assert rx.take([message, message], NOW + 11) == []


def test_a_command_replayed_after_the_window_is_stale() -> None:
    rx = receiver(window=60.0)
    message = Encoder("u-1", NS, KEY).encode(send("x"), NOW)
    later = receiver(window=60.0)  # a receiver that never saw it (a node started since)
    assert later.take([message], NOW + 60.0) == [send("x")]
    assert rx.take([message], NOW + 61.0) == []
    assert rx.dropped["stale"] == 1
    # a publisher clock far ahead is refused the same way
    ahead = Encoder("u-2", NS, KEY).encode(send("y"), NOW + 120)
    assert rx.take([ahead], NOW) == []
    assert rx.dropped["stale"] == 2


def test_the_window_is_a_setting() -> None:
    message = Encoder("u-1", NS, KEY).encode(send("x"), NOW)
    assert receiver(window=5.0).take([message], NOW + 6) == []
    assert receiver(window=10.0).take([message], NOW + 6) == [send("x")]


def test_a_command_signed_for_another_namespace_is_dropped() -> None:
    rx = receiver()
    other = Encoder("u-1", "other", KEY).encode(send("x"), NOW)
    assert rx.take([other], NOW) == []
    assert rx.dropped["namespace"] == 1


def test_unsigned_and_forged_are_dropped_as_signature() -> None:
    rx = receiver()
    assert rx.take([Encoder("u-1", NS).encode(send("x"), NOW)], NOW) == []
    assert rx.take([Encoder("u-1", NS, b"guess").encode(send("x"), NOW)], NOW) == []
    assert rx.dropped["signature"] == 2


def test_without_a_secret_nothing_is_refused_for_age_or_repeats() -> None:
    rx = receiver(secret=None)
    message = Encoder("u-1", NS).encode(send("x"), NOW)
    assert rx.take([message, message], NOW + 1000) == [send("x"), send("x")]
    assert not rx.dropped


def test_each_senders_messages_are_put_back_in_order() -> None:
    a, b = Encoder("a", NS, KEY), Encoder("b", NS, KEY)
    a1, a2, a3 = (a.encode(send(f"a{i}"), NOW) for i in (1, 2, 3))
    b1, b2 = (b.encode(send(f"b{i}"), NOW) for i in (1, 2))
    unstamped = protocol.encode(send("plain"))
    rx = receiver(secret=None)
    got = rx.take([a3, b2, unstamped, a1, b1, a2], NOW)
    # a's messages take a's places in a's order; b's likewise; the unstamped one keeps its place
    assert [c.payload.decode() for c in got if isinstance(c, Send)] == ["a1", "b1", "plain", "a2", "b2", "a3"]


def test_a_command_published_on_several_addresses_is_applied_once() -> None:
    enc = Encoder("u-1", NS, KEY)
    command = Send(Target.groups("a", "b"), b"x", dedupe_id="d1")
    copies = [enc.encode(command, NOW), enc.encode(command, NOW)]  # one per address: different counts
    rx = receiver()
    assert rx.take(copies, NOW) == [command]
    assert rx.take([enc.encode(command, NOW)], NOW) == []  # a later copy too
    assert not rx.dropped


def test_a_text_send_that_is_not_utf8_is_dropped() -> None:
    rx = receiver(secret=None)
    bad = protocol.encode(Send(Target.all(), b"caf\xe9"))
    binary = protocol.encode(Send(Target.all(), b"caf\xe9", binary=True))
    good = protocol.encode(Send(Target.all(), "café".encode()))
    got = rx.take([bad, binary, good], NOW)
    assert [c.payload for c in got if isinstance(c, Send)] == [b"caf\xe9", "café".encode()]
    assert rx.dropped["utf8"] == 1


def test_bad_bytes_are_counted_by_reason() -> None:
    rx = receiver(secret=None)
    assert rx.take([b"junk", b"v1;;{}\n", b"v2;;" + b"x" * (1 << 20)], NOW) == []
    assert rx.dropped == {"malformed": 1, "version": 1, "oversized": 1}


def test_heartbeats_that_fail_verification_are_noted() -> None:
    info = NodeInfo("node-1.abc", "node-1", 0, 3.0, mode="routing", signed=True)
    rx = receiver()
    assert rx.take([Encoder("node-1.abc", NS, b"other key").encode(Heartbeat(info), NOW)], NOW) == []
    assert rx.unverified_heartbeats == {"node-1.abc": NOW}


def test_lag_is_measured_from_the_publishers_stamp() -> None:
    rx = receiver(secret=None)
    enc = Encoder("u-1", NS)
    rx.take([enc.encode(send("x"), NOW - 0.003), enc.encode(JoinGroup("c", ("g",)), NOW - 2)], NOW)
    assert rx.lag.count == 2
    assert abs(rx.lag.total - 2.003) < 1e-6
    cumulative = dict(rx.lag.cumulative())
    assert cumulative[0.0025] == 0 and cumulative[0.005] == 1 and cumulative[2.5] == 2
    assert cumulative[float("inf")] == 2


def test_lag_histogram_clamps_a_publisher_clock_ahead_to_zero() -> None:
    lag = LagHistogram()
    lag.observe(-0.5)
    assert lag.total == 0 and dict(lag.cumulative())[LAG_BUCKETS[0]] == 1


# --------------------------------------------------------------------------- the replay guard


def test_guard_accepts_counts_out_of_order_once_each() -> None:
    guard = ReplayGuard(60.0)
    accepted = [guard.accept("u", seq, NOW) for seq in (5, 3, 9, 4, 3, 9, 1)]
    assert accepted == [True, True, True, True, False, False, True]


def test_guard_refuses_counts_too_far_behind() -> None:
    guard = ReplayGuard(60.0)
    assert guard.accept("u", ReplayGuard.SPAN + 10, NOW)
    assert not guard.accept("u", 10, NOW)  # exactly SPAN behind: too old to tell
    assert guard.accept("u", 11, NOW)


def test_guard_forgets_silent_senders() -> None:
    guard = ReplayGuard(10.0)
    guard.accept("u", 1, NOW)
    guard.accept("v", 1, NOW + 15)
    guard.accept("v", 2, NOW + 25)  # a sweep: u has been silent for 2 windows
    assert len(guard) == 1


@given(st.lists(st.integers(1, 10_000), max_size=300))
def test_guard_accepts_exactly_the_first_of_each_count(counts: list[int]) -> None:
    guard = ReplayGuard(60.0)
    seen: set[int] = set()
    top = 0
    for seq in counts:
        expected = seq not in seen and top - seq < ReplayGuard.SPAN
        assert guard.accept("u", seq, NOW) == expected
        if expected:
            seen.add(seq)
            top = max(top, seq)


def test_the_encoder_numbers_every_message_of_its_endpoint() -> None:
    enc = Encoder("n.b", NS, KEY)
    envelopes = [protocol.open_message(enc.encode(send("x"), NOW), KEY).envelope for _ in range(3)]
    assert [e.seq for e in envelopes] == [1, 2, 3]
    assert envelopes[0] == Envelope("n.b", 1, NOW, NS)
