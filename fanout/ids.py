"""Identities: node instances and client ids.

A node *instance* is ``<node_id>.<boot>``: the configured (or generated) node id, which is a stable
name for logs and metrics, plus a token drawn at every start. A client id is ``<instance>.<seq>``, so:

* it names its owning node instance: a command for client ids goes only to that node's address;
* it is never reused, even when a node restarts under the same node id (new boot token).

``boot`` and ``seq`` are lower-case base-36 and contain no ``.``, so the owner is everything before the
last ``.``, however many dots the node id has.
"""

from __future__ import annotations

import os
import time
from itertools import count

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def base36(number: int) -> str:
    if number == 0:
        return "0"
    out = []
    while number:
        number, rest = divmod(number, 36)
        out.append(_DIGITS[rest])
    return "".join(reversed(out))


def new_boot_token() -> str:
    """A token unique per start: milliseconds since the epoch and 40 random bits."""
    return base36(int(time.time() * 1000)) + base36(int.from_bytes(os.urandom(5), "big")).rjust(8, "0")


def instance_id(node_id: str, boot: str | None = None) -> str:
    return f"{node_id}.{boot or new_boot_token()}"


class ClientIds:
    """Hands out the client ids of one node instance."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._seq = count(1)

    def next(self) -> str:
        return f"{self.instance}.{base36(next(self._seq))}"


def owner_of(client_id: str) -> str | None:
    """The node instance that owns ``client_id``, or ``None`` if it is not a well-formed client id."""
    instance, _, seq = client_id.rpartition(".")
    node_id, _, boot = instance.rpartition(".")
    if not node_id or not _token(boot) or not _token(seq):
        return None
    return instance


def _token(part: str) -> bool:
    """Is ``part`` a non-empty run of ASCII letters and digits (a boot token or sequence number)?"""
    return part.isascii() and part.isalnum()
