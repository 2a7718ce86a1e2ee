"""Admission before the upgrade: what an application's ``on_connect(request)`` sees and answers. Pure.

::

    from fanout import Admit, Reject, tokens

    class Events:
        async def on_connect(self, request):
            try:
                claims = tokens.verify(KEY, request.query.get("token", ""))
            except tokens.InvalidToken as exc:
                raise Reject(401, str(exc)) from None
            return Admit(flag=claims["sub"], groups=["lobby"], session={"name": claims.get("name")})

``on_connect`` runs before the websocket handshake completes: a :class:`Reject` answers with its HTTP
status and no upgrade; an :class:`Admit` is applied (flag bound, groups joined, session set) before the
client gets its welcome frame and before ``on_open``; ``None`` accepts the client as a guest. Any other
exception refuses the handshake with 500 (fail closed).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

from .exceptions import FanoutError


class Headers(Mapping[str, str]):
    """HTTP request headers, read-only and case-insensitive (``headers["origin"]``, ``get_all``).

    Kept as the one tuple of (name, value) pairs the request had, looked up by a scan: a connection
    keeps its request for its whole life, and a dozen headers are scanned faster than a dict is built.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items = tuple((name, value) for name, value in items)

    def __getitem__(self, name: str) -> str:
        key = name.lower()
        for n, value in self._items:
            if n.lower() == key:
                return value
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = name.lower()
        return any(n.lower() == key for n, _ in self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(n.lower() for n, _ in self._items))

    def __len__(self) -> int:
        return len({n.lower() for n, _ in self._items})

    def get_all(self, name: str) -> list[str]:
        """Every value of a header that may repeat."""
        key = name.lower()
        return [value for n, value in self._items if n.lower() == key]

    def raw_items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({list(self._items)!r})"


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """The HTTP request of a websocket handshake, as ``on_connect`` and ``conn.request`` see it."""

    path: str  #: the path without the query string, e.g. ``/``
    query: dict[str, str] = field(default_factory=dict)  #: query parameters (the first of repeated ones)
    headers: Headers = field(default_factory=Headers)
    cookies: dict[str, str] = field(default_factory=dict)
    remote: str = ""  #: the peer's IP address (behind a proxy: see ``headers["X-Forwarded-For"]``)

    @classmethod
    def from_http(cls, target: str, headers: Iterable[tuple[str, str]], remote: str) -> ConnectRequest:
        """Parse a request target (``/path?query``) and its raw headers."""
        path, _, query_string = target.partition("?")
        query: dict[str, str] = {}
        for key, value in parse_qsl(query_string, keep_blank_values=True):
            query.setdefault(key, value)
        parsed = Headers(headers)
        cookies: dict[str, str] = {}
        for header in parsed.get_all("Cookie"):
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(header)
            except CookieError:
                continue  # a malformed cookie header is the client's problem, not a reason to fail
            for name, morsel in jar.items():
                cookies.setdefault(name, morsel.value)
        return cls(path or "/", query, parsed, cookies, remote)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able copy (headers as ``[[name, value], ...]``)."""
        return {
            "path": self.path,
            "query": dict(self.query),
            "headers": [list(item) for item in self.headers.raw_items()],
            "cookies": dict(self.cookies),
            "remote": self.remote,
        }


@dataclass(frozen=True, slots=True)
class Admit:
    """Accept the client with an identity, applied before its welcome frame and ``on_open``."""

    flag: str | None = None  #: bind the connection to this flag (the user id)
    groups: Sequence[str] = ()  #: join these groups
    session: dict[str, Any] | None = None  #: the connection's initial session

    def __post_init__(self) -> None:
        if self.flag is not None and not isinstance(self.flag, str):
            raise TypeError(f"Admit flag must be a string, got {type(self.flag).__name__}")
        if isinstance(self.groups, str):
            object.__setattr__(self, "groups", (self.groups,))
        if not all(isinstance(group, str) for group in self.groups):
            raise TypeError("Admit groups must be strings")
        if self.session is not None and not isinstance(self.session, dict):
            raise TypeError(f"Admit session must be a dict, got {type(self.session).__name__}")


class Reject(FanoutError):
    """Raised by ``on_connect`` to refuse the handshake with an HTTP status (401, 403, 429, ...)."""

    def __init__(self, status: int = 403, reason: str = "forbidden") -> None:
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"Reject status must be an HTTP error status (400-599), got {status!r}")
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


def origin_allowed(origin: str | None, allowed: frozenset[str] | None) -> bool:
    """Whether a browser ``Origin`` may connect: ``allowed`` None means any; no Origin header (not a
    browser) is always allowed."""
    if allowed is None or origin is None:
        return True
    return origin in allowed


__all__ = ["Admit", "ConnectRequest", "Headers", "Reject", "origin_allowed"]
