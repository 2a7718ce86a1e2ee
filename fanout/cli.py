"""The ``fanout`` command: ServerUtil from a shell, configured by the same FANOUT_* variables.

Examples::

    fanout send-to-group lobby '{"text":"hi"}'
    fanout --url redis://10.0.0.5:6379/0 --namespace chat send-by-flag user-42 hello --ack
    fanout join node-a.x1.3 lobby --timeout 2
    fanout stats
    fanout get-history group:lobby --since 41

The global options (``--url``, ``--namespace``, ``--mode``, ``--timeout``) go before or after the
command, and override FANOUT_URL, FANOUT_NAMESPACE and FANOUT_MODE. Data is sent verbatim as one text
frame (``--binary``: as a binary frame; ``-`` reads stdin). Results are printed as JSON. Before any
command the CLI listens for the nodes' heartbeats (at most 1.5 intervals) and stops if none is heard in
the namespace or if they use another mode or secret. Exit status: 0 done, 1 the cluster or backend
failed (no live nodes, unreachable broker; one line on stderr), 2 bad usage or configuration (including
a bad argument such as a close code or bulk pairs, a mode or secret that does not match the nodes', and
``memory://``, which reaches no node from a shell).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from . import history_api
from .arguments import ARGUMENTS, Refused
from .config import Mode, Settings, backend_for_url, validate_name
from .exceptions import BackendError, ConfigError, FanoutError, PayloadError
from .serverutil import ServerUtil

Action = Callable[[ServerUtil, argparse.Namespace], Awaitable[Any]]


def _data(args: argparse.Namespace) -> str | bytes:
    raw: str = sys.stdin.read() if args.data == "-" else args.data
    return raw.encode() if args.binary else raw


def _send_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="the payload, sent verbatim as one text frame ('-' reads stdin)")
    p.add_argument("--binary", action="store_true", help="send the payload as a binary frame")
    p.add_argument("--exclude", action="append", default=[], metavar="CLIENT_ID", help="skip this client")
    p.add_argument("--ack", action="store_true", help="wait and print how many connections got it")
    _key_option(p)


def _key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--idempotency-key",
        type=_checked("idempotency_key", str),
        metavar="KEY",
        help="send at most once per connection with this key within FANOUT_IDEMPOTENCY_WINDOW "
        "(a repeat prints what the first did)",
    )


def _wait(args: argparse.Namespace) -> dict[str, Any]:
    return {"timeout": args.timeout}


def _call(method: str, *fields: str) -> Action:
    """An action calling ``ServerUtil.<method>`` with these parsed arguments and ``timeout=``."""

    async def action(util: ServerUtil, args: argparse.Namespace) -> Any:
        return await getattr(util, method)(*(getattr(args, f) for f in fields), timeout=args.timeout)

    return action


#: what ``fanout --help`` says about the environment (every variable the CLI reads)
ENVIRONMENT = """\
environment (an option given on the command line wins):
  FANOUT_URL                 the broker the nodes use: redis://..., redis+cluster://..., amqp://... (--url)
  FANOUT_NAMESPACE           the nodes' namespace (--namespace; default fanout)
  FANOUT_MODE                fanout or routing, as the nodes (--mode; default routing)
  FANOUT_BACKEND             memory, redis or amqp (default: from the URL's scheme; ignored with --url)
  FANOUT_SECRET              the nodes' shared signing key, if they use one
  FANOUT_REPLAY_WINDOW       seconds a signed command stays valid (default 60)
  FANOUT_HEARTBEAT_INTERVAL  the nodes' heartbeat interval (default 1)
  FANOUT_QUERY_TIMEOUT       seconds to wait for the nodes (--timeout; default 5)
  FANOUT_PUBLISH_TIMEOUT     seconds before an unreachable broker is reported (default 10)
  FANOUT_MAX_MESSAGE         biggest command on the bus, bytes (default 8388608)
  FANOUT_HISTORY, FANOUT_CACHE, FANOUT_HISTORY_SIZE, FANOUT_HISTORY_TTL, FANOUT_HISTORY_URL
                             history: as the nodes (see docs/continuity.md)
  FANOUT_IDEMPOTENCY_WINDOW  seconds an --idempotency-key is remembered, as the nodes (default 300)
  FANOUT_LOG_LEVEL           log level (default: WARNING for commands, INFO for worker)
  FANOUT_WORKER_APP, FANOUT_WORKER_CONCURRENCY, FANOUT_WORKER_RETRIES, FANOUT_WORKER_PORT,
  FANOUT_WORKER_HOST, FANOUT_EVENT_SHARDS   fanout worker, fanout workers (see docs/workers.md)
  FANOUT_OUTBOX_DSN, FANOUT_OUTBOX_TABLE, FANOUT_RELAY_HTTP
                             fanout outbox init, fanout relay (see docs/publishing.md)

exit status: 0 done, 1 the cluster or broker failed, 2 bad usage or configuration
"""

#: the global options and the variables they override
_OVERRIDES = {"url": "FANOUT_URL", "namespace": "FANOUT_NAMESPACE", "mode": "FANOUT_MODE"}


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fanout")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        from . import __version__

        return __version__


def _checked(name: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option's type: its text converted, then checked against the calls' argument table."""
    rule = ARGUMENTS[name]

    def parse(text: str) -> Any:
        try:
            return rule.take(convert(text))
        except (ValueError, Refused):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule.what}") from None

    return parse


