"""Transactional publishing: ServerUtil's command calls written as rows of the application's own transaction.

:class:`Outbox` wraps a DB-API connection (psycopg 3, or Django's ``connection``) and has ServerUtil's
command calls (sends, closes, membership, sessions) with their signatures. Each call checks its arguments
exactly as ServerUtil does (the same table, :mod:`fanout.arguments`, and the same payload encoding), then
inserts one row into the outbox table inside the caller's current transaction: no other I/O. A rolled-back
transaction leaves no row; a committed one leaves all of its rows, which ``fanout relay``
(:mod:`fanout.relay`) publishes in commit order per target and then deletes.

Commit order. Row ids are taken at insert, so they are not the order in which transactions commit. A
deferred constraint trigger runs at COMMIT: it takes one transaction-level advisory lock (held until the
commit is done and visible), numbers the transaction's rows ``seq`` (in their insertion order) and
notifies the relays. Every transaction that numbers rows holds that lock from numbering until its commit
is visible, so ``seq`` order is commit order, and a reader that sees ``seq`` N sees every smaller one.

Shards. Each row names the shards (``crc32(target) % 64``) of the targets it concerns: each client id,
flag and group, ``all`` for broadcasts and ``close_guests``; a membership call both the client and its
groups or flag. Relays order and claim rows by them (see :mod:`fanout.relay`).

This module needs no database library: the caller's connection does the work (``fanout[outbox]``
installs psycopg 3 for ``fanout outbox init`` and ``fanout relay``).
"""

from __future__ import annotations

import re
import zlib
from base64 import b64decode, b64encode
from collections.abc import Iterable
from typing import Any

import orjson

from . import protocol
from .arguments import COMMAND_CALLS, checked_blocking
from .commands import Json
from .exceptions import ConfigError, MessageTooLarge, PayloadError
from .serverutil import Names, encode_payload, names, session_json

DEFAULT_TABLE = "fanout_outbox"
#: how many shards rows are spread over (relays own shards; a row touches the shards of its targets)
SHARDS = 64
#: room left in a command for its envelope, signature and target names (a payload must fit the rest)
_HEADER_ROOM = 4096
_TABLE = re.compile(r"(?:[a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,47}")

#: the calls an outbox row may hold (ServerUtil's method names)
CALLS = frozenset(COMMAND_CALLS)


def check_table(table: str) -> str:
    """``table`` if it is a plain lower-case name, optionally schema-qualified (``schema.name``)."""
    if not isinstance(table, str) or not _TABLE.fullmatch(table):
        raise ConfigError(
            "table",
            f"{table!r} is not a table name fanout accepts: lower-case letters, digits and _, optionally "
            "schema-qualified (schema.name), the name at most 48 characters (its indexes add 15)",
        )
    return table


def lock_key(label: str) -> int:
    """A 31-bit advisory lock key (the first of PostgreSQL's two int4 keys) for ``label``."""
    return zlib.crc32(label.encode()) & 0x7FFFFFFF


def shard_of(target: str) -> int:
    """The shard of a target name (``group:<name>``, ``flag:<name>``, ``client:<id>`` or ``all``)."""
    return zlib.crc32(target.encode("utf-8", "surrogatepass")) % SHARDS


class SqlNames:
    """The SQL names of one outbox table's objects."""

    def __init__(self, table: str) -> None:
        self.table = check_table(table)
        schema, _, base = table.rpartition(".")
        self.base = base
        prefix = f"{schema}." if schema else ""
        self.sequence = f"{prefix}{base}_seq"
        self.function = f"{prefix}{base}_commit"
        self.trigger = f"{base}_commit"
        #: the NOTIFY channel (LISTEN "<channel>"): the table's name, or a digest of a long one (63 at most)
        self.channel = table if len(table) <= 63 else f"fanout_outbox_{lock_key(table):08x}"
        self.key = lock_key(f"fanout-outbox:{table}")  #: the shards' and the commit's first lock key
        self.relays_key = lock_key(f"fanout-outbox-relays:{table}")  #: each live relay holds one
        self.commit_lock = SHARDS + 1  #: (key, commit_lock): taken at COMMIT to number rows


