"""The node's process entry point: ``fanout-node`` / ``python -m node``.

Reads the FANOUT_* variables (and ``--app/--host/--port``), configures logging and the event loop, runs
one node until SIGTERM or SIGINT and shuts it down cleanly. A configuration error exits with status 2 and
one line naming the variable; a backend that cannot be reached at start, with status 1 and one line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from fanout.config import Settings
from fanout.exceptions import ConfigError, FanoutError
from fanout.loading import load_app

from .node import Node, NodeOptions

log = logging.getLogger("fanout.node")


def _configure_logging(level: str) -> None:
    level = level.strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(
            "FANOUT_LOG_LEVEL", f"{level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
        )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        # websockets logs every connection and handshake at INFO: too much at scale; aiormq logs each
        # lost link with a traceback at WARNING, while the backend already reports the outage in one line
        logging.getLogger("websockets").setLevel(logging.WARNING)
        logging.getLogger("aiormq").setLevel(logging.ERROR)


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
    await node.start()
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
    args = parser.parse_args(argv)
    try:
        _configure_logging(os.environ.get("FANOUT_LOG_LEVEL", "INFO"))
        settings = Settings.from_env()
        options = NodeOptions.from_env()
        overrides = {
            k: v for k, v in (("app", args.app), ("host", args.host), ("port", args.port)) if v is not None
        }
        options = replace(options, **overrides)
        app = load_app(options.app) if options.app else None  # fail at start, not at first use
        runner = _event_loop_runner(os.environ.get("FANOUT_EVENT_LOOP", "auto"))
    except ConfigError as exc:
        print(f"fanout-node: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        runner(run(settings, options, app))
    except FanoutError as exc:
        print(f"fanout-node: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