def _url(text: str) -> str:
    try:
        backend_for_url(text, "--url")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--url: ")) from None
    return text


def _namespace(text: str) -> str:
    try:
        return validate_name(text, "--namespace")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--namespace: ")) from None


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """The options accepted before and after the command (``default``: SUPPRESS on the commands, so
    that one given before the command is not reset by the command's parser)."""
    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument("--url", type=_url, default=default, help="the broker URL (FANOUT_URL)")
    group.add_argument(
        "--namespace", type=_namespace, default=default, help="the namespace (FANOUT_NAMESPACE)"
    )
    group.add_argument(
        "--mode", choices=[m.value for m in Mode], default=default, help="the nodes' mode (FANOUT_MODE)"
    )
    group.add_argument(
        "--timeout",
        type=_checked("timeout", float),
        default=default,
        metavar="SECONDS",
        help="seconds to wait for the nodes (FANOUT_QUERY_TIMEOUT)",
    )


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, Action]]:
    parser = argparse.ArgumentParser(
        prog="fanout",
        description="Push to fanout websocket nodes, and query them, from a shell.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _global_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    actions: dict[str, Action] = {}

    def command(name: str, help_text: str, action: Action) -> argparse.ArgumentParser:
        actions[name] = action
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    def send_kw(a: argparse.Namespace) -> dict[str, Any]:
        return {
            "exclude": a.exclude,
            "ack": a.ack,
            "timeout": a.timeout,
            "idempotency_key": a.idempotency_key,
        }

    p = command(
        "send", "send to connections by client id", lambda u, a: u.send(a.targets, _data(a), **send_kw(a))
    )
    p.add_argument("targets", nargs="+", metavar="CLIENT_ID")
    _send_options(p)
    p = command(
        "send-by-flag",
        "send to every connection bound to these flags",
        lambda u, a: u.send_by_flag(a.targets, _data(a), **send_kw(a)),
    )
    p.add_argument("targets", nargs="+", metavar="FLAG")
    _send_options(p)
    p = command(
        "send-to-group",
        "send to every member of these groups",
        lambda u, a: u.send_to_group(a.targets, _data(a), **send_kw(a)),
    )
    p.add_argument("targets", nargs="+", metavar="GROUP")
    _send_options(p)
    p = command("send-to-all", "send to every connection", lambda u, a: u.send_to_all(_data(a), **send_kw(a)))
    _send_options(p)

    for name, method, metavar in (
        ("close", "close", "CLIENT_ID"),
        ("close-by-flag", "close_by_flag", "FLAG"),
    ):
        p = command(
            name,
            f"close connections by {metavar.lower().replace('_', ' ')}",
            _closer(method),
        )
        p.add_argument("targets", nargs="+", metavar=metavar)
        p.add_argument("--code", type=_checked("code", int), default=1000)
        p.add_argument("--reason", type=_checked("reason", str), default="")
        p.add_argument("--data", help="a last frame sent before the close (verbatim text)")
    p = command(
        "close-guests",
        "close every connection with no flag open longer than --older-than seconds",
        lambda u, a: u.close_guests(a.older_than, a.data, a.code, a.reason, timeout=a.timeout),
    )
    p.add_argument("--older-than", type=_checked("older_than", float), required=True, metavar="SECONDS")
    p.add_argument("--code", type=_checked("code", int), default=1000)
    p.add_argument("--reason", type=_checked("reason", str), default="")
    p.add_argument("--data", help="a last frame sent before the close (verbatim text)")
    for name, method, what in (
        ("send-bulk", "send_bulk", "client id"),
        ("send-bulk-by-flag", "send_bulk_by_flag", "flag"),
    ):
        p = command(
            name,
            f"a payload per {what}: a JSON list of [{what}, text] pairs ('-' reads stdin)",
            _bulk(method),
        )
        p.add_argument("pairs", help=f'e.g. \'[["{what}", "text"], ...]\'')
        _key_option(p)

    p = command(
        "join", "add a connection to groups", lambda u, a: u.join_group(a.client_id, a.groups, **_wait(a))
    )
    p.add_argument("client_id")
    p.add_argument("groups", nargs="+", metavar="GROUP")
    p = command(
        "leave",
        "remove a connection from groups",
        lambda u, a: u.leave_group(a.client_id, a.groups, **_wait(a)),
    )
    p.add_argument("client_id")
    p.add_argument("groups", nargs="+", metavar="GROUP")
    p = command("dissolve", "empty a group on every node", lambda u, a: u.dissolve_group(a.group, **_wait(a)))
    p.add_argument("group")
    p = command(
        "bind",
        "bind a connection to a flag",
        lambda u, a: u.bind(a.client_id, a.flag, not a.no_replace, **_wait(a)),
    )
    p.add_argument("client_id")
    p.add_argument("flag")
    p.add_argument("--no-replace", action="store_true", help="only if it has no flag yet (bindNx)")
    p = command("unbind", "remove a connection's flag", lambda u, a: u.unbind(a.client_id, **_wait(a)))
    p.add_argument("client_id")

    p = command(
        "session", "print a connection's session", lambda u, a: u.get_session(a.client_id, **_wait(a))
    )
    p.add_argument("client_id")
    for name, method in (("set-session", "set_session"), ("update-session", "update_session")):
        p = command(
            name,
            f"{name.split('-')[0]} a connection's session from a JSON object",
            _call(method, "client_id", "json"),
        )
        p.add_argument("client_id")
        p.add_argument("json", type=_json_object, help="a JSON object")

    for name, method, arg in (
        ("exists", "exists", "client_id"),
        ("get-flag", "get_flag", "client_id"),
        ("flag-exists", "flag_exists", "flag"),
        ("flag-clients", "get_client_ids_by_flag", "flag"),
        ("group-count", "get_group_count", "group"),
        ("group-clients", "get_group_client_ids", "group"),
        ("group-flags", "get_group_flags", "group"),
        ("group-flag-count", "get_group_flag_count", "group"),
        ("group-sessions", "get_group_sessions", "group"),
        ("presence", "get_presence", "group"),
    ):
        p = command(name, f"query: {method}", _call(method, arg))
        p.add_argument(arg)
    p = command("in-group", "query: is_in_group", _call("is_in_group", "client_id", "group"))
    p.add_argument("client_id")
    p.add_argument("group")
    p = command("flags-clients", "query: get_client_ids_by_flags", _call("get_client_ids_by_flags", "flags"))
    p.add_argument("flags", nargs="+", metavar="FLAG")
    command("flags", "every flag bound in the cluster", lambda u, a: u.get_flags(**_wait(a)))
    command("flag-count", "number of distinct flags bound", lambda u, a: u.get_flag_count(**_wait(a)))
    command("count", "number of connections in the cluster", lambda u, a: u.get_connection_count(**_wait(a)))
    command("groups", "every group with a member", lambda u, a: u.get_groups(**_wait(a)))
    command("nodes", "every live node", lambda u, a: u.get_nodes(**_wait(a)))
    command("stats", "nodes, connections and groups of the cluster", _stats)
    p = command(
        "get-history",
        "a history stream's epoch, offset and entries (group:<name>, flag:<name> or all; needs no node)",
        _history,
    )
    p.add_argument("stream", type=_checked("stream", str), metavar="STREAM")
    p.add_argument(
        "--since", type=_checked("since", int), metavar="OFFSET", help="the entries after this offset"
    )
    p.add_argument("--limit", type=_checked("limit", int), default=100, help="at most this many (100)")
    p = command(
        "remove-history",
        "forget a history stream's entries and epoch (needs no node)",
        lambda u, a: u.remove_history(a.stream),
    )
    p.add_argument("stream", type=_checked("stream", str), metavar="STREAM")

    p = sub.add_parser(
        "worker",
        help="run a business worker (fanout worker --app module:attr), list its dead letters, or clean up",
        description=(
            "Run a business worker: client events (FANOUT_EVENTS on the nodes) are handed to the app's "
            "on_open/on_message/on_close handlers. 'fanout worker dead-letters' lists the events parked "
            "after their handler kept failing; add --requeue to put them back on their shards. "
            "'fanout worker cleanup' deletes the namespace's event streams (or queues), leases, rosters "
            "and dead letters; it refuses while a worker or a node forwarding events is live (--force)."
        ),
        parents=[common],
    )
    p.add_argument("what", nargs="?", choices=["run", "dead-letters", "cleanup"], default="run")
    p.add_argument("--app", help="the application object, module:attr (FANOUT_WORKER_APP)")
    p.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="look for the application's module in DIR first (default: the current directory)",
    )
    p.add_argument("--concurrency", type=int, help="connections handled at once (FANOUT_WORKER_CONCURRENCY)")
    p.add_argument("--port", type=int, help="serve /healthz and /metrics on this port (FANOUT_WORKER_PORT)")
    p.add_argument("--requeue", action="store_true", help="with dead-letters: put them back on their shards")
    p.add_argument(
        "--force", action="store_true", help="with cleanup: even while workers or nodes use the tier"
    )
    sub.add_parser(
        "workers",
        help="the live business workers, their shards and the events waiting in them",
        description=(
            "List the live business workers of the namespace (heard for 1.5 heartbeat intervals): id, host, "
            "pid, FANOUT_EVENT_SHARDS, the shards each owns and the events waiting in them. Warns on stderr "
            "about a shard count that differs from FANOUT_EVENT_SHARDS and about waiting events no live "
            "worker owns."
        ),
        parents=[common],
    )
    _outbox_commands(sub, common)
    return parser, actions


