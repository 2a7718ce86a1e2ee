"""A node's replies to requests (queries, ``ack=True`` sends, membership calls): paged and encoded.

A large answer goes in several replies (:func:`pages`) so that none approaches the broker's or
FANOUT_MAX_MESSAGE's limit (the publisher puts them back together); an answer that cannot travel at all
(too deep, too big) becomes an error reply saying why (:func:`encode_reply`). No I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from fanout.commands import Command, Json, Reply
from fanout.commands import Request as BusRequest
from fanout.exceptions import FanoutError, MessageTooLarge

#: most items (list entries, object keys) in one reply: a bigger answer goes in several (see pages)
REPLY_PAGE = 5000


def pages(result: Json) -> list[Json]:
    """A large list or object answer cut into pages of REPLY_PAGE items."""
    if isinstance(result, list) and len(result) > REPLY_PAGE:
        return [result[i : i + REPLY_PAGE] for i in range(0, len(result), REPLY_PAGE)]
    if isinstance(result, dict) and len(result) > REPLY_PAGE:
        items = list(result.items())
        return [dict(items[i : i + REPLY_PAGE]) for i in range(0, len(items), REPLY_PAGE)]
    return [result]


def encode_reply(
    encode: Callable[[Command], bytes],
    instance: str,
    max_message: int,
    request: BusRequest,
    result: Json,
    error: FanoutError | None,
    part: int = 0,
    parts: int = 1,
) -> bytes:
    """The reply, or, if the answer cannot travel (too deep, too big), an error saying why."""
    if error is None:
        try:
            message = encode(Reply(request.id, instance, result, None, part, parts))
        except FanoutError as exc:
            error = exc
        else:
            if len(message) <= max_message:
                return message
            error = MessageTooLarge(
                f"the answer is {len(message)} bytes, more than FANOUT_MAX_MESSAGE ({max_message})"
            )
    detail = (type(error).__name__, str(error))
    return encode(Reply(request.id, instance, None, detail))
