"""``manage.py fanout_relay``: ``fanout relay`` on Django's database (DATABASES[--database])."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from django.conf import settings as django_settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

#: DATABASES OPTIONS that are Django's, not libpq's
_DJANGO_ONLY = {"isolation_level", "server_side_binding", "assume_role", "pool", "cursor_factory", "context"}


def conninfo(alias: str = "default") -> str:
    """A libpq connection string for ``DATABASES[alias]`` (NAME, USER, PASSWORD, HOST, PORT, OPTIONS)."""
    from psycopg.conninfo import make_conninfo

    db = connections[alias].settings_dict
    if connections[alias].vendor != "postgresql":
        raise CommandError(f"the outbox needs PostgreSQL; database {alias!r} is {connections[alias].vendor}")
    params: dict[str, Any] = {
        "dbname": db.get("NAME") or None,
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "host": db.get("HOST") or None,
        "port": str(db.get("PORT") or "") or None,
    }
    for key, value in (db.get("OPTIONS") or {}).items():
        if key not in _DJANGO_ONLY and isinstance(value, str | int):
            params[key] = value
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


def fanout_environ() -> dict[str, str]:
    """The FANOUT_* environment, with the project's settings of the same names (strings) over it."""
    environ = dict(os.environ)
    for name in dir(django_settings):
        value = getattr(django_settings, name, None)
        if name.startswith("FANOUT_") and isinstance(value, str):
            environ[name] = value
    return environ


class Command(BaseCommand):
    help = (
        "Publish the committed rows of the outbox (fanout.django.outbox) to the fanout nodes, in commit "
        "order per target; run as many as you like. SIGTERM finishes the batch in hand."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--database", default="default", help="the DATABASES alias (default)")
        parser.add_argument("--http", metavar="HOST:PORT", help="serve /healthz and /metrics here")
        parser.add_argument("--batch", type=int, default=500, help="rows published before deleting them")
        parser.add_argument("--poll", type=float, default=1.0, help="seconds between looks without NOTIFY")

    def handle(self, *args: Any, **options: Any) -> None:
        from fanout.config import Settings
        from fanout.exceptions import ConfigError
        from fanout.outbox import DEFAULT_TABLE
        from fanout.relay import RelayOptions, serve

        environ = fanout_environ()
        logging.basicConfig(
            level=environ.get("FANOUT_LOG_LEVEL", "INFO").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        where = None
        if options["http"]:
            host, _, port = options["http"].rpartition(":")
            if not port.isdigit():
                raise CommandError(f"--http {options['http']!r} is not HOST:PORT")
            where = (host or "127.0.0.1", int(port))
        try:
            fanout_settings = Settings.from_env(environ)
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        relay = RelayOptions(
            conninfo(options["database"]),
            DEFAULT_TABLE,
            batch=options["batch"],
            poll=options["poll"],
            http=where,
        )
        asyncio.run(serve(relay, fanout_settings))
