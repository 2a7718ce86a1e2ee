"""The HTTP API: every ServerUtil call as ``POST /api/<call>``, for publishers in any language.

On when ``FANOUT_API_KEY`` is set (404 otherwise). A request is ``POST /api/<call>`` with
``Authorization: Bearer <key>`` and a JSON object of the call's arguments (``data`` as JSON; ``data_b64``
instead for binary data), answered ``{"result": ...}`` (``get_history``'s binary entries: ``data_b64``).
``POST /api/batch`` takes a list of ``{"call": ..., "args": {...}}`` and answers ``{"result": [...]}``,
one entry per call in order, each ``{"result": ...}`` or ``{"error": {...}, "status": n}``. A send's
``idempotency_key`` may come as the ``Idempotency-Key`` header instead (both, differing: 400). Statuses:
401 wrong or missing key, 400 bad arguments, 404 unknown call, 413 body over ``FANOUT_API_MAX_BODY``,
504 ``QueryTimeout``, 503 ``BackendUnavailable`` / ``NoLiveNodes``, 502 another ``BackendError``, 500
anything else. The OpenAPI description is ``GET /api/openapi.json``.

The requests are read by :class:`~node.http.HttpConnection` (websockets' request parser refuses
bodies) and answered here, with the node's own ServerUtil.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hmac
import inspect
from typing import TYPE_CHECKING, Any

import orjson

from fanout import history_api
from fanout.arguments import COMMAND_CALLS, accepts
from fanout.exceptions import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    FanoutError,
    NoLiveNodes,
    NotConnected,
    PayloadError,
    QueryTimeout,
)

if TYPE_CHECKING:
    from fanout.serverutil import ServerUtil

#: the one argument the API has that ServerUtil has not (the rest: fanout.arguments.ARGUMENTS)
DATA_B64 = {"type": "string", "description": "instead of data: base64 of a binary frame"}

#: the calls the API serves: every public ServerUtil operation
CALLS = (
    *COMMAND_CALLS,
    "get_session",
    "exists",
    "flag_exists",
    "get_flag",
    "get_client_ids_by_flag",
    "get_client_ids_by_flags",
    "get_connection_count",
    "get_group_count",
    "get_group_client_ids",
    "get_groups",
    "get_group_flags",
    "get_group_flag_count",
    "get_flags",
    "get_flag_count",
    "get_group_sessions",
    "is_in_group",
    "get_presence",
    "get_nodes",
    "get_history",
    "remove_history",
)

#: status of each FanoutError (the most specific class first)
_STATUS: tuple[tuple[type[FanoutError], int], ...] = (
    (QueryTimeout, 504),
    (NoLiveNodes, 503),
    (BackendUnavailable, 503),
    (NotConnected, 503),
    (BackendError, 502),
    (PayloadError, 400),
    (ConfigError, 500),
)


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.kind, "message": self.message}}


class Api:
    """Answers API requests for one node (``key`` None: the API is off)."""

    def __init__(self, util: ServerUtil, key: str | None) -> None:
        self.util = util
        self.key = key

    def authorized(self, authorization: str | None) -> bool:
        if self.key is None or not authorization or not authorization.startswith("Bearer "):
            return False
        return hmac.compare_digest(authorization[7:].strip().encode(), self.key.encode())

    async def handle(
        self, path: str, authorization: str | None, body: bytes, idempotency_key: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """``(status, JSON answer)`` for ``POST path`` (``idempotency_key``: its Idempotency-Key header)."""
        try:
            if self.key is None or not path.startswith("/api/"):
                raise ApiError(404, "NotFound", "no such endpoint (is FANOUT_API_KEY set?)")
            if not self.authorized(authorization):
                raise ApiError(
                    401, "Unauthorized", "a valid 'Authorization: Bearer <FANOUT_API_KEY>' is required"
                )
            name = path[5:].split("?", 1)[0]
            try:
                args = orjson.loads(body) if body.strip() else {}
            except orjson.JSONDecodeError as exc:
                raise ApiError(400, "BadRequest", f"the body is not JSON: {exc}") from None
            if idempotency_key is not None:
                args = _with_key(name, args, idempotency_key)
            if name == "batch":
                return 200, {"result": await self._batch(args)}
            return 200, {"result": await self.call(name, args)}
        except ApiError as exc:
            return exc.status, exc.body()

    async def _batch(self, calls: Any) -> list[dict[str, Any]]:
        if not isinstance(calls, list):
            raise ApiError(400, "BadRequest", 'a batch is a JSON list of {"call": ..., "args": {...}}')
        out: list[dict[str, Any]] = []
        for item in calls:
            try:
                if not isinstance(item, dict) or not isinstance(item.get("call"), str):
                    raise ApiError(400, "BadRequest", 'each batch entry is {"call": ..., "args": {...}}')
                out.append({"result": await self.call(item["call"], item.get("args", {}))})
            except ApiError as exc:
                out.append({**exc.body(), "status": exc.status})
        return out

    async def call(self, name: str, args: Any) -> Any:
        if name not in CALLS:
            raise ApiError(404, "NotFound", f"no call named {name!r}")
        if not isinstance(args, dict):
            raise ApiError(400, "BadRequest", "the arguments are a JSON object")
        args = _decode(dict(args))
        method = getattr(self.util, name)
        signature = inspect.signature(method)
        _check_fields(name, args, signature)
        try:
            bound = signature.bind(**args)
        except TypeError as exc:
            raise ApiError(400, "BadRequest", f"{name}: {exc}") from None
        try:
            result = await method(*bound.args, **bound.kwargs)
        except FanoutError as exc:
            status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)
            raise ApiError(status, type(exc).__name__, str(exc)) from None
        except (TypeError, ValueError) as exc:  # an argument of the wrong type
            raise ApiError(400, "BadRequest", f"{name}: {exc}") from None
        return history_api.as_json(result) if name == "get_history" else result


def _with_key(call: str, args: Any, key: str) -> Any:
    """The call's arguments with the ``Idempotency-Key`` header's key as its ``idempotency_key``."""
    if call == "batch" or not isinstance(args, dict):
        raise ApiError(
            400, "BadRequest", "the Idempotency-Key header is for one call's JSON object of arguments"
        )
    if args.get("idempotency_key", key) != key:
        message = f"the Idempotency-Key header ({key!r:.140}) and the body's idempotency_key differ"
        raise ApiError(400, "BadRequest", message)
    return {**args, "idempotency_key": key}


def _check_fields(call: str, args: dict[str, Any], signature: inspect.Signature) -> None:
    """Name a field the call does not take (with the likely one it was meant to be), then a missing one."""
    fields = list(signature.parameters)
    for given in args:
        if given not in signature.parameters:
            close = difflib.get_close_matches(given, fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"{call} takes {', '.join(fields) or 'none'}"
            raise ApiError(400, "BadRequest", f"{call}: unknown field {given!r}; {hint}")
    for field, parameter in signature.parameters.items():
        if parameter.default is inspect.Parameter.empty and field not in args:
            raise ApiError(
                400, "BadRequest", f"{call}: missing field {field!r} ({accepts(call, field).what})"
            )


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ApiError(400, "BadRequest", "data_b64 must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "BadRequest", "data_b64 is not valid base64") from None


def _decode(args: dict[str, Any]) -> dict[str, Any]:
    """``data_b64`` -> bytes ``data``; bulk pairs as tuples."""
    if "data_b64" in args:
        if "data" in args:
            raise ApiError(400, "BadRequest", "give data or data_b64, not both")
        args["data"] = _b64(args.pop("data_b64"))
    if "pairs" in args:
        pairs = args["pairs"]
        if not isinstance(pairs, list):
            raise ApiError(400, "BadRequest", "pairs must be a list")
        decoded = []
        for pair in pairs:
            if isinstance(pair, list) and len(pair) == 2:
                decoded.append((pair[0], pair[1]))
            elif isinstance(pair, dict) and "name" in pair and ("data" in pair) != ("data_b64" in pair):
                decoded.append((pair["name"], _b64(pair["data_b64"]) if "data_b64" in pair else pair["data"]))
            else:
                raise ApiError(
                    400, "BadRequest", f"bad pair {pair!r:.80}: [name, data] or {{name, data(_b64)}}"
                )
        args["pairs"] = decoded
    return args


def openapi(node_id: str) -> dict[str, Any]:
    """The OpenAPI 3 description of the API, built from the calls' signatures."""
    from fanout.serverutil import ServerUtil

    paths: dict[str, Any] = {}
    errors = {
        str(status): {
            "description": what,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status, what in (
            (400, "bad arguments"),
            (401, "wrong or missing key"),
            (404, "unknown call, or the API is off"),
            (413, "body over FANOUT_API_MAX_BODY"),
            (502, "the broker refused"),
            (503, "the broker is unreachable, or no node is alive in the namespace"),
            (504, "live nodes did not answer in time"),
        )
    }
    for name in CALLS:
        method = getattr(ServerUtil, name)
        properties: dict[str, Any] = {}
        required: list[str] = []
        for parameter in list(inspect.signature(method).parameters.values())[1:]:
            properties[parameter.name] = dict(accepts(name, parameter.name).schema)
            if parameter.default is inspect.Parameter.empty:
                required.append(parameter.name)
            if parameter.name == "data" and name not in ("set_session", "update_session"):
                properties["data_b64"] = DATA_B64
        body: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        if required:
            body["required"] = required
        paths[f"/api/{name}"] = {
            "post": {
                "operationId": name,
                "summary": (inspect.getdoc(method) or "").split("\n")[0],
                "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                "responses": {
                    "200": {
                        "description": "done",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Result"}}},
                    },
                    **errors,
                },
            }
        }
    paths["/api/batch"] = {
        "post": {
            "operationId": "batch",
            "summary": "Several calls in one request, answered in order.",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "call": {"type": "string", "enum": list(CALLS)},
                                    "args": {"type": "object"},
                                },
                                "required": ["call"],
                            },
                        }
                    }
                },
            },
            "responses": {"200": {"description": "one entry per call, in order"}, **errors},
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "fanout HTTP API", "version": "1", "description": f"Served by node {node_id}."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Result": {"type": "object", "properties": {"result": {}}},
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                        }
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
