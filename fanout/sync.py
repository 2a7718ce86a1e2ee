"""SyncServerUtil: ServerUtil for code without an event loop (Django, Flask, Celery, scripts).

It is a thin facade, not a second implementation: it runs one :class:`ServerUtil` on an event loop in a
daemon thread and forwards each call, blocking until it returns. The methods, arguments, return values
and exceptions are exactly the async ones, and so are their signatures: each operation is written out
with ServerUtil's parameters and annotations (``tests/test_sync_types.py`` fails when the two drift
apart), plus overloads where ``ack=`` or ``wait=`` decides between a value and ``None``. It connects on
first use, and again in a child process after ``fork()`` (prefork servers such as gunicorn or Celery),
since a connection cannot cross a fork.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import warnings
from collections.abc import Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, Concatenate, Literal, ParamSpec, Self, TypeVar, overload

from . import protocol
from .commands import Json, NodeRecord
from .config import Mode, Settings
from .serverutil import Names, ServerUtil

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: the ServerUtil operations a SyncServerUtil forwards: every public coroutine method but the lifecycle
OPERATIONS = frozenset(
    name
    for name, member in inspect.getmembers(ServerUtil, inspect.iscoroutinefunction)
    if not name.startswith("_") and name not in ("connect", "disconnect", "watch_nodes")
)


class SyncServerUtil:
    """Blocking twin of :class:`ServerUtil`: same methods, same arguments, same results."""

    def __init__(
        self,
        url: str | None = None,
        *,
        mode: str | Mode = Mode.ROUTING,
        namespace: str = "fanout",
        backend: str | None = None,
        secret: str | bytes | None = None,
        settings: Settings | None = None,
        in_process: bool = False,
        json_default: protocol.JsonDefault | None = None,
        **options: Any,
    ) -> None:
        """The arguments of :class:`ServerUtil`, kept for the ServerUtil made on first use."""
        self._args: tuple[Any, ...] = (url,)
        self._kwargs: dict[str, Any] = dict(
            mode=mode,
            namespace=namespace,
            backend=backend,
            secret=secret,
            settings=settings,
            in_process=in_process,
            json_default=json_default,
            **options,
        )
        self._lock = threading.Lock()
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._util: ServerUtil | None = None
        self._borrowed = False
        self._warned_in_loop = False

    @classmethod
    def from_env(
        cls, environ: dict[str, str] | None = None, *, json_default: protocol.JsonDefault | None = None
    ) -> Self:
        return cls(settings=Settings.from_env(environ), json_default=json_default)

    @classmethod
    def borrowing(cls, util: ServerUtil, loop: asyncio.AbstractEventLoop) -> Self:
        """A blocking view of a ServerUtil already connected on a loop running in another thread (a
        worker's plain-function handlers call through the worker's own link). It never disconnects it."""
        sync = cls()
        sync._util, sync._loop, sync._pid, sync._borrowed = util, loop, os.getpid(), True
        return sync

    @property
    def settings(self) -> Settings:
        return self._ensure()[0].settings

    def connect(self) -> None:
        """Connect now (otherwise the first call does). Raises BackendUnavailable."""
        self._ensure()

    def disconnect(self) -> None:
        """Leave the backend and stop the background loop. Idempotent (a borrowing one does nothing)."""
        if self._borrowed:
            return
        with self._lock:
            util, loop, thread = self._util, self._loop, self._thread
            self._util = self._loop = self._thread = None
        if util is None or loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(util.disconnect(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disconnect()

    def _ensure(self) -> tuple[ServerUtil, asyncio.AbstractEventLoop]:
        if self._borrowed and self._util is not None and self._loop is not None:
            return self._util, self._loop
        with self._lock:
            if self._util is not None and self._loop is not None and self._pid == os.getpid():
                return self._util, self._loop
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="fanout-sync", daemon=True)
            thread.start()
            util = ServerUtil(*self._args, **self._kwargs)
            try:
                asyncio.run_coroutine_threadsafe(util.connect(), loop).result()
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()
                raise
            self._util, self._loop, self._thread, self._pid = util, loop, thread, os.getpid()
            return util, loop

    def _call(
        self,
        method: Callable[Concatenate[ServerUtil, _P], Coroutine[Any, Any, _R]],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _R:
        """Run ``method`` (a ServerUtil coroutine function) on the loop thread and wait for its result."""
        if not self._warned_in_loop:
            self._warn_in_running_loop(method.__name__)
        util, loop = self._ensure()
        return asyncio.run_coroutine_threadsafe(method(util, *args, **kwargs), loop).result()

    def _warn_in_running_loop(self, call: str) -> None:
        """Warn (once) when called from a coroutine: the call blocks that event loop until it returns
        (Django's ``async_to_sync`` refuses outright; a warning keeps code that works working)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop runs in this thread: the blocking call is what is wanted
        self._warned_in_loop = True
        warnings.warn(
            f"SyncServerUtil.{call}() called inside a running event loop blocks it until the call returns: "
            f"in async code use fanout.ServerUtil instead (async with ServerUtil(...) as util: "
            f"await util.{call}(...))",
            RuntimeWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ the operations, as in ServerUtil

    def check_cluster(self, timeout: float | None = None) -> int:
        return self._call(ServerUtil.check_cluster, timeout)

    @overload
    def send(
        self,
        client_ids: Names,
        data: object,
        *,
        exclude: Names = ...,
        ack: Literal[True],
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> int: ...
    @overload
    def send(
        self,
        client_ids: Names,
        data: object,
        *,
        exclude: Names = ...,
        ack: Literal[False] = ...,
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> None: ...
    @overload
    def send(
        self,
        client_ids: Names,
        data: object,
        *,
        exclude: Names = ...,
        ack: bool,
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> int | None: ...
    def send(
        self,
        client_ids: Names,
        data: object,
        *,
        exclude: Names = (),
        ack: bool = False,
        timeout: float | None = None,
        partial: bool = False,
        idempotency_key: str | None = None,
    ) -> int | None:
        return self._call(
            ServerUtil.send,
            client_ids,
            data,
            exclude=exclude,
            ack=ack,
            timeout=timeout,
            partial=partial,
            idempotency_key=idempotency_key,
        )

    @overload
    def send_by_flag(
        self,
        flags: Names,
        data: object,
        *,
        exclude: Names = ...,
        ack: Literal[True],
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> int: ...
    @overload
    def send_by_flag(
        self,
        flags: Names,
        data: object,
        *,
        exclude: Names = ...,
        ack: Literal[False] = ...,
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> None: ...
    @overload
    def send_by_flag(
        self,
        flags: Names,
        data: object,
        *,
        exclude: Names = ...,
        ack: bool,
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> int | None: ...
    def send_by_flag(
        self,
        flags: Names,
        data: object,
        *,
        exclude: Names = (),
        ack: bool = False,
        timeout: float | None = None,
        partial: bool = False,
        idempotency_key: str | None = None,
    ) -> int | None:
        return self._call(
            ServerUtil.send_by_flag,
            flags,
            data,
            exclude=exclude,
            ack=ack,
            timeout=timeout,
            partial=partial,
            idempotency_key=idempotency_key,
        )

    @overload
    def send_to_group(
        self,
        groups: Names,
        data: object,
        *,
        exclude: Names = ...,
        ack: Literal[True],
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> int: ...
    @overload
    def send_to_group(
        self,
        groups: Names,
        data: object,
        *,
        exclude: Names = ...,
        ack: Literal[False] = ...,
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> None: ...
    @overload
    def send_to_group(
        self,
        groups: Names,
        data: object,
        *,
        exclude: Names = ...,
        ack: bool,
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> int | None: ...
    def send_to_group(
        self,
        groups: Names,
        data: object,
        *,
        exclude: Names = (),
        ack: bool = False,
        timeout: float | None = None,
        partial: bool = False,
        idempotency_key: str | None = None,
    ) -> int | None:
        return self._call(
            ServerUtil.send_to_group,
            groups,
            data,
            exclude=exclude,
            ack=ack,
            timeout=timeout,
            partial=partial,
            idempotency_key=idempotency_key,
        )

    @overload
    def send_to_all(
        self,
        data: object,
        *,
        exclude: Names = ...,
        ack: Literal[True],
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> int: ...
    @overload
    def send_to_all(
        self,
        data: object,
        *,
        exclude: Names = ...,
        ack: Literal[False] = ...,
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> None: ...
    @overload
    def send_to_all(
        self,
        data: object,
        *,
        exclude: Names = ...,
        ack: bool,
        timeout: float | None = ...,
        partial: bool = ...,
        idempotency_key: str | None = ...,
    ) -> int | None: ...
    def send_to_all(
        self,
        data: object,
        *,
        exclude: Names = (),
        ack: bool = False,
        timeout: float | None = None,
        partial: bool = False,
        idempotency_key: str | None = None,
    ) -> int | None:
        return self._call(
            ServerUtil.send_to_all,
            data,
            exclude=exclude,
            ack=ack,
            timeout=timeout,
            partial=partial,
            idempotency_key=idempotency_key,
        )

    @overload
    def close(
        self,
        client_ids: Names,
        code: int = ...,
        reason: str = ...,
        *,
        data: object = ...,
        wait: Literal[True] = ...,
        timeout: float | None = ...,
    ) -> int: ...
    @overload
    def close(
        self,
        client_ids: Names,
        code: int = ...,
        reason: str = ...,
        *,
        data: object = ...,
        wait: Literal[False],
        timeout: float | None = ...,
    ) -> None: ...
    @overload
    def close(
        self,
        client_ids: Names,
        code: int = ...,
        reason: str = ...,
        *,
        data: object = ...,
        wait: bool,
        timeout: float | None = ...,
    ) -> int | None: ...
    def close(
        self,
        client_ids: Names,
        code: int = 1000,
        reason: str = "",
        *,
        data: object = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> int | None:
        return self._call(ServerUtil.close, client_ids, code, reason, data=data, wait=wait, timeout=timeout)

    @overload
    def close_by_flag(
        self,
        flags: Names,
        code: int = ...,
        reason: str = ...,
        *,
        data: object = ...,
        wait: Literal[True] = ...,
        timeout: float | None = ...,
    ) -> int: ...
    @overload
    def close_by_flag(
        self,
        flags: Names,
        code: int = ...,
        reason: str = ...,
        *,
        data: object = ...,
        wait: Literal[False],
        timeout: float | None = ...,
    ) -> None: ...
    @overload
    def close_by_flag(
        self,
        flags: Names,
        code: int = ...,
        reason: str = ...,
        *,
        data: object = ...,
        wait: bool,
        timeout: float | None = ...,
    ) -> int | None: ...
    def close_by_flag(
        self,
        flags: Names,
        code: int = 1000,
        reason: str = "",
        *,
        data: object = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> int | None:
        return self._call(
            ServerUtil.close_by_flag, flags, code, reason, data=data, wait=wait, timeout=timeout
        )

    def close_guests(
        self,
        older_than: float,
        data: object = None,
        code: int = 1000,
        reason: str = "",
        *,
        timeout: float | None = None,
        partial: bool = False,
    ) -> int:
        return self._call(
            ServerUtil.close_guests,
            older_than,
            data,
            code,
            reason,
            timeout=timeout,
            partial=partial,
        )

    def send_bulk(self, pairs: Iterable[tuple[str, object]], *, idempotency_key: str | None = None) -> None:
        return self._call(ServerUtil.send_bulk, pairs, idempotency_key=idempotency_key)

    def send_bulk_by_flag(
        self, pairs: Iterable[tuple[str, object]], *, idempotency_key: str | None = None
    ) -> None:
        return self._call(ServerUtil.send_bulk_by_flag, pairs, idempotency_key=idempotency_key)

    @overload
    def join_group(
        self, client_id: str, groups: Names, *, wait: Literal[True] = ..., timeout: float | None = ...
    ) -> bool: ...
    @overload
    def join_group(
        self, client_id: str, groups: Names, *, wait: Literal[False], timeout: float | None = ...
    ) -> None: ...
    @overload
    def join_group(
        self, client_id: str, groups: Names, *, wait: bool, timeout: float | None = ...
    ) -> bool | None: ...
    def join_group(
        self, client_id: str, groups: Names, *, wait: bool = True, timeout: float | None = None
    ) -> bool | None:
        return self._call(ServerUtil.join_group, client_id, groups, wait=wait, timeout=timeout)

    @overload
    def leave_group(
        self, client_id: str, groups: Names, *, wait: Literal[True] = ..., timeout: float | None = ...
    ) -> bool: ...
    @overload
    def leave_group(
        self, client_id: str, groups: Names, *, wait: Literal[False], timeout: float | None = ...
    ) -> None: ...
    @overload
    def leave_group(
        self, client_id: str, groups: Names, *, wait: bool, timeout: float | None = ...
    ) -> bool | None: ...
    def leave_group(
        self, client_id: str, groups: Names, *, wait: bool = True, timeout: float | None = None
    ) -> bool | None:
        return self._call(ServerUtil.leave_group, client_id, groups, wait=wait, timeout=timeout)

    @overload
    def dissolve_group(
        self, group: str, *, wait: Literal[True] = ..., timeout: float | None = ...
    ) -> int: ...
    @overload
    def dissolve_group(self, group: str, *, wait: Literal[False], timeout: float | None = ...) -> None: ...
    @overload
    def dissolve_group(self, group: str, *, wait: bool, timeout: float | None = ...) -> int | None: ...
    def dissolve_group(self, group: str, *, wait: bool = True, timeout: float | None = None) -> int | None:
        return self._call(ServerUtil.dissolve_group, group, wait=wait, timeout=timeout)

    @overload
    def bind(
        self,
        client_id: str,
        flag: str,
        replace: bool = ...,
        *,
        wait: Literal[True] = ...,
        timeout: float | None = ...,
    ) -> bool: ...
    @overload
    def bind(
        self,
        client_id: str,
        flag: str,
        replace: bool = ...,
        *,
        wait: Literal[False],
        timeout: float | None = ...,
    ) -> None: ...
    @overload
    def bind(
        self, client_id: str, flag: str, replace: bool = ..., *, wait: bool, timeout: float | None = ...
    ) -> bool | None: ...
    def bind(
        self,
        client_id: str,
        flag: str,
        replace: bool = True,
        *,
        wait: bool = True,
        timeout: float | None = None,
    ) -> bool | None:
        return self._call(ServerUtil.bind, client_id, flag, replace, wait=wait, timeout=timeout)

    @overload
    def unbind(self, client_id: str, *, wait: Literal[True] = ..., timeout: float | None = ...) -> bool: ...
    @overload
    def unbind(self, client_id: str, *, wait: Literal[False], timeout: float | None = ...) -> None: ...
    @overload
    def unbind(self, client_id: str, *, wait: bool, timeout: float | None = ...) -> bool | None: ...
    def unbind(self, client_id: str, *, wait: bool = True, timeout: float | None = None) -> bool | None:
        return self._call(ServerUtil.unbind, client_id, wait=wait, timeout=timeout)

    @overload
    def set_session(
        self, client_id: str, data: dict[str, Json], *, wait: Literal[True] = ..., timeout: float | None = ...
    ) -> bool: ...
    @overload
    def set_session(
        self, client_id: str, data: dict[str, Json], *, wait: Literal[False], timeout: float | None = ...
    ) -> None: ...
    @overload
    def set_session(
        self, client_id: str, data: dict[str, Json], *, wait: bool, timeout: float | None = ...
    ) -> bool | None: ...
    def set_session(
        self, client_id: str, data: dict[str, Json], *, wait: bool = True, timeout: float | None = None
    ) -> bool | None:
        return self._call(ServerUtil.set_session, client_id, data, wait=wait, timeout=timeout)

    @overload
    def update_session(
        self, client_id: str, data: dict[str, Json], *, wait: Literal[True] = ..., timeout: float | None = ...
    ) -> bool: ...
    @overload
    def update_session(
        self, client_id: str, data: dict[str, Json], *, wait: Literal[False], timeout: float | None = ...
    ) -> None: ...
    @overload
    def update_session(
        self, client_id: str, data: dict[str, Json], *, wait: bool, timeout: float | None = ...
    ) -> bool | None: ...
    def update_session(
        self, client_id: str, data: dict[str, Json], *, wait: bool = True, timeout: float | None = None
    ) -> bool | None:
        return self._call(ServerUtil.update_session, client_id, data, wait=wait, timeout=timeout)

    def get_session(self, client_id: str, *, timeout: float | None = None) -> dict[str, Json]:
        return self._call(ServerUtil.get_session, client_id, timeout=timeout)

    def exists(self, client_id: str, *, timeout: float | None = None) -> bool:
        return self._call(ServerUtil.exists, client_id, timeout=timeout)

    def get_flag(self, client_id: str, *, timeout: float | None = None) -> str | None:
        return self._call(ServerUtil.get_flag, client_id, timeout=timeout)

    def flag_exists(self, flag: str, *, timeout: float | None = None, partial: bool = False) -> bool:
        return self._call(ServerUtil.flag_exists, flag, timeout=timeout, partial=partial)

    def get_client_ids_by_flag(
        self, flag: str, *, timeout: float | None = None, partial: bool = False
    ) -> list[str]:
        return self._call(ServerUtil.get_client_ids_by_flag, flag, timeout=timeout, partial=partial)

    def get_connection_count(self, *, timeout: float | None = None, partial: bool = False) -> int:
        return self._call(ServerUtil.get_connection_count, timeout=timeout, partial=partial)

    def get_group_count(self, group: str, *, timeout: float | None = None, partial: bool = False) -> int:
        return self._call(ServerUtil.get_group_count, group, timeout=timeout, partial=partial)

    def get_group_client_ids(
        self, group: str, *, timeout: float | None = None, partial: bool = False
    ) -> list[str]:
        return self._call(ServerUtil.get_group_client_ids, group, timeout=timeout, partial=partial)

    def get_groups(self, *, timeout: float | None = None, partial: bool = False) -> list[str]:
        return self._call(ServerUtil.get_groups, timeout=timeout, partial=partial)

    def is_in_group(self, client_id: str, group: str, *, timeout: float | None = None) -> bool:
        return self._call(ServerUtil.is_in_group, client_id, group, timeout=timeout)

    def get_group_flags(
        self, group: str, *, timeout: float | None = None, partial: bool = False
    ) -> list[str]:
        return self._call(ServerUtil.get_group_flags, group, timeout=timeout, partial=partial)

    def get_group_flag_count(self, group: str, *, timeout: float | None = None, partial: bool = False) -> int:
        return self._call(ServerUtil.get_group_flag_count, group, timeout=timeout, partial=partial)

    def get_flags(self, *, timeout: float | None = None, partial: bool = False) -> list[str]:
        return self._call(ServerUtil.get_flags, timeout=timeout, partial=partial)

    def get_flag_count(self, *, timeout: float | None = None, partial: bool = False) -> int:
        return self._call(ServerUtil.get_flag_count, timeout=timeout, partial=partial)

    def get_group_sessions(
        self, group: str, *, timeout: float | None = None, partial: bool = False
    ) -> dict[str, dict[str, Json]]:
        return self._call(ServerUtil.get_group_sessions, group, timeout=timeout, partial=partial)

    def get_client_ids_by_flags(
        self, flags: Names, *, timeout: float | None = None, partial: bool = False
    ) -> dict[str, list[str]]:
        return self._call(ServerUtil.get_client_ids_by_flags, flags, timeout=timeout, partial=partial)

    def get_presence(
        self, group: str, *, timeout: float | None = None, partial: bool = False
    ) -> dict[str, int]:
        return self._call(ServerUtil.get_presence, group, timeout=timeout, partial=partial)

    def get_nodes(self, *, timeout: float | None = None, partial: bool = False) -> list[NodeRecord]:
        return self._call(ServerUtil.get_nodes, timeout=timeout, partial=partial)

    def get_history(self, stream: str, since: int | None = None, limit: int = 100) -> dict[str, Json]:
        return self._call(ServerUtil.get_history, stream, since, limit)

    def remove_history(self, stream: str) -> None:
        return self._call(ServerUtil.remove_history, stream)


for _name in OPERATIONS:  # each operation documents itself as its ServerUtil coroutine does
    getattr(SyncServerUtil, _name).__doc__ = getattr(ServerUtil, _name).__doc__
del _name
