"""The node's process entry point: ``fanout-node`` / ``python -m node``.

Reads the FANOUT_* variables (and ``--app/--host/--port``), configures logging and the event loop, runs
one node until SIGTERM or SIGINT and shuts it down cleanly. A configuration error exits with status 2 and
one line naming the variable; a backend that cannot be reached at start, or an address it cannot listen
on (a port in use), with status 1 and one line.

``--processes N`` runs N node processes on one port (``SO_REUSEPORT``: the kernel spreads new
connections over them), each a node of its own (node id ``<id>-<i>``), so one command uses a machine's
cores. The parent only supervises: SIGTERM or SIGINT stops them all; if one exits, the others are
stopped and the parent exits with its status. A child exits when its supervisor dies, even by
SIGKILL (``PR_SET_PDEATHSIG`` on Linux, and a check of its parent process every second elsewhere), so no
orphan keeps the port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fanout.config import Settings
from fanout.exceptions import ConfigError, FanoutError
from fanout.loading import load_app

if TYPE_CHECKING:  # imported in main(), once the [node] extra is known to be installed
    from .options import NodeOptions

log = logging.getLogger("fanout.node")

#: what ``pip install "fanout[node]"`` brings that the node cannot run without
NODE_EXTRA = ("websockets", "prometheus_client")

ENVIRONMENT = """\
environment (an option given on the command line wins; README.md has the full table):
  FANOUT_URL, FANOUT_BACKEND     the broker: memory://, redis://..., redis+cluster://..., amqp://... (--url)
  FANOUT_NAMESPACE, FANOUT_MODE  channel prefix (default fanout); fanout or routing (default routing)
  FANOUT_SECRET                  shared key signing the commands; FANOUT_REPLAY_WINDOW (default 60 s)
  FANOUT_APP                     the application, module:attr (--app; default the demo chat)
  FANOUT_HOST, FANOUT_PORT       where to listen (--host, --port; default 127.0.0.1, 8765)
  FANOUT_NODE_ID                 the node's name in logs, metrics and get_nodes() (default host-pid)
  FANOUT_ALLOWED_ORIGINS, FANOUT_ACCEPT_RATE, FANOUT_HANDSHAKE_TIMEOUT, FANOUT_MAX_CONNECTIONS
                                 admission: browser origins, new connections per second, handshake limits
  FANOUT_MAX_FRAME, FANOUT_SEND_BUFFER, FANOUT_CLIENT_RATE, FANOUT_WRITE_DELAY, FANOUT_WELCOME
                                 per client: frame size, bytes waiting, messages per second, batching
  FANOUT_PING_INTERVAL, FANOUT_PING_TIMEOUT, FANOUT_HEARTBEAT_INTERVAL
                                 keepalive (default 20 s), node announcements (default 1 s)
  FANOUT_API_KEY, FANOUT_API_MAX_BODY       the HTTP API (off without a key)
  FANOUT_PRESENCE, FANOUT_PRESENCE_DEBOUNCE presence groups (docs/guide.md)
  FANOUT_EVENTS, FANOUT_EVENT_SHARDS, FANOUT_EVENTS_BACKLOG, FANOUT_EVENTS_POLICY
                                 the worker tier (docs/workers.md)
  FANOUT_QUERY_TIMEOUT, FANOUT_PUBLISH_TIMEOUT, FANOUT_MAX_MESSAGE   the bus
  FANOUT_DEMO_KEY                the demo chat's token key
  FANOUT_LOG_LEVEL, FANOUT_EVENT_LOOP       logging (default INFO); auto, uvloop or asyncio

