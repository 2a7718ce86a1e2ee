"""The node's HTTP endpoints, and the gate every websocket handshake passes before the upgrade.

Endpoints: ``GET /healthz`` (200 while the backend subscription is live, else 503), ``GET /metrics``
(Prometheus text), ``GET /`` (a short status page; the demo chat's page when the application declares
it in its routes, as the demo does), ``GET /fanout.js`` (the JS client, ``node/static/fanout.js``,
with an ``ETag``: ``If-None-Match`` gets 304), and the small GET endpoints an application declares in
``http_routes`` (``{path: async callable(request) -> (status, content type, body)}``). ``HEAD`` gets the
same status and headers with no body; other methods get 405.

The gate, in order: the browser ``Origin`` (``FANOUT_ALLOWED_ORIGINS``, else 403), the connection limit
(``FANOUT_MAX_CONNECTIONS``, else 503), the accept rate (``FANOUT_ACCEPT_RATE``, else 503 with
``Retry-After``), then the application's ``on_connect(request)``: ``None`` or an :class:`~fanout.Admit`
accepts, :class:`~fanout.Reject` answers with its status, anything else with 500 (fail closed).

The socket side (:mod:`node.http`) calls :meth:`HttpSide.process_request` with itself as the ``client``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import html
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from websockets.datastructures import Headers as WsHeaders
from websockets.http11 import Request, Response

from fanout.admission import Admit, ConnectRequest, Reject, origin_allowed

from .api import openapi
from .lanes import call_hook
from .limits import TokenBucket
from .metrics import render

if TYPE_CHECKING:
    from .surfaces import HttpHost

log = logging.getLogger("fanout.node")


class HttpClient(Protocol):
    """A socket whose HTTP request is being answered, as the endpoints and the gate use it."""

    remote_address: Any
    #: what the gate admitted: the request as the application saw it, and what ``on_connect`` returned
    admission: tuple[ConnectRequest, Any] | None

    def respond(self, status: int, text: str) -> Response: ...


#: what an application's ``http_routes`` handler returns: (status, content type, body)
HttpAnswer = tuple[int, str, bytes]
Route = Callable[[ConnectRequest], Awaitable[HttpAnswer]]


@functools.cache
def js_client() -> tuple[bytes, str]:
    """``node/static/fanout.js`` and its ETag."""
    body = resources.files(__package__ or "node").joinpath("static/fanout.js").read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


#: a stable path, so a short freshness and revalidation (the ETag) rather than "immutable"
JS_CACHE_CONTROL = "public, max-age=300"


class HttpSide:
    """Answers a node's HTTP requests and admits (or refuses) its websocket clients."""

    def __init__(self, node: HttpHost) -> None:
        self.node = node
        self._registry = node.metrics.registry()
        rate = node.options.accept_rate
        self._accepts = TokenBucket(rate, max(rate, 1.0), 0.0) if rate > 0 else None
        self._routes: Mapping[str, Route] = getattr(node.app, "http_routes", None) or {}

    async def process_request(self, connection: HttpClient, request: Request) -> Response | None:
        """The answer to an HTTP request, or None to open the websocket it asks for."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._gate(connection, request)
        method = getattr(request, "method", "GET")
        if method not in ("GET", "HEAD"):
            response = connection.respond(405, "method not allowed\n")
            response.headers["Allow"] = "GET, HEAD"
            return response
        response = await self._endpoint(connection, request)
        if method == "HEAD":
            response.body = b""  # Content-Length stays that of the GET answer
        return response

    # ------------------------------------------------------------------ endpoints

    async def _endpoint(self, connection: HttpClient, request: Request) -> Response:
        node = self.node
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            healthy = node.backend.healthy
            return connection.respond(200 if healthy else 503, "ok\n" if healthy else "backend down\n")
        if path == "/metrics":
            return _response(
                connection, 200, render(self._registry), "text/plain; version=0.0.4; charset=utf-8"
            )
        if path == "/fanout.js":
            return _js_client(connection, request)
        if path == "/api/openapi.json" and node.options.api_key:
            return _response(connection, 200, orjson.dumps(openapi(node.options.node_id)), "application/json")
        route = self._routes.get(path)
        if route is not None:
            try:
                status, content_type, body = await route(_connect_request(connection, request))
            except Exception:
                node.metrics.app_errors += 1
                log.exception("application route %s failed", path)
                return connection.respond(500, "internal error\n")
            return _response(connection, status, body, content_type)
        if path in ("/", "/index.html"):
            return _response(connection, 200, self._status_page(), "text/html; charset=utf-8")
        return connection.respond(404, "not found\n")

    def _status_page(self) -> bytes:
        """What ``GET /`` shows for an application without a page of its own: which node this is, and
        where its endpoints are (the websocket is at any path but these)."""
        node = self.node
        rows = {
            "node": node.options.node_id,
            "backend": f"{node.settings.backend.value} ({'up' if node.backend.healthy else 'down'})",
            "mode": node.settings.mode.value,
            "namespace": node.settings.namespace,
            "connections": str(len(node.table)),
            "application": getattr(node.app, "__name__", None) or type(node.app).__qualname__,
        }
        cells = "".join(f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in rows.items())
        return (
            "<!doctype html><meta charset=utf-8><title>fanout node</title>"
            f"<h1>fanout node</h1><table>{cells}</table>"
            '<p>Websocket clients connect here (ws://); <a href="/healthz">/healthz</a>, '
            '<a href="/metrics">/metrics</a>, <a href="/fanout.js">/fanout.js</a> (the JS client).</p>'
        ).encode()

    # ------------------------------------------------------------------ the gate

    async def _gate(self, connection: HttpClient, request: Request) -> Response | None:
        node, metrics, options = self.node, self.node.metrics, self.node.options
        if not origin_allowed(request.headers.get("Origin"), options.allowed_origins):
            metrics.origin_refusals += 1
            return connection.respond(403, "origin not allowed\n")
        if options.max_connections and len(node.table) >= options.max_connections:
            metrics.connections_refused += 1
            return connection.respond(503, "too many connections\n")
        if self._accepts is not None and not self._accepts.take(asyncio.get_running_loop().time()):
            metrics.accept_rate_refusals += 1
            response = connection.respond(503, "too many new connections, retry shortly\n")
            response.headers["Retry-After"] = "1"
            return response
        connect_request = _connect_request(connection, request)
        on_connect = getattr(node.app, "on_connect", None)
        admit: Any = None
        if on_connect is not None:
            try:
                admit = await call_hook(on_connect, connect_request)
            except Reject as reject:
                metrics.admission_rejects[str(reject.status)] += 1
                return connection.respond(reject.status, f"{reject.reason}\n")
            except Exception:
                metrics.admission_errors += 1
                log.exception("on_connect failed: refusing the client (fail closed)")
                return connection.respond(500, "admission failed\n")
            if admit is not None and not isinstance(admit, Admit):
                metrics.admission_errors += 1
                log.error("on_connect returned %r (expected None or fanout.Admit): refusing", admit)
                return connection.respond(500, "admission failed\n")
        connection.admission = (connect_request, admit)
        return None


def _connect_request(connection: HttpClient, request: Request) -> ConnectRequest:
    remote = connection.remote_address
    host = str(remote[0]) if isinstance(remote, tuple) and remote else ""
    return ConnectRequest.from_http(request.path, request.headers.raw_items(), host)


def _js_client(connection: HttpClient, request: Request) -> Response:
    body, etag = js_client()
    if etag in (tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")):
        response = connection.respond(304, "")
        headers = WsHeaders(response.headers)
        for name in ("Content-Type", "Content-Length"):
            del headers[name]
        response.headers = headers
    else:
        response = _response(connection, 200, body, "text/javascript; charset=utf-8")
    response.headers["ETag"] = etag
    response.headers["Cache-Control"] = JS_CACHE_CONTROL
    return response


def _response(connection: HttpClient, status: int, body: bytes, content_type: str) -> Response:
    response = connection.respond(status, "")
    headers = WsHeaders(response.headers)
    del headers["Content-Type"]
    del headers["Content-Length"]
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    response.headers = headers
    response.body = body
    return response
