"""A TCP proxy that tests put between a client and a broker to simulate a network failure.

``cut()`` aborts every connection going through the proxy (both sides, so the broker sees its client
vanish at once, like a dead host whose kernel still answers) and drops every new connection until
``restore()``. The listening socket stays open the whole time, so the port never changes hands.

In-process (same event loop as the test)::

    async with TcpProxy(target_port=5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        ...
        proxy.cut()
        proxy.restore()

As a separate process (for node subprocesses); it prints ``listening <port>`` once ready, and
SIGUSR1 cuts, SIGUSR2 restores, SIGTERM/SIGINT end it::

    python -m tests.support.tcp_proxy --listen-port 0 --target 127.0.0.1:5672

:class:`ProxyProcess` wraps that for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

_CHUNK = 256 * 1024


class TcpProxy:
    """Forward ``listen_host:listen_port`` (0 = any free port) to ``target_host:target_port``."""

    def __init__(
        self,
        target_host: str = "127.0.0.1",
        target_port: int = 5672,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.is_cut = False
        #: while True, what comes in either direction is read and dropped (a silent partition)
        self.frozen = False
        #: connections accepted so far (including the ones dropped while cut)
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port the proxy listens on (known after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("proxy not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port)
        return self

    def cut(self) -> None:
        """Abort every open connection (both sides) and drop new ones until :meth:`restore`."""
        self.is_cut = True
        for writer in list(self._writers):
            writer.transport.abort()

    def restore(self) -> None:
        """Accept and forward connections again."""
        self.is_cut = False

    def freeze(self) -> None:
        """Keep every connection open but forward nothing more, either way: a peer that went silent
        (a partition, a host that froze), which only heartbeats can tell from a quiet one."""
        self.frozen = True

    async def close(self) -> None:
        """Stop listening, abort every connection and wait for the forwarding tasks."""
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- forwarding ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.is_cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        if self.is_cut:  # cut while we were connecting upstream
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, writer)),
            asyncio.create_task(self._pump(up_reader, writer, up_writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            self._writers -= {writer, up_writer}
            for w in (writer, up_writer):
                w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, other: asyncio.StreamWriter
    ) -> None:
        """Copy one direction; when it ends (EOF, error, abort), end the other direction too."""
        try:
            while data := await reader.read(_CHUNK):
                if self.frozen:
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not self.frozen:  # (frozen, the other side hears nothing of it either)
                writer.transport.abort()
                other.transport.abort()


class ProxyProcess:
    """``python -m tests.support.tcp_proxy`` as a child process, controlled by signals."""

    def __init__(self, target: str = "127.0.0.1:5672", listen_port: int = 0) -> None:
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.tcp_proxy",
                "--listen-port",
                str(listen_port),
                "--target",
                target,
            ],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if len(line) != 2 or line[0] != "listening":
            self.stop()
            raise RuntimeError(f"tcp proxy did not start: {line!r}")
        self.port = int(line[1])

    def cut(self) -> None:
        self.process.send_signal(signal.SIGUSR1)
        time.sleep(0.05)  # the signal is handled asynchronously by the child's event loop

    def restore(self) -> None:
        self.process.send_signal(signal.SIGUSR2)
        time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _serve(listen_host: str, listen_port: int, target: str) -> None:
    host, _, port = target.rpartition(":")
    proxy = TcpProxy(host or "127.0.0.1", int(port), listen_host=listen_host, listen_port=listen_port)
    await proxy.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, proxy.cut)
    loop.add_signal_handler(signal.SIGUSR2, proxy.restore)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"listening {proxy.port}", flush=True)
    await stop.wait()
    await proxy.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0)
    parser.add_argument("--target", default="127.0.0.1:5672", help="host:port to forward to")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.listen_host, args.listen_port, args.target))


if __name__ == "__main__":
    main()