exit status: 0 stopped by SIGTERM/SIGINT, 1 the broker or the address failed, 2 bad configuration
"""


class CannotListen(FanoutError):
    """The node's address is taken (another node on the port), not this host's, or a privileged port."""


def _configure_logging(level: str) -> None:
    level = level.strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(
            "FANOUT_LOG_LEVEL", f"{level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
        )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        # aiormq logs each lost link (and each failed connect) itself, while the backend already reports
        # it in one line
        logging.getLogger("aiormq").setLevel(logging.CRITICAL)


def _event_loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """``asyncio.run`` or ``uvloop.run`` as FANOUT_EVENT_LOOP says (auto: uvloop when installed)."""
    choice = choice.strip().lower() or "auto"
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ConfigError("FANOUT_EVENT_LOOP", f"{choice!r} is not one of 'auto', 'uvloop', 'asyncio'")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("FANOUT_EVENT_LOOP", "uvloop is not installed") from None
        else:
            return uvloop.run
    return asyncio.run


async def run(
    settings: Settings, options: NodeOptions, app: object | None = None, supervisor: int | None = None
) -> None:
    """Run a node until SIGTERM or SIGINT (or, under ``--processes``, until the ``supervisor`` process
    is gone), then shut it down cleanly."""
    from .app import app_shape_warnings
    from .node import Node

    node = Node(settings, options, app)
    for warning in app_shape_warnings(node.app):
        log.warning("%s", warning)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if supervisor is not None:
        _watch_parent(loop, supervisor, stop)
    try:
        await node.start()
    except OSError as exc:  # the backend's errors are ours (FanoutError): this is the listening socket
        with contextlib.suppress(Exception):
            await node.backend.close()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise CannotListen(f"cannot listen on {options.host}:{options.port}: {reason}") from None
    print(
        f"fanout node {node.options.node_id} on http://{options.host}:{node.port}/ "
        f"(websocket ws://{options.host}:{node.port}/, {settings.backend.value}, "
        f"{settings.mode.value} mode)",
        flush=True,
    )
    await stop.wait()
    log.info("shutting down")
    await node.stop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fanout-node",
        description="Run a fanout websocket node.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--app", help="application object, module:attr (default: FANOUT_APP or demo chat)")
    parser.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="look for the application's module in DIR first (default: the current directory)",
    )
    parser.add_argument("--url", help="the broker's URL (default: FANOUT_URL; its scheme names the backend)")
    parser.add_argument("--host", help="listen address (default: FANOUT_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default: FANOUT_PORT or 8765)")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="run N node processes sharing the port (SO_REUSEPORT), each its own node (default: 1)",
    )
    parser.add_argument(
        "--reuse-port", action="store_true", help="share the port with other processes (set by --processes)"
    )
    # set by --processes on its children: the pid whose death stops them
    parser.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    missing = [name for name in NODE_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"fanout-node: {missing[0]} is not installed; the node needs the extra: "
            'pip install "fanout[node]"',
            file=sys.stderr,
        )
        raise SystemExit(2)
    if args.supervisor is not None:
        _die_with_parent()
    from .options import NodeOptions

    environ = dict(os.environ)
    if args.url is not None:
        environ["FANOUT_URL"] = args.url
        environ.pop("FANOUT_BACKEND", None)  # the URL's scheme names the backend
    try:
        _configure_logging(environ.get("FANOUT_LOG_LEVEL", "INFO"))
        settings = Settings.from_env(environ)
        options = NodeOptions.from_env(environ)
        overrides = {
            k: v for k, v in (("app", args.app), ("host", args.host), ("port", args.port)) if v is not None
        }
        options = replace(options, **overrides)
        if args.reuse_port:
            options = replace(options, reuse_port=True)
        if args.processes < 1:
            raise ConfigError("--processes", f"{args.processes} is not a number of processes (1 or more)")
        if args.processes > 1 and options.port == 0:
            raise ConfigError("--processes", "processes share one port: give a port, not 0")
        # fail at start, not at first use
        app = load_app(options.app, app_dir=args.app_dir) if options.app else None
        runner = _event_loop_runner(environ.get("FANOUT_EVENT_LOOP", "auto"))
    except ConfigError as exc:
        print(f"fanout-node: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.processes > 1:
        raise SystemExit(_supervise(args.processes, options, argv if argv is not None else sys.argv[1:]))
    try:
        runner(run(settings, options, app, args.supervisor))
    except FanoutError as exc:
        print(f"fanout-node: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


#: prctl(2) option: the signal this process gets when its parent dies (Linux)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM (a clean stop) when the supervisor dies, even by SIGKILL. Elsewhere,
    or if prctl is refused, the check of :func:`_watch_parent` alone stops the node."""
    with contextlib.suppress(OSError, AttributeError):  # no libc prctl (not Linux)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _watch_parent(loop: asyncio.AbstractEventLoop, supervisor: int, stop: asyncio.Event) -> None:
    """Stop the node once its parent is no longer ``supervisor`` (checked now, then every second): the
    supervisor died before PR_SET_PDEATHSIG was set, or the platform has none."""
    if os.getppid() != supervisor:
        log.warning("the supervisor (pid %d) is gone: stopping", supervisor)
        stop.set()
    else:
        loop.call_later(1.0, _watch_parent, loop, supervisor, stop)


def _supervise(count: int, options: NodeOptions, argv: list[str]) -> int:
    """Run ``count`` node processes on one port until a signal or until one of them exits."""
    from .options import default_node_id

    base_id = options.node_id or default_node_id()
    child_argv = [*_without_processes(argv), "--reuse-port", "--supervisor", str(os.getpid())]
    children = []
    for index in range(count):
        env = {**os.environ, "FANOUT_NODE_ID": f"{base_id}-{index}"}
        # this package by its name here: ``node`` in a checkout, ``fanout_node`` installed
        command = [sys.executable, "-m", __package__ or "node", *child_argv]
        children.append(subprocess.Popen(command, env=env))
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while True:
        exited = [child for child in children if child.poll() is not None]
        if len(exited) == len(children):
            break
        if exited and not stopping:
            status = exited[0].returncode or 1
            print(
                f"fanout-node: process {children.index(exited[0])} exited with status "
                f"{exited[0].returncode}; stopping the others",
                file=sys.stderr,
            )
            stop(signal.SIGTERM, None)
        time.sleep(0.1)
    if stopping and status == 0:
        status = max((child.returncode for child in children), default=0)
    return status


def _without_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out