def schema_sql(table: str = DEFAULT_TABLE) -> str:
    """The SQL that creates (or completes) the outbox table, its sequence, its trigger and its indexes.
    Idempotent; run in one transaction (``fanout outbox init`` and fanout.django's migration run it)."""
    n = SqlNames(table)
    return f"""
SELECT pg_advisory_xact_lock({n.key}, {SHARDS + 2});
CREATE SEQUENCE IF NOT EXISTS {n.sequence};
CREATE TABLE IF NOT EXISTS {n.table} (
    id bigserial PRIMARY KEY,
    seq bigint,
    txid bigint NOT NULL DEFAULT txid_current(),
    call text NOT NULL,
    args json NOT NULL,
    shards smallint[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE {n.table} IS 'fanout outbox: rows written by fanout.Outbox, published by fanout relay';
COMMENT ON COLUMN {n.table}.seq IS 'commit order, set at COMMIT by the {n.trigger} trigger';
CREATE INDEX IF NOT EXISTS {n.base}_seq_idx ON {n.table} (seq);
CREATE INDEX IF NOT EXISTS {n.base}_unnumbered_idx ON {n.table} (txid) WHERE seq IS NULL;
CREATE OR REPLACE FUNCTION {n.function}() RETURNS trigger LANGUAGE plpgsql AS $fanout$
DECLARE
    mine bigint := txid_current();
    rows bigint;
    base bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {n.table} WHERE id = NEW.id AND seq IS NULL) THEN
        RETURN NULL;  -- an earlier row's trigger numbered this transaction's rows
    END IF;
    -- held until this transaction's commit is visible: seq order is commit order
    PERFORM pg_advisory_xact_lock({n.key}, {n.commit_lock});
    SELECT count(*) INTO rows FROM {n.table} WHERE txid = mine AND seq IS NULL;
    base := nextval('{n.sequence}');
    IF rows > 1 THEN
        PERFORM setval('{n.sequence}', base + rows - 1);
    END IF;
    UPDATE {n.table} o SET seq = base + numbered.rank - 1
    FROM (
        SELECT id, row_number() OVER (ORDER BY id) AS rank
        FROM {n.table} WHERE txid = mine AND seq IS NULL
    ) numbered
    WHERE o.id = numbered.id;
    PERFORM pg_notify('{n.channel}', '');
    RETURN NULL;
END
$fanout$;
DO $fanout$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger WHERE tgname = '{n.trigger}' AND tgrelid = '{n.table}'::regclass
    ) THEN
        CREATE CONSTRAINT TRIGGER {n.trigger} AFTER INSERT ON {n.table}
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {n.function}();
    END IF;
END
$fanout$;
"""


def drop_sql(table: str = DEFAULT_TABLE) -> str:
    """The SQL that removes what :func:`schema_sql` created (pending rows included)."""
    n = SqlNames(table)
    return (
        f"DROP TABLE IF EXISTS {n.table};\nDROP FUNCTION IF EXISTS {n.function}();\n"
        f"DROP SEQUENCE IF EXISTS {n.sequence};\n"
    )


# ---------------------------------------------------------------------- a row's payloads


def encode_data(data: object, json_default: protocol.JsonDefault | None, limit: int) -> dict[str, str]:
    """A payload as a row keeps it: ``{"text": str}``, ``{"b64": base64}`` or ``{"json": JSON text}`` (the
    JSON exactly as ServerUtil would have encoded it, ``json_default`` applied). Raises PayloadError like a
    send, MessageTooLarge when it cannot fit a command of ``limit`` bytes."""
    payload, binary = encode_payload(data, json_default)
    if len(payload) > limit:
        raise MessageTooLarge(f"a payload of {len(payload)} bytes cannot fit a command of at most {limit}")
    if binary:
        return {"b64": b64encode(payload).decode()}
    if isinstance(data, str):
        return {"text": data}
    return {"json": payload.decode()}


