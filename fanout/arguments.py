"""What the arguments of the ServerUtil calls accept: one table, checked before anything is published.

Every argument of every public ServerUtil call is named in :data:`ARGUMENTS` (by its name: a ``flag`` is a
string in every call that takes one), with the few calls where a name means something else in
:data:`BY_CALL`. :func:`checked` wraps each call to look its arguments up here, so SyncServerUtil (which
forwards to ServerUtil), the HTTP API (which calls the node's ServerUtil and describes its bodies from the
schemas below) and the ``fanout`` command (which parses its options through :func:`accepts`) all refuse the
same values with the same :class:`~fanout.exceptions.PayloadError`, naming the call, the argument, the value
and what is accepted::

    send_by_flag: flags must be strings, got int 42

A wrapped call whose parameter is missing from the table fails at import, so no argument goes unchecked.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from .exceptions import PayloadError
from .history import MAX_HISTORY_SIZE, parse_stream
from .idempotency import MAX_KEY_LENGTH
from .protocol import is_sendable_close_code

_S = TypeVar("_S")
_P = ParamSpec("_P")
_R = TypeVar("_R")


class Refused(Exception):
    """Raised by an :attr:`Accepts.take` with the value to name in the message (the list item at fault)."""

    def __init__(self, culprit: object) -> None:
        super().__init__(culprit)
        self.culprit = culprit


@dataclass(frozen=True, slots=True)
class Accepts:
    """What one argument accepts."""

    what: str  #: as the message says it: "<name> must be <what>, got int 42"
    schema: dict[str, Any]  #: the same as a JSON schema (the HTTP API's OpenAPI document)
    take: Callable[[Any], Any]  #: the value as the call uses it; raises Refused if it is not accepted

    def check(self, call: str, name: str, value: Any) -> Any:
        """``value`` as the call uses it. Raises PayloadError naming ``call``, ``name`` and the value."""
        try:
            return self.take(value)
        except Refused as refused:
            culprit = refused.culprit
            raise PayloadError(
                f"{call}: {name} must be {self.what}, got {type(culprit).__name__} {culprit!r:.60}"
            ) from None


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise Refused(value)
    return value


def _strings(value: Any) -> str | tuple[str, ...]:
    """One string, or any iterable of strings (read once, here: a generator is not consumed twice)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview | dict) or not hasattr(value, "__iter__"):
        raise Refused(value)
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise Refused(item)
    return items


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):  # "yes", 1 or None would be taken as true or false: say so instead
        raise Refused(value)
    return value


