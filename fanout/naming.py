"""Targets -> bus addresses -> channel names (Redis) and routing keys (AMQP).

An :class:`Address` is the logical place a command is published to. Backends render it:

* Redis channel:   ``<namespace>:<kind>:<name>``   e.g. ``fanout:g:lobby``, ``fanout:all``
* AMQP routing key: ``<kind>.<name>``               e.g. ``g.lobby``, ``all`` (exchange = namespace)

Names made of letters, digits, ``_``, ``-`` and ``.`` (at most 64 characters) appear as-is. Any other
name is percent-escaped (``room 1`` -> ``room%201``; every byte of its UTF-8 but letters, digits, ``_``,
``-`` and ``.`` becomes ``%XX``, ``~`` included) when that stays within 96 characters, else it is
replaced by ``~`` + 40 hex digits of its SHA-256. ``%`` and ``~`` never occur in a plain name, and ``~``
never in an escaped one, so a plain, an escaped and a hashed name can never be equal (an escaped name is
empty, longer than 64 characters or contains ``%``); escaping is injective; and the kind is its own
segment, so a group and a flag of the same name never share a channel. Even a SHA-256 collision could
not misdeliver: every command carries its targets' full names, and a node resolves those exactly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import quote

_PLAIN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_ESCAPED = 96


class Kind(StrEnum):
    ALL = "all"  #: every node (broadcasts; in fanout mode, everything)
    NODE = "n"  #: one node instance: commands for its client ids
    GROUP = "g"  #: nodes with a member of the group
    FLAG = "f"  #: nodes with a connection bound to the flag
    HEARTBEAT = "hb"  #: node announcements, heard by ServerUtils
    INBOX = "i"  #: one ServerUtil (or node): replies to its requests
    WORKERS = "w"  #: business worker announcements, heard by the workers (who owns which shard)
    PRESENCE = "p"  #: nodes' presence contributions, heard by the nodes with presence on


@dataclass(frozen=True, slots=True)
class Address:
    kind: Kind
    name: str = ""

    def key(self) -> str:
        """The routing key / channel suffix: ``kind`` or ``kind.name`` with the name made safe."""
        if self.kind in _NAMELESS:
            return self.kind.value
        return f"{self.kind.value}.{safe_segment(self.name)}"

    def channel(self, namespace: str) -> str:
        """The Redis channel name of this address."""
        if self.kind in _NAMELESS:
            return f"{namespace}:{self.kind.value}"
        return f"{namespace}:{self.kind.value}:{safe_segment(self.name)}"


_NAMELESS = frozenset({Kind.ALL, Kind.HEARTBEAT, Kind.WORKERS, Kind.PRESENCE})

ALL = Address(Kind.ALL)
HEARTBEAT = Address(Kind.HEARTBEAT)
WORKERS = Address(Kind.WORKERS)
PRESENCE = Address(Kind.PRESENCE)


def safe_segment(name: str) -> str:
    """``name`` as it may appear in a channel or routing key (see the module docstring)."""
    if _PLAIN.fullmatch(name):
        return name
    # quote() leaves "~" alone; escape it too, or the name "~<40 hex>" would equal a hashed name
    escaped = quote(name, safe="", errors="surrogatepass").replace("~", "%7E")
    if len(escaped) <= _MAX_ESCAPED:
        return escaped
    return "~" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def group(name: str) -> Address:
    return Address(Kind.GROUP, name)


def flag(name: str) -> Address:
    return Address(Kind.FLAG, name)


def node(instance: str) -> Address:
    return Address(Kind.NODE, instance)


def inbox(endpoint: str) -> Address:
    return Address(Kind.INBOX, endpoint)
