"""fanout's Django app: the outbox on Django's database connection.

Add ``"fanout.django"`` to ``INSTALLED_APPS`` and run ``manage.py migrate`` (it creates the outbox table,
``fanout_outbox``, with the same SQL as ``fanout outbox init``; PostgreSQL only). Then, in a view or a task::

    from django.db import transaction
    from fanout.django import outbox

    with transaction.atomic():
        order.save()
        outbox.send_by_flag(order.user_id, {"type": "order", "id": order.id})

``outbox`` is a :class:`fanout.Outbox` on ``django.db.connection`` (the default database, this thread's
connection): its rows are part of whatever transaction is open on it, so ``transaction.atomic()`` covers
them and a rollback takes them back. ``manage.py fanout_relay`` runs a relay on the same database
(``fanout relay`` with Django's database settings). ``fanout.django.outbox_for(alias)`` gives the outbox of
another database of ``DATABASES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fanout.outbox import Outbox

__all__ = ["outbox", "outbox_for"]

_made: dict[str, Outbox] = {}


def outbox_for(alias: str = "default") -> Outbox:
    """The :class:`fanout.Outbox` of database ``alias`` (``DATABASES``), one per alias."""
    if alias not in _made:
        from django.db import connections

        from fanout.outbox import DEFAULT_TABLE, Outbox

        _made[alias] = Outbox(_Proxy(connections, alias), table=DEFAULT_TABLE)
    return _made[alias]


class _Proxy:
    """The current thread's connection of ``alias`` (Django's connections are per thread)."""

    def __init__(self, connections: Any, alias: str) -> None:
        self._connections = connections
        self._alias = alias

    def cursor(self) -> Any:
        return self._connections[self._alias].cursor()


def __getattr__(name: str) -> Any:
    """``from fanout.django import outbox``: made on first use (after Django is set up)."""
    if name == "outbox":
        return outbox_for("default")
    raise AttributeError(f"module 'fanout.django' has no attribute {name!r}")