def _seconds(value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Refused(value)
    if value < 0 or (positive and value == 0):
        raise Refused(value)
    return value


def _timeout(value: Any) -> float | None:
    return None if value is None else _seconds(value, positive=True)


def _older_than(value: Any) -> float:
    return _seconds(value, positive=False)


def _close_code(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not is_sendable_close_code(value):
        raise Refused(value)
    return value


def _reason(value: Any) -> str:
    if not isinstance(value, str):
        raise Refused(value)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise Refused(value) from None
    if size > 123:
        raise Refused(value)
    return value


def _stream(value: Any) -> str:
    if not isinstance(value, str):
        raise Refused(value)
    try:
        parse_stream(value)
    except ValueError:
        raise Refused(value) from None
    return value


def _offset(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Refused(value)
    return value


def _limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_HISTORY_SIZE:
        raise Refused(value)
    return value


def _idempotency_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY_LENGTH:
        raise Refused(value)
    return value


def _anything(value: Any) -> Any:
    return value  # a payload: encoded (and refused if it cannot be) by the call itself


def _session(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Refused(value)
    for key in value:
        if not isinstance(key, str):
            raise Refused(key)
    return value


def _pairs(value: Any) -> list[tuple[str, Any]]:
    """An iterable of (name, data) pairs, read once into a list."""
    if isinstance(value, str | bytes | bytearray | memoryview | dict) or not hasattr(value, "__iter__"):
        raise Refused(value)
    pairs = []
    for pair in value:
        if not isinstance(pair, tuple | list) or len(pair) != 2 or not isinstance(pair[0], str):
            raise Refused(pair)
        pairs.append((pair[0], pair[1]))
    return pairs


_NAMES_SCHEMA = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
STRING = Accepts("a string", {"type": "string"}, _string)
STRINGS = Accepts("strings", _NAMES_SCHEMA, _strings)
BOOL = Accepts("a bool (true or false)", {"type": "boolean"}, _bool)

#: ServerUtil's command calls (sends, closes, membership, sessions): what the outbox takes as rows and the
#: HTTP API serves besides the queries
COMMAND_CALLS = (
    "send",
    "send_by_flag",
    "send_to_group",
    "send_to_all",
    "send_bulk",
    "send_bulk_by_flag",
    "close",
    "close_by_flag",
    "close_guests",
    "join_group",
    "leave_group",
    "dissolve_group",
    "bind",
    "unbind",
    "set_session",
    "update_session",
)

#: what each argument of the ServerUtil calls accepts, by its name
ARGUMENTS: dict[str, Accepts] = {
    "client_id": STRING,
    "flag": STRING,
    "group": STRING,
    "client_ids": STRINGS,
    "flags": STRINGS,
    "groups": STRINGS,
    "exclude": STRINGS,
    "data": Accepts(
        "a str (text frame), bytes (binary frame) or a JSON-serialisable value",
        {"description": "a string is sent as a text frame, anything else as JSON text"},
        _anything,
    ),
    "pairs": Accepts(
        "(name, data) pairs, the name a string",
        {
            "type": "array",
            "description": "[name, data] pairs, or {name, data} / {name, data_b64} objects",
            "items": {"oneOf": [{"type": "array"}, {"type": "object"}]},
        },
        _pairs,
    ),
    "code": Accepts(
        "a close code a server may send (1000-1003, 1007-1014, 3000-4999)", {"type": "integer"}, _close_code
    ),
    "reason": Accepts("a string of at most 123 bytes in UTF-8", {"type": "string"}, _reason),
    "older_than": Accepts("a number of seconds >= 0", {"type": "number", "minimum": 0}, _older_than),
    "timeout": Accepts(
        "a number of seconds > 0",
        {"type": "number", "exclusiveMinimum": 0, "nullable": True},
        _timeout,
    ),
    "stream": Accepts(
        "a stream name: group:<name>, flag:<name> or all",
        {"type": "string", "description": "group:<name>, flag:<name> or all"},
        _stream,
    ),
    "since": Accepts(
        "an offset (an integer >= 0) or None",
        {"type": "integer", "minimum": 0, "nullable": True},
        _offset,
    ),
    "limit": Accepts(
        f"an integer from 0 to {MAX_HISTORY_SIZE}",
        {"type": "integer", "minimum": 0, "maximum": MAX_HISTORY_SIZE},
        _limit,
    ),
    "idempotency_key": Accepts(
        f"a string of 1 to {MAX_KEY_LENGTH} characters, or None",
        {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_KEY_LENGTH,
            "nullable": True,
            "description": "the same key within FANOUT_IDEMPOTENCY_WINDOW reaches each connection once",
        },
        _idempotency_key,
    ),
    "ack": BOOL,
    "wait": BOOL,
    "replace": BOOL,
    "partial": BOOL,
}

_SESSION = Accepts("a dict with string keys", {"type": "object"}, _session)
#: the calls where an argument's name means something else than in :data:`ARGUMENTS`
BY_CALL: dict[tuple[str, str], Accepts] = {
    ("set_session", "data"): _SESSION,
    ("update_session", "data"): _SESSION,
}


def accepts(call: str, name: str) -> Accepts:
    """What argument ``name`` of ``call`` accepts. Raises KeyError for an argument the table lacks."""
    return BY_CALL.get((call, name)) or ARGUMENTS[name]


def _checker(method: Callable[..., Any]) -> Callable[[tuple[Any, ...], dict[str, Any]], tuple[Any, ...]]:
    """What :func:`checked` and :func:`checked_blocking` run before the call: each argument checked against
    the table and taken as :attr:`Accepts.take` returns it (``kwargs`` updated in place), the positional
    ones returned. Fails at import for a parameter the table lacks."""
    call = method.__name__
    parameters = list(inspect.signature(method).parameters)[1:]  # without self
    positional = [(name, accepts(call, name)) for name in parameters]
    by_name = dict(positional)

    def check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        taken = [rule.check(call, name, value) for (name, rule), value in zip(positional, args, strict=False)]
        for name, value in kwargs.items():
            rule = by_name.get(name)
            if rule is not None:
                kwargs[name] = rule.check(call, name, value)
        return (*taken, *args[len(taken) :])

    return check


def checked(
    method: Callable[Concatenate[_S, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[_S, _P], Coroutine[Any, Any, _R]]:
    """Wrap a ServerUtil call so that each argument is checked against the table (and taken as
    :attr:`Accepts.take` returns it) before the call runs. Unknown keyword arguments are left to the call."""
    check = _checker(method)

    @functools.wraps(method)
    async def checking(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return await method(self, *check(args, kwargs), **kwargs)

    return checking


def checked_blocking(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """:func:`checked` for a plain (blocking) method of the same name and parameters as a ServerUtil call
    (:class:`fanout.outbox.Outbox`'s): the same table, the same errors."""
    check = _checker(method)

    @functools.wraps(method)
    def checking(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return method(self, *check(args, kwargs), **kwargs)

    return checking
