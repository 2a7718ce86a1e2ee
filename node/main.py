"""The node's process entry point: ``fanout-node`` / ``python -m node``.

Reads the FANOUT_* variables (and ``--app/--host/--port``), configures logging and the event loop, runs
one node until SIGTERM or SIGINT and shuts it down cleanly. A configuration error exits with status 2 and
one line naming the variable; a backend that cannot be reached at start, or an address it cannot listen
on (a port in use), with status 1 and one line.

``--processes N`` runs N node processes on one port (``SO_REUSEPORT``: the kernel spreads new
connections over them), each a node of its own (node id ``<id>-<i>``), so one command uses a machine's
cores. The parent only supervises: SIGTERM or SIGINT stops them all; if one exits, the others are
stopped and the parent exits with its status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from fanout.config import Settings
from fanout.exceptions import ConfigError, FanoutError
from fanout.loading import load_app

from .node import Node, NodeOptions, default_node_id

log = logging.getLogger("fanout.node")


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


async def run(settings: Settings, options: NodeOptions, app: object | None = None) -> None:
    """Run a node until SIGTERM or SIGINT, then shut it down cleanly."""
    node = Node(settings, options, app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
    except OSError as exc:  # the backend's errors are ours (FanoutError): this is the listening socket
        with contextlib.suppress(Exception):
            await node.backend.close()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise CannotListen(f"cannot listen on {options.host}:{options.port}: {reason}") from None
    print(
        f"fanout node {node.options.node_id} on ws://{options.host}:{node.port}/ "
        f"({settings.backend.value}, {settings.mode.value} mode)",
        flush=True,
    )
    await stop.wait()
    log.info("shutting down")
    await node.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fanout-node", description="Run a fanout websocket node.")
    parser.add_argument("--app", help="application object, module:attr (default: FANOUT_APP or demo chat)")
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
    args = parser.parse_args(argv)
    try:
        _configure_logging(os.environ.get("FANOUT_LOG_LEVEL", "INFO"))
        settings = Settings.from_env()
        options = NodeOptions.from_env()
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
        app = load_app(options.app) if options.app else None  # fail at start, not at first use
        runner = _event_loop_runner(os.environ.get("FANOUT_EVENT_LOOP", "auto"))
    except ConfigError as exc:
        print(f"fanout-node: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.processes > 1:
        raise SystemExit(_supervise(args.processes, options, argv if argv is not None else sys.argv[1:]))
    try:
        runner(run(settings, options, app))
    except FanoutError as exc:
        print(f"fanout-node: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _supervise(count: int, options: NodeOptions, argv: list[str]) -> int:
    """Run ``count`` node processes on one port until a signal or until one of them exits."""
    base_id = options.node_id or default_node_id()
    child_argv = [*_without_processes(argv), "--reuse-port"]
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
