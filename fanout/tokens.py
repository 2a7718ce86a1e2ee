"""Signed connection tokens: a web app issues one, the node's ``on_connect`` checks it. Pure.

A token is a standard JSON Web Token signed with HMAC-SHA256 (``alg`` ``HS256``), so any JWT library
can issue or check one (PyJWT, firebase/php-jwt, jsonwebtoken, ...)::

    # the web app (Django view, Laravel controller, ...), after its own login
    token = tokens.issue(KEY, "user-42", ttl=3600, claims={"name": "Ann"})

    # the node application
    claims = tokens.verify(KEY, request.query["token"])   # raises InvalidToken
    flag = claims["sub"]

``sub`` is the user (the flag the connection will be bound to), ``exp`` the expiry (Unix seconds, always
set and always checked), ``iat`` when it was issued. Keep ``KEY`` secret and shared between the web app
and the nodes only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

import orjson

from .exceptions import FanoutError

_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")


class InvalidToken(FanoutError, ValueError):
    """The token is malformed, forged, expired or not yet valid; the message says which."""


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (ValueError, TypeError) as exc:
        raise InvalidToken("token is not base64url") from exc


def _key(key: str | bytes) -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    if not raw:
        raise ValueError("token key must not be empty")
    return raw


def issue(
    key: str | bytes,
    subject: str,
    *,
    ttl: float = 3600,
    claims: dict[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """A token for ``subject`` valid for ``ttl`` seconds, carrying extra ``claims``."""
    issued = int(time.time() if now is None else now)
    body = {**(claims or {}), "sub": subject, "iat": issued, "exp": issued + int(ttl)}
    signing_input = _HEADER + b"." + _b64(orjson.dumps(body))
    signature = hmac.new(_key(key), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64(signature)).decode()


def verify(key: str | bytes, token: str, *, now: float | None = None, leeway: float = 0) -> dict[str, Any]:
    """The claims of a valid token; raises :class:`InvalidToken` otherwise."""
    if not isinstance(token, str) or token.count(".") != 2:
        raise InvalidToken("not a token (expected three dot-separated parts)")
    head, body, signature = token.split(".")
    expected = hmac.new(_key(key), f"{head}.{body}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _unb64(signature)):
        raise InvalidToken("bad token signature")
    try:
        header = orjson.loads(_unb64(head))
        claims = orjson.loads(_unb64(body))
    except orjson.JSONDecodeError as exc:
        raise InvalidToken("token is not JSON") from exc
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise InvalidToken("token is not HS256")
    if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
        raise InvalidToken("token has no subject")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise InvalidToken("token has no expiry")
    moment = time.time() if now is None else now
    if moment > exp + leeway:
        raise InvalidToken("token expired")
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and moment + leeway < nbf:
        raise InvalidToken("token not valid yet")
    return claims


__all__ = ["InvalidToken", "issue", "verify"]
