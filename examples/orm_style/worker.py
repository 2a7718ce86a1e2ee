"""A Django-style worker: plain functions, blocking database calls, replies through a blocking util.

Handlers written as plain ``def`` run in the worker's thread pool (``--concurrency`` threads), so code
that blocks - an ORM query, an HTTP call to another service - does not stop the worker; ``event.util``
is then a blocking :class:`fanout.SyncServerUtil` that shares the worker's link. Here the "ORM" is
sqlite3 with one connection per thread (as Django keeps one per thread), and ``event_id`` makes the
insert idempotent: a redelivered event is not saved twice.

Run it::

    ORM_STYLE_DB=/tmp/messages.sqlite3 FANOUT_URL=redis://127.0.0.1:6379/0 \\
        fanout worker --app examples.orm_style.worker:Messages
"""

import os
import sqlite3
import threading

from fanout.events import Event

_local = threading.local()


def db() -> sqlite3.Connection:
    """This thread's connection (created on first use, like Django's per-thread connections)."""
    connection = getattr(_local, "connection", None)
    if connection is None:
        connection = sqlite3.connect(os.environ.get("ORM_STYLE_DB", "messages.sqlite3"), timeout=30)
        connection.execute(
            "create table if not exists message (event_id text primary key, user text, text text)"
        )
        _local.connection = connection
    return connection


class Messages:
    def on_message(self, event: Event) -> None:  # a plain def: it runs in a thread
        text = event.data if isinstance(event.data, str) else ""
        with db() as connection:  # one transaction; "or ignore": a redelivered event is saved once
            connection.execute(
                "insert or ignore into message (event_id, user, text) values (?, ?, ?)",
                (event.event_id, event.flag or event.client_id, text),
            )
        (count,) = (
            db()
            .execute("select count(*) from message where user = ?", (event.flag or event.client_id,))
            .fetchone()
        )
        event.util.send(event.client_id, {"saved": text, "count": count})  # blocking call, same link