def _outbox_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``fanout outbox init|sql`` and ``fanout relay`` (transactional publishing, docs/publishing.md)."""
    dsn_help = "the PostgreSQL database: a libpq URI or key=value string (FANOUT_OUTBOX_DSN)"
    table_help = "the outbox table, optionally schema.name (FANOUT_OUTBOX_TABLE; default fanout_outbox)"
    p = sub.add_parser(
        "outbox",
        help="create the outbox table in a PostgreSQL database (init), or print its SQL (sql)",
        description=(
            "'fanout outbox init --dsn DSN' creates the outbox table, its sequence, its commit trigger and "
            "its indexes (idempotent: run it again after an upgrade). 'fanout outbox sql' prints the same "
            "SQL, for a migration tool."
        ),
        parents=[common],
    )
    p.add_argument("what", choices=["init", "sql"])
    p.add_argument("--dsn", help=dsn_help)
    p.add_argument("--table", help=table_help)
    p = sub.add_parser(
        "relay",
        help="publish the committed rows of an outbox table (fanout relay --dsn DSN)",
        description=(
            "Publish the rows fanout.Outbox wrote, once their transaction committed, in commit order per "
            "target, then delete them. Run as many as you like, on any host: they share the rows by "
            "shard. SIGTERM finishes the batch in hand and exits 0. The FANOUT_* settings say where the "
            "nodes are, as for any publisher."
        ),
        parents=[common],
    )
    p.add_argument("--dsn", help=dsn_help)
    p.add_argument("--table", help=table_help)
    p.add_argument("--http", metavar="HOST:PORT", help="serve /healthz and /metrics here (FANOUT_RELAY_HTTP)")
    p.add_argument("--batch", type=int, default=500, help="rows published before they are deleted (500)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between looks without NOTIFY (1)")


def _outbox(settings: Settings, environ: dict[str, str], args: argparse.Namespace) -> Any:
    """``fanout outbox init|sql`` and ``fanout relay`` (until SIGTERM/SIGINT: exit 0)."""
    from .outbox import DEFAULT_TABLE, check_table, schema_sql

    table = check_table(args.table or environ.get("FANOUT_OUTBOX_TABLE") or DEFAULT_TABLE)
    if args.command == "outbox" and args.what == "sql":
        sys.stdout.write(schema_sql(table))
        return None
    dsn = args.dsn or environ.get("FANOUT_OUTBOX_DSN", "")
    if not dsn:
        raise ConfigError(
            "FANOUT_OUTBOX_DSN", "name the database with --dsn (a libpq URI or key=value string)"
        )
    try:
        import psycopg
    except ImportError:
        raise ConfigError("--dsn", "the outbox needs psycopg 3: pip install 'fanout[outbox]'") from None
    from .relay import RelayOptions, init_outbox, serve

    if args.command == "outbox":
        try:
            asyncio.run(init_outbox(dsn, table))
        except psycopg.Error as exc:  # unreachable, refused, no permission: one line, exit status 1
            raise BackendError(f"outbox init on {table}: {' '.join(str(exc).split())}") from None
        return {"table": table, "created": True}
    http = args.http or environ.get("FANOUT_RELAY_HTTP") or None
    where: tuple[str, int] | None = None
    if http:
        host, _, port = http.rpartition(":")
        if not port.isdigit():
            raise ConfigError("--http", f"{http!r} is not HOST:PORT")
        where = (host or "127.0.0.1", int(port))
    if args.batch < 1 or not args.poll > 0:
        raise ConfigError("--batch", "--batch must be at least 1 and --poll above 0")
    options = RelayOptions(dsn, table, batch=args.batch, poll=args.poll, http=where)
    asyncio.run(serve(options, settings))
    return None


def _closer(method: str) -> Action:
    async def action(util: ServerUtil, args: argparse.Namespace) -> Any:
        return await getattr(util, method)(
            args.targets, args.code, args.reason, data=args.data, timeout=args.timeout
        )

    return action


def _bulk(method: str) -> Action:
    async def action(util: ServerUtil, args: argparse.Namespace) -> Any:
        # (parsed by _pairs before connecting)
        await getattr(util, method)(args.pairs, idempotency_key=args.idempotency_key)

    return action


def _pairs(call: str, text: str) -> list[tuple[str, Any]]:
    """The bulk commands' JSON list of [name, text] pairs (``-``: read from stdin), checked as ``call``
    checks them."""
    raw = sys.stdin.read() if text == "-" else text
    try:
        pairs = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"pairs are not JSON: {exc}") from None
    if not isinstance(pairs, list):
        raise PayloadError("pairs must be a JSON list of [name, text] pairs")
    checked: list[tuple[str, Any]] = ARGUMENTS["pairs"].check(call, "pairs", pairs)
    return checked


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


async def _stats(util: ServerUtil, args: argparse.Namespace) -> dict[str, Any]:
    nodes = await util.get_nodes(timeout=args.timeout)
    groups = await util.get_groups(timeout=args.timeout)
    return {
        "nodes": len(nodes),
        "connections": sum(int(n.get("connections", 0)) for n in nodes),
        "groups": len(groups),
        "per_node": {str(n["node_id"]): n.get("connections", 0) for n in nodes},
    }


async def _history(util: ServerUtil, args: argparse.Namespace) -> dict[str, Any]:
    return history_api.as_json(await util.get_history(args.stream, args.since, args.limit))


#: the commands that need only the store, not the nodes (they work with no node live)
_STORE_ONLY = frozenset({"get-history", "remove-history"})


async def _run(settings: Settings, action: Action, args: argparse.Namespace) -> Any:
    async with ServerUtil(settings=settings) as util:
        # hear the nodes first: a wrong FANOUT_MODE, FANOUT_SECRET or FANOUT_NAMESPACE is reported
        # (ConfigMismatch, NoLiveNodes) rather than published into the void with exit status 0
        if args.command not in _STORE_ONLY:
            await util.check_cluster()
        return await action(util, args)


async def _dead_letters(
    settings: Settings, environ: dict[str, str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    from .backends import create_event_log
    from .events import decode
    from .worker import WorkerOptions

    tier = create_event_log(settings, shards=WorkerOptions.from_env(environ).shards, backlog=1)
    await tier.connect()
    try:
        out = []
        for dead in await tier.dead_letters():
            described: dict[str, str | None] = {"event_id": None, "kind": None, "client_id": None}
            with contextlib.suppress(FanoutError):
                event = decode(dead.header, dead.data)
                described = {
                    "event_id": event.event_id,
                    "kind": event.kind.value,
                    "client_id": event.client_id,
                }
            out.append({**described, "shard": dead.shard, "error": dead.error, "parked_at": dead.parked_at})
            if args.requeue:
                await tier.requeue(dead)
        return out
    finally:
        await tier.close()


def _worker(settings: Settings, environ: dict[str, str], args: argparse.Namespace) -> Any:
    """``fanout worker``: run one until SIGTERM/SIGINT (exit 0), list/requeue dead letters, or clean up;
    ``fanout workers``: list the live workers."""
    from .worker import WorkerOptions, list_workers, remove_event_tier

    shards = WorkerOptions.from_env(environ).shards
    if args.command == "workers":
        return asyncio.run(list_workers(settings, shards))
    if args.what == "dead-letters":
        return asyncio.run(_dead_letters(settings, environ, args))
    if args.what == "cleanup":
        return {"removed": asyncio.run(remove_event_tier(settings, shards, force=args.force))}
    import signal

    from .loading import load_app
    from .worker import Worker

    spec = args.app or environ.get("FANOUT_WORKER_APP", "")
    if not spec:
        raise ConfigError("FANOUT_WORKER_APP", "name the application with --app module:attr")
    app = load_app(spec, "FANOUT_WORKER_APP", app_dir=args.app_dir)
    overrides = {k: v for k, v in (("concurrency", args.concurrency), ("port", args.port)) if v is not None}

    async def run() -> None:
        worker = Worker.from_env(app, environ, **overrides)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await worker.start()
        print(f"fanout worker {worker.worker_id} running {spec} ({settings.where})", flush=True)
        await stop.wait()
        logging.getLogger("fanout.worker").info("stopping: finishing the events in hand")
        await worker.stop()

    asyncio.run(run())
    return None


def _configure_logging(environ: dict[str, str], worker: bool) -> None:
    """One handler on the root logger, once. Below DEBUG, the libraries' own lines about a failed
    connection are dropped: the error that follows reports it in one line (``fanout: ...``)."""
    level = (environ.get("FANOUT_LOG_LEVEL") or ("INFO" if worker else "WARNING")).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(
            "FANOUT_LOG_LEVEL", f"{level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
        )
    where = "%(asctime)s " if worker else "fanout: "
    logging.basicConfig(level=level, format=where + "%(levelname)s %(name)s: %(message)s", force=True)
    if level != "DEBUG":
        logging.getLogger("websockets").setLevel(logging.WARNING)
        logging.getLogger("aiormq").setLevel(logging.CRITICAL)  # its errors reach us as exceptions


def main(argv: list[str] | None = None) -> None:
    parser, actions = _build_parser()
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    for option, variable in _OVERRIDES.items():
        if getattr(args, option, None) is not None:
            environ[variable] = getattr(args, option)
    if getattr(args, "url", None) is not None:
        environ.pop("FANOUT_BACKEND", None)  # the URL's scheme names the backend
    try:
        _configure_logging(environ, args.command in ("worker", "relay"))
        settings = Settings.from_env(environ)
        if args.command in ("send-bulk", "send-bulk-by-flag"):
            args.pairs = _pairs(args.command.replace("-", "_"), args.pairs)
    except (ConfigError, PayloadError) as exc:
        print(f"fanout: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        if args.command in ("worker", "workers"):
            result = _worker(settings, environ, args)
        elif args.command in ("outbox", "relay"):
            result = _outbox(settings, environ, args)
        else:
            result = asyncio.run(_run(settings, actions[args.command], args))
    except FanoutError as exc:
        print(f"fanout: {exc}", file=sys.stderr)
        # a bad argument (payload, close reason, id) is bad usage like a bad option
        raise SystemExit(2 if isinstance(exc, ConfigError | PayloadError) else 1) from None
    if result is not None:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