def decode_data(kept: Any) -> object:
    """What :func:`encode_data` kept, as a send takes it: a str, bytes, or the JSON text as is."""
    if not isinstance(kept, dict) or len(kept) != 1:
        raise PayloadError(f"not an outbox payload: {kept!r:.60}")
    kind, value = next(iter(kept.items()))
    if kind == "text" and isinstance(value, str):
        return value
    if kind == "b64" and isinstance(value, str):
        return b64decode(value)
    if kind == "json" and isinstance(value, str):
        return orjson.Fragment(value)  # sent as the JSON text the outbox encoded, byte for byte
    raise PayloadError(f"not an outbox payload: {kept!r:.60}")


def decode_args(call: str, args: dict[str, Any]) -> dict[str, Any]:
    """A row's arguments as the relay passes them to the ServerUtil call ``call``."""
    if call not in CALLS:
        raise PayloadError(f"not an outbox call: {call!r}")
    out = dict(args)
    if "data" in out and call not in ("set_session", "update_session"):
        out["data"] = None if out["data"] is None else decode_data(out["data"])
    if "pairs" in out:
        out["pairs"] = [(name, decode_data(kept)) for name, kept in out["pairs"]]
    return out


# ---------------------------------------------------------------------- the outbox


class Outbox:
    """ServerUtil's command calls as rows of the caller's current database transaction.

    ``connection``: a DB-API connection to PostgreSQL whose transaction the rows join: a psycopg 3
    ``Connection`` (outside autocommit, a call starts the transaction if none is open; in autocommit each
    call is its own), or Django's ``django.db.connection`` (``transaction.atomic()`` covers the rows).
    ``table``: the outbox table (default ``fanout_outbox``, in the connection's default schema;
    ``schema.name`` works too); ``json_default`` as ServerUtil's; ``max_message`` the nodes' and relay's
    ``FANOUT_MAX_MESSAGE``: a payload that could not fit is refused here, not in the relay.

    Every call checks its arguments as ServerUtil does (a bad payload raises :class:`PayloadError` at the
    call) and returns ``None``: nothing is published until the transaction commits and a relay publishes
    the row. ``ack=True`` is refused (nobody can count deliveries inside a transaction); ``partial`` is
    meaningless without it. The relay publishes every send with an idempotency key: the row's own
    (database, table, row id), or the ``idempotency_key`` given here, which makes rows of several
    transactions with the same key (a request retried after its commit) one send. Membership, session
    and close calls take ``wait`` and ``timeout`` as ServerUtil does; the relay always makes them with
    ``wait=True`` (so that a later row's send already sees the membership) and with the ``timeout`` given
    here, and what they would have returned is not kept.
    """

    def __init__(
        self,
        connection: Any,
        *,
        table: str = DEFAULT_TABLE,
        json_default: protocol.JsonDefault | None = None,
        max_message: int = 8 * 1024 * 1024,
    ) -> None:
        self.connection = connection
        self.table = check_table(table)
        self.json_default = json_default
        self.limit = max_message - _HEADER_ROOM
        self._insert = f"INSERT INTO {self.table} (call, args, shards) VALUES (%s, %s::json, %s::smallint[])"

    def _add(self, call: str, targets: Iterable[str], args: dict[str, Any]) -> None:
        shards = sorted({shard_of(t) for t in targets}) or [shard_of("all")]
        row = (call, orjson.dumps(args).decode(), shards)
        cursor = self.connection.cursor()
        try:
            cursor.execute(self._insert, row)
        finally:
            cursor.close()

    def _data(self, data: object) -> dict[str, str] | None:
        return None if data is None else encode_data(data, self.json_default, self.limit)

    @staticmethod
    def _no_ack(call: str, ack: bool) -> None:
        if ack:
            raise PayloadError(
                f"{call}: ack=True cannot be answered by an outbox: the send is published by the relay "
                "after the transaction commits (leave ack out; history and resume make it reach every tab)"
            )

    def _send(
        self,
        call: str,
        kind: str,
        targets: tuple[str, ...],
        data: object,
        exclude: Names,
        idempotency_key: str | None,
    ) -> None:
        kept = encode_data(data, self.json_default, self.limit)  # (None too: a send of JSON null)
        args: dict[str, Any] = {"data": kept, "exclude": list(names(exclude, "exclude"))}
        if idempotency_key is not None:
            args["idempotency_key"] = idempotency_key
        if kind != "all":
            args[kind] = list(targets)
        where = ["all"] if kind == "all" else [f"{_PREFIX[kind]}:{t}" for t in targets]
        if kind != "all" and not targets:
            return  # ServerUtil publishes nothing for no target either
        self._add(call, where, args)

    # ------------------------------------------------------------------ sends

    @checked_blocking
    def send(
        self,
        client_ids: Names,
        data: object,
        *,
        exclude: Names = (),
        ack: bool = False,
        timeout: float | None = None,
        partial: bool = False,
        idempotency_key: str | None = None,
    ) -> None:
        """A row: send ``data`` to these connections (ServerUtil.send)."""
        self._no_ack("send", ack)
        self._send("send", "client_ids", names(client_ids, "client_ids"), data, exclude, idempotency_key)

    @checked_blocking
    def send_by_flag(
        self,
        flags: Names,
        data: object,
        *,
        exclude: Names = (),
        ack: bool = False,
        timeout: float | None = None,
        partial: bool = False,
        idempotency_key: str | None = None,
    ) -> None:
        """A row: send ``data`` to every connection bound to these flags (ServerUtil.send_by_flag)."""
        self._no_ack("send_by_flag", ack)
        self._send("send_by_flag", "flags", names(flags, "flags"), data, exclude, idempotency_key)

    @checked_blocking
    def send_to_group(
        self,
        groups: Names,
        data: object,
        *,
        exclude: Names = (),
        ack: bool = False,
        timeout: float | None = None,
        partial: bool = False,
        idempotency_key: str | None = None,
    ) -> None:
        """A row: send ``data`` to every member of these groups (ServerUtil.send_to_group)."""
        self._no_ack("send_to_group", ack)
        self._send("send_to_group", "groups", names(groups, "groups"), data, exclude, idempotency_key)

    @checked_blocking
    def send_to_all(
        self,
        data: object,
        *,
        exclude: Names = (),
        ack: bool = False,
        timeout: float | None = None,
        partial: bool = False,
        idempotency_key: str | None = None,
    ) -> None:
        """A row: send ``data`` to every connection (ServerUtil.send_to_all)."""
        self._no_ack("send_to_all", ack)
        self._send("send_to_all", "all", (), data, exclude, idempotency_key)

    @checked_blocking
    def send_bulk(self, pairs: Iterable[tuple[str, object]], *, idempotency_key: str | None = None) -> None:
        """A row: a payload per connection, ``(client id, data)`` pairs (ServerUtil.send_bulk)."""
        self._bulk("send_bulk", "client", pairs, idempotency_key)

    @checked_blocking
    def send_bulk_by_flag(
        self, pairs: Iterable[tuple[str, object]], *, idempotency_key: str | None = None
    ) -> None:
        """A row: a payload per flag, ``(flag, data)`` pairs (ServerUtil.send_bulk_by_flag)."""
        self._bulk("send_bulk_by_flag", "flag", pairs, idempotency_key)

    def _bulk(
        self, call: str, kind: str, pairs: Iterable[tuple[str, object]], idempotency_key: str | None
    ) -> None:
        kept = [(name, encode_data(data, self.json_default, self.limit)) for name, data in pairs]
        if kept:
            args: dict[str, Any] = {"pairs": kept}
            if idempotency_key is not None:
                args["idempotency_key"] = idempotency_key
            self._add(call, [f"{kind}:{name}" for name, _ in kept], args)

    # ------------------------------------------------------------------ closes

    @checked_blocking
    def close(
        self,
        client_ids: Names,
        code: int = 1000,
        reason: str = "",
        *,
        data: object = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> None:
        """A row: close these connections (ServerUtil.close), after ``data`` when given."""
        ids = names(client_ids, "client_ids")
        if ids:
            args = {"client_ids": list(ids), "code": code, "reason": reason, "data": self._data(data)}
            self._add("close", [f"client:{c}" for c in ids], {**args, "timeout": timeout})

    @checked_blocking
    def close_by_flag(
        self,
        flags: Names,
        code: int = 1000,
        reason: str = "",
        *,
        data: object = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> None:
        """A row: close every connection bound to these flags (ServerUtil.close_by_flag)."""
        fs = names(flags, "flags")
        if fs:
            args = {"flags": list(fs), "code": code, "reason": reason, "data": self._data(data)}
            self._add("close_by_flag", [f"flag:{f}" for f in fs], {**args, "timeout": timeout})

    @checked_blocking
    def close_guests(
        self,
        older_than: float,
        data: object = None,
        code: int = 1000,
        reason: str = "",
        *,
        timeout: float | None = None,
        partial: bool = False,
    ) -> None:
        """A row: close every guest open longer than ``older_than`` seconds (ServerUtil.close_guests)."""
        args = {"older_than": older_than, "data": self._data(data), "code": code, "reason": reason}
        self._add("close_guests", ["all"], {**args, "timeout": timeout, "partial": partial})

    # ------------------------------------------------------------------ membership

    @checked_blocking
    def join_group(
        self, client_id: str, groups: Names, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        """A row: add the connection to these groups (ServerUtil.join_group)."""
        gs = names(groups, "groups")
        where = [f"client:{client_id}", *(f"group:{g}" for g in gs)]
        self._add("join_group", where, {"client_id": client_id, "groups": list(gs), "timeout": timeout})

    @checked_blocking
    def leave_group(
        self, client_id: str, groups: Names, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        """A row: remove the connection from these groups (ServerUtil.leave_group)."""
        gs = names(groups, "groups")
        where = [f"client:{client_id}", *(f"group:{g}" for g in gs)]
        self._add("leave_group", where, {"client_id": client_id, "groups": list(gs), "timeout": timeout})

    @checked_blocking
    def dissolve_group(self, group: str, *, wait: bool = True, timeout: float | None = None) -> None:
        """A row: every member of ``group`` leaves it (ServerUtil.dissolve_group)."""
        self._add("dissolve_group", [f"group:{group}"], {"group": group, "timeout": timeout})

    @checked_blocking
    def bind(
        self,
        client_id: str,
        flag: str,
        replace: bool = True,
        *,
        wait: bool = True,
        timeout: float | None = None,
    ) -> None:
        """A row: bind the connection to ``flag`` (ServerUtil.bind)."""
        args = {"client_id": client_id, "flag": flag, "replace": replace, "timeout": timeout}
        self._add("bind", [f"client:{client_id}", f"flag:{flag}"], args)

    @checked_blocking
    def unbind(self, client_id: str, *, wait: bool = True, timeout: float | None = None) -> None:
        """A row: remove the connection's flag (ServerUtil.unbind)."""
        self._add("unbind", [f"client:{client_id}"], {"client_id": client_id, "timeout": timeout})

    # ------------------------------------------------------------------ sessions

    @checked_blocking
    def set_session(
        self, client_id: str, data: dict[str, Json], *, wait: bool = True, timeout: float | None = None
    ) -> None:
        """A row: replace the connection's session dict (ServerUtil.set_session)."""
        plain = session_json("set_session", data, self.json_default)
        args = {"client_id": client_id, "data": plain, "timeout": timeout}
        self._add("set_session", [f"client:{client_id}"], args)

    @checked_blocking
    def update_session(
        self, client_id: str, data: dict[str, Json], *, wait: bool = True, timeout: float | None = None
    ) -> None:
        """A row: merge ``data`` into the connection's session (ServerUtil.update_session)."""
        plain = session_json("update_session", data, self.json_default)
        args = {"client_id": client_id, "data": plain, "timeout": timeout}
        self._add("update_session", [f"client:{client_id}"], args)


_PREFIX = {"client_ids": "client", "flags": "flag", "groups": "group"}
