"""fanout.Outbox's calls against ServerUtil's (same signatures, same refusals, same payload bytes), its rows
on a real PostgreSQL (one per call, in the caller's transaction, numbered at COMMIT), and ``fanout outbox``.

(End to end through relays, nodes and clients: tests/test_outbox.py.)
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest

from fanout import Outbox, PayloadError, ServerUtil, protocol
from fanout.outbox import CALLS, SHARDS, SqlNames, decode_args, shard_of
from fanout.relay import key_prefix
from tests.support.nodes import run_module
from tests.support.outbox import DSN, outbox_schema


@pytest.fixture
def table() -> Iterator[str]:
    with outbox_schema("obc") as name:
        yield name


def rows(table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(DSN, autocommit=True) as db:
        return db.execute(f"SELECT seq, call, args, shards FROM {table} ORDER BY seq").fetchall()


def test_every_call_has_serverutils_parameters() -> None:
    for name in CALLS:
        ours = inspect.signature(getattr(Outbox, name)).parameters
        theirs = inspect.signature(getattr(ServerUtil, name)).parameters
        assert list(ours.values()) == list(theirs.values()), name


BAD: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("send_to_group", (42, "x"), {}),
    ("send_to_group", ("g", float("nan")), {}),
    ("send_to_group", ("g", "\ud800"), {}),
    ("send", ("c", object()), {}),
    ("send_by_flag", ("u", "x"), {"exclude": [1]}),
    ("send_to_all", ({"deep": [1, float("inf")]},), {}),
    ("close", ("c",), {"code": 999}),
    ("close", ("c",), {"reason": "x" * 200}),
    ("close_guests", (-1,), {}),
    ("set_session", ("c", {1: 2}), {}),
    ("update_session", ("c", {"a": float("inf")}), {}),
    ("bind", ("c", 5), {}),
    ("join_group", ("c", b"g"), {}),
    ("send_bulk", ([("a",)],), {}),
    ("send_bulk_by_flag", ([("a", float("nan"))],), {}),
    ("leave_group", ("c", "g"), {"timeout": -1}),
    ("send_to_group", ("g", "x"), {"idempotency_key": ""}),
    ("send_bulk", ([("c", "x")],), {"idempotency_key": "k" * 129}),
]


@pytest.mark.parametrize(("call", "args", "kwargs"), BAD, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(BAD)])
def test_a_bad_call_raises_at_the_call_as_serverutil_does(
    call: str, args: tuple[Any, ...], kwargs: dict[str, Any], table: str
) -> None:
    with pytest.raises(PayloadError) as direct:
        asyncio.run(getattr(ServerUtil(), call)(*args, **kwargs))
    with psycopg.connect(DSN) as db:
        with pytest.raises(PayloadError) as outboxed:
            getattr(Outbox(db, table=table), call)(*args, **kwargs)
        db.commit()
    assert str(outboxed.value) == str(direct.value)
    assert rows(table) == []


def test_ack_is_refused_and_one_row_per_call_numbered_at_commit(table: str) -> None:
    class Money:
        def __init__(self, cents: int) -> None:
            self.cents = cents

    def default(value: object) -> object:
        if isinstance(value, Money):
            return f"{value.cents / 100:.2f}"
        raise TypeError

    with psycopg.connect(DSN) as db:
        outbox = Outbox(db, table=table, json_default=default)
        with pytest.raises(PayloadError, match="ack=True cannot be answered by an outbox"):
            outbox.send_by_flag("ann", "x", ack=True)
        outbox.send_to_group(["g1", "g2"], {"price": Money(1250)}, exclude=["c9"])
        outbox.send("n1.a.1", b"\x00\xff")
        with db.transaction():  # a savepoint rolled back: its row goes with it
            outbox.send_to_all("gone")
            db.execute("SELECT 1")
            raise psycopg.Rollback()
        outbox.join_group("n1.a.1", "g1", timeout=2)
        outbox.set_session("n1.a.1", {"plan": "gold"})
        outbox.send_bulk_by_flag([("ann", "a1"), ("bob", {"b": 1})])
        outbox.close_guests(30, data="bye")
        outbox.send_to_group([], "nobody")  # no target: no row, as ServerUtil publishes nothing
        with psycopg.connect(DSN) as other:
            assert rows(table) == []  # not committed: invisible
            Outbox(other, table=table).send_to_all("committed first")
            other.commit()
        db.commit()
    got = rows(table)
    assert [seq for seq, *_ in got] == list(range(1, 8))
    assert [call for _, call, _, _ in got] == [
        "send_to_all",
        "send_to_group",
        "send",
        "join_group",
        "set_session",
        "send_bulk_by_flag",
        "close_guests",
    ]
    _, _, group_args, group_shards = got[1]
    assert group_shards == sorted({shard_of("group:g1"), shard_of("group:g2")})
    assert all(0 <= s < SHARDS for *_, shards in got for s in shards)
    assert got[3][3] == sorted({shard_of("client:n1.a.1"), shard_of("group:g1")})
    # what the relay hands to ServerUtil is what ServerUtil would have sent (json_default applied here)
    sent = decode_args("send_to_group", group_args)
    assert sent["groups"] == ["g1", "g2"] and sent["exclude"] == ["c9"]
    assert protocol.dump_json(sent["data"]) == orjson.dumps({"price": "12.50"})
    assert decode_args("send", got[2][2])["data"] == b"\x00\xff"
    assert decode_args("join_group", got[3][2]) == {"client_id": "n1.a.1", "groups": ["g1"], "timeout": 2}
    assert decode_args("send_bulk_by_flag", got[5][2])["pairs"][0] == ("ann", "a1")
    assert decode_args("close_guests", got[6][2])["data"] == "bye"


def test_fanout_outbox_init_is_idempotent_and_sql_prints_it(table: str) -> None:
    schema = table.split(".")[0]
    for _ in range(2):  # the table exists already (the fixture ran the same SQL): nothing breaks
        done = run_module("fanout", "outbox", "init", "--dsn", DSN, "--table", table)
        assert done.returncode == 0, done.stderr
        assert orjson.loads(done.stdout) == {"table": table, "created": True}
    other = f"{schema}.second"
    done = run_module(
        "fanout", "outbox", "init", env={"FANOUT_OUTBOX_DSN": DSN, "FANOUT_OUTBOX_TABLE": other}
    )
    assert done.returncode == 0, done.stderr
    assert rows(other) == []
    printed = run_module("fanout", "outbox", "sql", "--table", other)
    assert printed.returncode == 0 and f"CREATE TABLE IF NOT EXISTS {other} (" in printed.stdout
    away = run_module("fanout", "outbox", "init", "--dsn", "postgresql://postgres@127.0.0.1:1/test")
    assert away.returncode == 1 and away.stderr.count("\n") == 1, away.stderr
    missing = run_module("fanout", "relay")
    assert missing.returncode == 2 and "--dsn" in missing.stderr
    bad = run_module("fanout", "outbox", "init", "--dsn", DSN, "--table", "Robert'); DROP")
    assert bad.returncode == 2 and "is not a table name" in bad.stderr


def test_a_rows_key_and_the_channel_fit_whatever_the_names() -> None:
    assert SqlNames("fanout_outbox").channel == "fanout_outbox"
    assert len(SqlNames("s" * 63 + "." + "t" * 48).channel) <= 63  # PostgreSQL's limit for a channel
    assert key_prefix("test", "fanout_outbox") == "outbox:test.fanout_outbox:"
    long = key_prefix("d" * 63, "s" * 63 + "." + "t" * 48)
    assert len(long + str(2**63)) <= 128 and long != key_prefix("d" * 63, "s" * 63 + "." + "u" * 48)
