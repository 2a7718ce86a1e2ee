"""ServerUtil: the API any service calls to push to websocket connections anywhere in the cluster.

Each call becomes a command (:mod:`fanout.commands`), published by the backend on the addresses that
:mod:`fanout.routing` picks. Calls that need answers (queries, ``ack=True`` sends, membership calls that
wait) attach a request; nodes reply to this ServerUtil's inbox and the answers are gathered here.

Who must answer:

* a call about one connection (join, bind, session, exists, ...) waits for its *owning* node, named by
  the client id; if that node is gone the call returns "not found" (``False``/``None``/``{}``);
* a cluster-wide call (counts, lists, ``ack=True``, ``close_by_flag``, ``dissolve_group``) is published to
  every node and waits for every live node. How many must answer is known from the broker where it
  tells (Redis PUBLISH returns the receiver count) and otherwise from node heartbeats: a ServerUtil that
  has heard heartbeats for 1.5 intervals knows every live node.

Whether this publisher fits the nodes at all (their mode, their secret) and whether any node runs in its
namespace is known from the same heartbeats: a ServerUtil's first publish waits until it has heard a node
that fits it, at most 1.5 heartbeat intervals, and every publish raises :class:`ConfigMismatch` or
:class:`NoLiveNodes` rather than go where no node listens (see :meth:`ServerUtil.check`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self, TypeAlias, cast

import orjson

from . import history_api, naming, protocol, routing
from .arguments import checked
from .backends import Backend, HistoryStore, create_backend, create_store
from .backends.store import StoredSend
from .commands import (
    Bind,
    Bye,
    Close,
    CloseGuests,
    Command,
    DissolveGroup,
    Heartbeat,
    JoinGroup,
    Json,
    LeaveGroup,
    NodeInfo,
    NodeRecord,
    Query,
    QueryKind,
    Reply,
    Request,
    Send,
    SendBulk,
    SetSession,
    Target,
    TargetKind,
    Unbind,
)
from .config import BackendKind, Mode, Settings
from .directory import NodeDirectory
from .exceptions import (
    ConfigError,
    ConfigMismatch,
    FanoutError,
    MessageTooLarge,
    NoLiveNodes,
    NotConnected,
    PayloadError,
    QueryTimeout,
    remote_error,
)
from .history import Positions, attach_positions, flag_stream, new_send_id
from .idempotency import APPENDED, COUNTED, DONE, PUBLISHED, Outcome, Repeated, derived
from .ids import new_boot_token, owner_of
from .naming import Address
from .receive import Receiver

log = logging.getLogger("fanout.serverutil")

Names: TypeAlias = str | Iterable[str]


@dataclass(slots=True)
class _Stored:
    """A send to history streams: its streams, what it stores in them, and its positions once appended
    (given beforehand: a repeat of a keyed send, published again as the first was, not appended)."""

    streams: tuple[str, ...]
    send: StoredSend
    positions: Positions | None = None


#: a keyed call's first attempt failed (a repeat waiting for it then tries on its own)
_FAILED: Any = object()
#: how often a waiting request re-checks whether the nodes it waits for are still alive
_RECHECK = 0.1


def names(value: Names, what: str) -> tuple[str, ...]:
    """One name or an iterable of names, as a tuple of distinct strings in their order."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, bytes | bytearray):
        raise PayloadError(f"{what} must be a string or a list of strings, not bytes")
    items = tuple(dict.fromkeys(value))
    for item in items:
        if not isinstance(item, str):
            raise PayloadError(f"{what} must be strings, got {type(item).__name__}")
    return items


def encode_payload(data: object, json_default: protocol.JsonDefault | None = None) -> tuple[bytes, bool]:
    """``(payload, binary)``: str -> text frame, bytes-like -> binary frame, else JSON text frame
    (``json_default`` converting what orjson cannot encode). Raises PayloadError, also for NaN/Infinity."""
    if isinstance(data, str):
        try:
            return data.encode("utf-8"), False
        except UnicodeEncodeError as exc:  # lone surrogates: no client could decode the frame
            raise PayloadError(
                f"text data is not valid Unicode (it cannot be UTF-8 encoded): {exc}"
            ) from None
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data), True
    return protocol.dump_json(data, json_default), False


def session_json(
    what: str, data: dict[str, Json], json_default: protocol.JsonDefault | None = None
) -> dict[str, Json]:
    """A session dict as it travels (in the command's JSON header): plain JSON, ``json_default`` applied.
    Raises PayloadError when it cannot be encoded or is nested too deep."""
    plain: dict[str, Json] = orjson.loads(protocol.dump_json(data, json_default, f"{what}: session data"))
    if protocol.too_deep(plain):
        raise PayloadError(f"{what}: session data is nested deeper than {protocol.MAX_DEPTH} levels")
    return plain


@dataclass(slots=True)
class _Gather:
    """Answers to one request, as they arrive."""

    owners: frozenset[str] | None  #: the nodes that must answer, or None for "every live node"
    replies: dict[str, Json] = field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)  #: node -> (error class, message)
    pages: dict[str, dict[int, Json]] = field(default_factory=dict)  #: node -> parts of a paged answer
    unreachable: set[str] = field(default_factory=set)  #: owners the broker says nobody received for
    receivers: int | None = None  #: how many nodes received the request, when the broker tells
    asked_at: float = 0.0  #: loop time of the publish
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class ServerUtil:
    """Publish commands to the websocket nodes and ask them questions. Use as ``async with``.

    Every target argument takes one value or a list; every send takes ``exclude=`` (client ids) and
    ``ack=True`` to return how many connections it reached. Calls that wait take ``timeout=`` (seconds,
    default ``settings.query_timeout``) and queries take ``partial=True`` to accept the answers of the
    nodes that replied in time instead of raising :class:`QueryTimeout`.

    Every argument is checked before anything is published (:mod:`fanout.arguments`): a wrong type or
    value raises :class:`PayloadError`. ``json_default`` is orjson's ``default=``: called with each value
    of a payload or session that orjson cannot encode (``Decimal``, your own classes), it returns one it
    can (or raises ``TypeError``).
    """

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
        self.settings = settings or Settings.create(
            url, backend=backend, mode=mode, namespace=namespace, secret=secret, **options
        )
        #: the memory backend only reaches this process: used only when asked for (or a node runs here)
        self.in_process = in_process
        self.json_default = json_default
        self.endpoint_id = "u-" + new_boot_token()
        self._backend: Backend | None = None
        self._owns_backend = True
        self._pending: dict[str, _Gather] = {}
        self._directory = NodeDirectory()
        self._listening_since: float | None = None
        self._request_seq = 0
        self._encoder = protocol.Encoder(self.endpoint_id, self.settings.namespace, self.settings.secret)
        self._receiver = _receiver(self.settings)
        self._heard = asyncio.Event()  #: set by every heartbeat heard (verified or not)
        #: True once a node that fits this publisher was heard, or it listened long enough to know none
        #: runs: the first publish waits until then (:meth:`_meet_nodes`)
        self._met = False
        #: the node's own ServerUtil: that node is live, so nothing to wait for and never NoLiveNodes
        self._in_node = False
        #: which targets keep a history; what this publisher's history settings are (vs. the nodes')
        self._policy = self.settings.policy
        self._history_on = self._policy.enabled
        self._history_settings = history_api.announced(self.settings)
        #: the continuity store (history), connected on first use (at connect() when history is on)
        self._store: HistoryStore | None = None
        self._owns_store = True
        self._store_lock = asyncio.Lock()
        #: keyed calls of this ServerUtil on their way: a repeat waits for the first's result
        self._inflight: dict[str, asyncio.Future[Any]] = {}

    @property
    def dropped(self) -> Counter[str]:
        """Messages received on the inbox or the heartbeat address that were dropped, by reason."""
        return self._receiver.dropped

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def from_env(
        cls,
        environ: dict[str, str] | None = None,
        *,
        in_process: bool = False,
        json_default: protocol.JsonDefault | None = None,
    ) -> Self:
        """A ServerUtil configured by the FANOUT_* environment variables (see the README)."""
        return cls(settings=Settings.from_env(environ), in_process=in_process, json_default=json_default)

    @classmethod
    def attached(
        cls,
        settings: Settings,
        backend: Backend,
        endpoint_id: str,
        encoder: protocol.Encoder,
        store: HistoryStore | None = None,
    ) -> Self:
        """A ServerUtil that shares an already connected backend and encoder (the node's own), and its
        continuity store when given (else it makes its own on first use; :meth:`disconnect` closes it).

        The owner of the backend decodes what arrives and feeds replies and heartbeats to :meth:`handle`.
        """
        util = cls(settings=settings, in_process=True)
        util.endpoint_id = endpoint_id
        util._encoder = encoder
        util._backend = backend
        util._owns_backend = False
        util._met = util._in_node = True
        if store is not None:
            util._store, util._owns_store = store, False
        return util

    async def connect(self) -> None:
        """Connect to the backend.

        Raises BackendUnavailable if it cannot be reached, ConfigError for ``memory://`` when no node
        runs in this process and ``in_process=True`` was not given (it would reach nobody).
        """
        if self._backend is not None:
            return
        self._refuse_lonely_memory()
        backend = create_backend(self.settings, inbox=self.endpoint_id)
        await backend.connect(self.handle_message)
        self._backend = backend
        try:
            await self.watch_nodes()
            if self._history_on:
                await self._history_store()
        except BaseException:
            await self.disconnect()
            raise

    async def _history_store(self) -> HistoryStore:
        """The continuity store, connected on first use.

        Raises ConfigError when there is none (AMQP without FANOUT_HISTORY_URL), BackendUnavailable when
        it cannot be reached.
        """
        store = self._store
        if store is not None:
            return store
        async with self._store_lock:
            if self._store is None:
                made = create_store(self.settings)
                if made is None:
                    raise ConfigError(
                        "FANOUT_HISTORY_URL",
                        "history needs a store: set FANOUT_HISTORY_URL to a Redis "
                        "(the amqp backend keeps no history)",
                    )
                await made.connect()
                self._store = made
            return self._store

    def _refuse_lonely_memory(self) -> None:
        if self.settings.backend is not BackendKind.MEMORY or self.in_process:
            return
        from .backends.memory import MemoryHub

        if not MemoryHub.named(self.settings.url).serves_nodes():
            raise ConfigError(
                "FANOUT_URL",
                f"{self.settings.url} (the default when FANOUT_URL is not set) reaches only this process, "
                "and no node runs in it: set FANOUT_URL to the broker the nodes use (redis://... or "
                "amqp://...), or pass in_process=True to publish to nodes embedded in this process",
            )

    async def disconnect(self) -> None:
        """Leave the backend; pending requests fail with NotConnected. Idempotent."""
        backend, self._backend = self._backend, None
        self._listening_since = None  # a new link must subscribe to heartbeats again
        for gather in self._pending.values():
            gather.arrived.set()
        store, self._store = self._store, None
        if store is not None and self._owns_store:
            await store.close()
        if backend is not None and self._owns_backend:
            await backend.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.disconnect()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise NotConnected("ServerUtil is not connected: use 'async with ServerUtil(...)'")
        return self._backend

    async def watch_nodes(self) -> None:
        """Listen to the nodes' heartbeats (every call that needs the nodes does this first)."""
        if self._listening_since is None:
            await self.backend.subscribe([naming.HEARTBEAT])
            self._listening_since = asyncio.get_running_loop().time()

    # ------------------------------------------------------------------ incoming

    def handle_message(self, raw: bytes) -> None:
        """Backend callback: vet and decode one message from the inbox or the heartbeat address."""
        command = self._receiver.take_one(raw, time.time())
        if command is not None:
            self.handle(command)
        elif self._receiver.unverified_heartbeats:
            self._heard.set()

    def handle(self, command: Command) -> None:
        """Take a decoded reply, heartbeat or goodbye; other commands are not for a ServerUtil."""
        now = asyncio.get_running_loop().time()
        match command:
            case Reply():
                gather = self._pending.get(command.request_id)
                if gather is not None:
                    if command.error is not None:
                        gather.errors[command.node] = command.error
                    elif command.parts == 1:
                        gather.replies[command.node] = command.result
                    else:  # a paged answer: complete once every part is in
                        pages = gather.pages.setdefault(command.node, {})
                        pages[command.part] = command.result
                        if len(pages) == command.parts:
                            gather.replies[command.node] = _join_pages(
                                [pages[i] for i in range(command.parts)]
                            )
                    gather.arrived.set()
            case Heartbeat():
                self._directory.heard(command.node, now)
                self._heard.set()
            case Bye():
                self._directory.gone(command.instance)
                for gather in self._pending.values():
                    gather.arrived.set()
            case _:
                self._receiver.dropped["not-for-serverutil"] += 1

    # ------------------------------------------------------------------ does the cluster match us?

    def _differs(self, node: NodeInfo) -> ConfigMismatch | None:
        """What about this publisher does not match ``node`` (from its heartbeat)."""
        ns = self.settings.namespace
        if node.mode and node.mode != self.settings.mode.value:
            return ConfigMismatch(
                "FANOUT_MODE",
                f"this publisher uses {self.settings.mode.value!r} mode but node {node.node_id} of namespace "
                f"{ns!r} uses {node.mode!r}: its group and flag sends would not reach the right nodes",
            )
        if node.signed and not self.settings.secret:
            return ConfigMismatch(
                "FANOUT_SECRET",
                f"node {node.node_id} of namespace {ns!r} signs its commands and drops unsigned ones, "
                "but this publisher has no FANOUT_SECRET",
            )
        return history_api.mismatch(self._history_settings, node.extra.get("history"), node.node_id, ns)

    def check(self) -> None:
        """Raise :class:`ConfigMismatch` if the nodes heard so far say this publisher does not fit them.

        Every call does this before it publishes. With a secret, heartbeats are verified: any live node
        whose mode differs is believed. Without one, anybody who can publish on the broker can publish a
        heartbeat: the mismatch is raised only when no live node fits this publisher, so one forged
        heartbeat cannot stop every publisher of the namespace while the real nodes fit it.
        """
        self._check_fit(self._directory.live(asyncio.get_running_loop().time()))

    def _check_fit(self, live: dict[str, NodeInfo]) -> None:
        misfits = [problem for info in live.values() if (problem := self._differs(info)) is not None]
        if misfits and (self.settings.secret or len(misfits) == len(live)):
            raise misfits[0]
        unverified = self._receiver.unverified_heartbeats
        if unverified:
            self._check_unverified(unverified)

    def _check_window(self, live: dict[str, NodeInfo]) -> None:
        """A keyed send: raise ConfigMismatch if the nodes apply a key once within another window than
        this publisher keeps it (as :meth:`check`: any verified node, or every node without a secret)."""
        mine = self.settings.idempotency_window
        differ = [
            info
            for info in live.values()
            if isinstance(theirs := info.extra.get("idempotency_window"), int | float) and theirs != mine
        ]
        if differ and (self.settings.secret or len(differ) == len(live)):
            node = differ[0]
            raise ConfigMismatch(
                "FANOUT_IDEMPOTENCY_WINDOW",
                f"this publisher keeps idempotency keys {mine:g}s but node {node.node_id} of namespace "
                f"{self.settings.namespace!r} applies a key once within "
                f"{node.extra['idempotency_window']:g}s: a repeat could be delivered again",
            )

    def _fitting_node_heard(self, now: float) -> bool:
        return any(self._differs(info) is None for info in self._directory.live(now).values())

    async def _meet_nodes(self, wait: float | None = None) -> None:
        """Listen until a node that fits this publisher is heard, or for ``wait`` seconds since this
        ServerUtil subscribed to heartbeats (default 1.5 intervals: long enough to hear every live node).

        A publisher that fits goes on at the first heartbeat of a node; one that does not, or a namespace
        where no node runs, costs the whole wait, once: after it the heartbeats heard tell.
        """
        await self.watch_nodes()
        loop = asyncio.get_running_loop()
        assert self._listening_since is not None
        deadline = self._listening_since + (1.5 * self.settings.heartbeat_interval if wait is None else wait)
        while not self._fitting_node_heard(loop.time()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._heard.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._heard.wait()
            except TimeoutError:
                break
        now = loop.time()
        self._met = self._met or self._fitting_node_heard(now) or self._warm(now)

    def _check_unverified(self, unverified: dict[str, float]) -> None:
        horizon = time.time() - 3 * self.settings.heartbeat_interval
        for instance in [i for i, heard in unverified.items() if heard < horizon]:
            del unverified[instance]
        # a forged heartbeat must not stop a publisher that hears real nodes: only when none is verified
        if unverified and not self._directory.live(asyncio.get_running_loop().time()):
            names = ", ".join(sorted(unverified)[:5])
            raise ConfigMismatch(
                "FANOUT_SECRET",
                f"the nodes of namespace {self.settings.namespace!r} ({names}) send heartbeats this "
                "publisher cannot verify: its FANOUT_SECRET differs from theirs, or only one side has one",
            )

    def live_nodes(self) -> set[str] | None:
        """The instances of the nodes heard alive, or None until this ServerUtil has listened to
        heartbeats long enough (1.5 intervals) to know every live node."""
        infos = self.live_node_infos()
        return None if infos is None else set(infos)

    def live_node_infos(self) -> dict[str, NodeInfo] | None:
        """Like :meth:`live_nodes`, with what each node said of itself in its last heartbeat."""
        now = asyncio.get_running_loop().time()
        if not self._warm(now):
            return None
        return self._directory.live(now)

    @checked
    async def check_cluster(self, timeout: float | None = None) -> int:
        """Wait until a node that fits this publisher is heard (at most 1.5 heartbeat intervals, or
        ``timeout`` seconds), then check that we fit them.

        Returns the number of live nodes. Raises :class:`ConfigMismatch` if this publisher's mode or
        secret differs from theirs, :class:`NoLiveNodes` if none is heard in the namespace. Every first
        publish does the same; the CLI calls it before every command, queries included.
        """
        await self._meet_nodes(timeout)
        live = self._directory.live(asyncio.get_running_loop().time())
        self._check_fit(live)
        if not live:
            raise NoLiveNodes(self.settings.namespace, self.settings.where)
        return len(live)

    # ------------------------------------------------------------------ publishing

    async def _publish(
        self, pairs: Sequence[tuple[Address, Command]], stored: _Stored | None = None, key: str | None = None
    ) -> list[int | None]:
        """Encode and publish ``pairs`` in one go (no other publish of ours can come in between).

        Raises :class:`ConfigMismatch` before publishing if this publisher does not fit the nodes, and
        :class:`NoLiveNodes` after it if no node is live in the namespace and the broker does not say one
        received it (the first publish waits for the nodes' heartbeats first: :meth:`_meet_nodes`). The
        publish goes first so that a broker that is down is reported as such, not as "no live nodes".

        ``stored``: the send goes to history streams (its streams and what it stores in them): appended
        to them and published with its positions, and recoverable even when no node is live (no
        NoLiveNodes).

        ``key``: an idempotency key to claim in the store (:meth:`_publish_keyed`); a stored send's is in
        its ``send``. Raises :class:`~fanout.idempotency.Repeated` when the store has it already.
        """
        if not pairs:
            return []
        if not self._met:
            await self._meet_nodes()
        live = self._directory.live(asyncio.get_running_loop().time())
        self._check_fit(live)
        if key is not None or (stored is not None and stored.send.key is not None):
            self._check_window(live)
        items = []
        now = time.time()
        encode = self._encoder.encode
        limit = self.settings.max_message
        if stored is not None:
            limit -= history_api.positions_room(stored.streams)
        for address, command in pairs:
            message = encode(command, now)
            if len(message) > limit:
                raise MessageTooLarge(f"command of {len(message)} bytes exceeds max_message={limit}")
            items.append((address, message))
        if stored is not None:  # appended to its streams and published with its positions
            if stored.positions is None:
                store = self._store or await self._history_store()
                if store.publishes:  # in one step: the store is the bus (Redis: one script)
                    stored.positions, counts = await store.append_counted(stored.streams, stored.send, items)
                    return counts
                stored.positions = await store.append(stored.streams, stored.send)  # else appended first
            return await self.backend.publish_many(
                [(address, attach_positions(message, stored.positions)) for address, message in items]
            )
        counts = await (self.backend.publish_many(items) if key is None else self._publish_keyed(key, items))
        if not live and not self._in_node and not any(counts):
            raise NoLiveNodes(self.settings.namespace, self.settings.where)
        return counts

    async def _key_store(self) -> HistoryStore | None:
        """Where idempotency keys are kept: the continuity store, or None (AMQP without
        FANOUT_HISTORY_URL: the nodes alone keep them)."""
        if (
            self._store is None
            and self.settings.backend is BackendKind.AMQP
            and not self.settings.history_url
        ):
            return None
        return self._store or await self._history_store()

    async def _publish_keyed(self, key: str, items: list[tuple[Address, bytes]]) -> list[int | None]:
        """Publish a plain keyed send: in the script that claims the key where the store is the bus (one
        Redis server, memory); else after checking the store (the key is kept once published: a crash in
        between makes a repeat that the nodes drop, never a loss); with no store, plainly (the nodes drop
        repeats). Raises Repeated when the store has the key."""
        store = await self._key_store()
        if store is None:
            return await self.backend.publish_many(items)
        if store.atomic_keys:
            return await store.publish_once(key, items)
        if (found := await store.check_key(key)) is not None:
            raise Repeated(found)
        counts = await self.backend.publish_many(items)
        await self._record(key, Outcome(PUBLISHED), ())  # at once (its result is kept when known)
        return counts

    async def _once(
        self,
        key: str,
        ack: bool,
        timeout: float | None,
        first: Callable[[], Awaitable[int | None]],
        again: Callable[[Outcome], Awaitable[int | None]],
        stored: _Stored | None = None,
    ) -> int | None:
        """A keyed call: ``first()`` unless the key was seen, else ``again(outcome)`` (what the first
        returned, or the nodes' answer for the key); then the outcome kept in the store for the window.

        A repeat while this ServerUtil's own first is on its way waits for its result (at most
        ``timeout``, or the publish timeout without ``ack``: else QueryTimeout)."""
        waiting = self._inflight.get(key)
        if waiting is not None:
            bound = (self.settings.query_timeout if timeout is None else timeout) if ack else None
            bound = bound or self.settings.publish_timeout
            try:
                async with asyncio.timeout(bound):
                    found = await asyncio.shield(waiting)
            except TimeoutError:
                raise QueryTimeout("a repeated send (waiting for the first)", [], bound) from None
            if found is not _FAILED and (found is not None or not ack):
                return found if ack else None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        result: int | None = _FAILED
        try:
            try:
                result = await first()
                outcome = Outcome(COUNTED if ack and result is not None else DONE, result if ack else None)
            except Repeated as repeated:
                result = await again(repeated.outcome)
                if repeated.outcome.state != APPENDED:
                    return result
                # the first's entry is published now: kept as done, with its send id and positions
                outcome = Outcome(
                    COUNTED if ack and result is not None else DONE,
                    result if ack else None,
                    repeated.outcome.sid,
                    repeated.outcome.positions,
                )
            if stored is not None and stored.positions is not None:
                outcome = replace(outcome, sid=stored.send.sid, positions=stored.positions)
            if ack or not self._kept_as_published(stored):
                await self._record(key, outcome, stored.streams if stored is not None else ())
            return result
        finally:
            future.set_result(result)
            if self._inflight.get(key) is future:
                del self._inflight[key]

    def _kept_as_published(self, stored: _Stored | None) -> bool:
        """Whether the store already keeps a first send without ``ack`` as published (``p``: all a repeat
        needs), so that keeping it as done would add nothing: a plain send (claimed with its publish, or
        kept right after it), a history send the store published itself."""
        store = self._store
        return store is None or stored is None or store.publishes

    async def _record(self, key: str, outcome: Outcome, streams: tuple[str, ...]) -> None:
        """Keep a keyed call's outcome; if the store fails now, the call still happened: logged only."""
        try:
            store = await self._key_store()
            if store is not None:
                await store.record_key(key, outcome, streams)
        except FanoutError as exc:
            log.warning("the outcome of idempotency key %r was not kept: %s", key, exc)

    def _new_request(self) -> Request:
        self._request_seq += 1
        return Request(f"{self._request_seq:x}.{os.urandom(4).hex()}", self.endpoint_id)

    async def _ask(
        self,
        what: str,
        publishes: Sequence[tuple[Address, Callable[[Request], Command], str | None]],
        *,
        everyone: bool,
        timeout: float | None,
        partial: bool = False,
        stored: _Stored | None = None,
        key: str | None = None,
    ) -> dict[str, Json]:
        """Publish request-carrying commands and gather the replies: node instance -> result.

        ``publishes`` holds (address, build(request), owner) triples; ``everyone`` means every live
        node must answer, else the owners named in the triples. ``stored``: see :meth:`_publish`.
        """
        await self.watch_nodes()
        request = self._new_request()
        owners = None if everyone else frozenset(o for _, _, o in publishes if o is not None)
        gather = self._pending[request.id] = _Gather(owners, asked_at=asyncio.get_running_loop().time())
        try:
            counts = await self._publish(
                [(address, build(request)) for address, build, _ in publishes], stored, key
            )
            for (address, _, owner), count in zip(publishes, counts, strict=True):
                if count == 0 and owner is not None and address.kind is naming.Kind.NODE:
                    gather.unreachable.add(owner)
            if all(c is not None for c in counts):
                gather.receivers = sum(c for c in counts if c is not None)
            await self._wait(
                what, gather, self.settings.query_timeout if timeout is None else timeout, partial
            )
            return gather.replies
        finally:
            del self._pending[request.id]

    async def _wait(self, what: str, gather: _Gather, timeout: float, partial: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._backend is None:
                raise NotConnected(f"{what}: ServerUtil disconnected while waiting")
            if gather.errors:
                node, (kind, message) = next(iter(gather.errors.items()))
                raise remote_error(node, kind, f"{what}: {message}")
            self.check()
            now = loop.time()
            missing = self._missing(gather, now)
            if not missing:
                if not gather.replies and self._nobody_there(gather, now):
                    raise NoLiveNodes(self.settings.namespace, self.settings.where)
                return
            remaining = deadline - now
            if remaining <= 0:
                named = sorted(m for m in missing if m)
                for instance in named:  # it will be heard again at its next heartbeat if it is alive
                    self._directory.gone(instance)
                if partial and gather.replies:
                    return
                if not gather.replies and self._nobody_there(gather, now):
                    raise NoLiveNodes(self.settings.namespace, self.settings.where)
                raise QueryTimeout(what, named, timeout)
            gather.arrived.clear()
            try:
                async with asyncio.timeout(min(remaining, _RECHECK)):
                    await gather.arrived.wait()
            except TimeoutError:
                pass  # re-check who is still alive, then wait again until the deadline

    def _warm(self, now: float) -> bool:
        """Listening to heartbeats long enough (1.5 intervals) to know every live node."""
        return self._listening_since is not None and (
            now - self._listening_since >= 1.5 * self.settings.heartbeat_interval
        )

    def _nobody_there(self, gather: _Gather, now: float) -> bool:
        """No node at all in the namespace: the broker says nobody got the request, or none is heard."""
        if gather.owners is None and gather.receivers == 0:
            return True
        return self._warm(now) and not self._directory.live(now)

    def _missing(self, gather: _Gather, now: float) -> set[str]:
        """Nodes still owing an answer (an empty string stands for an unnamed one)."""
        live = self._directory.live(now)
        warm = self._warm(now)
        if gather.owners is not None:
            owing = set(gather.owners) - gather.replies.keys() - gather.unreachable
            if warm:  # an owner that is not alive will never answer
                owing = {o for o in owing if o in live}
            return owing
        if gather.receivers is not None:
            if len(gather.replies) >= gather.receivers:
                return set()
            owing = set(live) - gather.replies.keys()
            if owing or not warm or now - gather.asked_at < self.settings.heartbeat_interval:
                return owing or {""}
            return set()  # a node got the request and died before answering: it is no longer live
        owing = set(live) - gather.replies.keys()
        return owing if warm or owing else {""}

    # ------------------------------------------------------------------ sends

    @checked
    async def send(
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
        """Send ``data`` to these connections. Returns the number reached with ``ack=True``."""
        return await self._send(
            Target(TargetKind.CLIENTS, names(client_ids, "client_ids")),
            data,
            exclude,
            ack,
            timeout,
            partial,
            idempotency_key,
        )

    @checked
    async def send_by_flag(
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
        """Send ``data`` to every connection bound to these flags."""
        return await self._send(
            Target(TargetKind.FLAGS, names(flags, "flags")),
            data,
            exclude,
            ack,
            timeout,
            partial,
            idempotency_key,
        )

    @checked
    async def send_to_group(
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
        """Send ``data`` to every member of these groups (once each, even if in several)."""
        return await self._send(
            Target(TargetKind.GROUPS, names(groups, "groups")),
            data,
            exclude,
            ack,
            timeout,
            partial,
            idempotency_key,
        )

    @checked
    async def send_to_all(
        self,
        data: object,
        *,
        exclude: Names = (),
        ack: bool = False,
        timeout: float | None = None,
        partial: bool = False,
        idempotency_key: str | None = None,
    ) -> int | None:
        """Send ``data`` to every connection of the cluster."""
        return await self._send(Target.all(), data, exclude, ack, timeout, partial, idempotency_key)

    async def _send(
        self,
        target: Target,
        data: object,
        exclude: Names,
        ack: bool,
        timeout: float | None,
        partial: bool,
        key: str | None = None,
    ) -> int | None:
        payload, binary = encode_payload(data, self.json_default)
        json = not binary and not isinstance(data, str)
        excluded = names(exclude, "exclude")
        streams = self._policy.streams_of(target) if self._history_on else ()
        if streams:
            sid = new_send_id()
            stored_command = Send(target, payload, binary, excluded, json=json, sid=sid, idempotency_key=key)
            stored = _Stored(streams, StoredSend(sid, payload, binary, json, excluded, key))
            if key is None:
                return await self._send_stored(stored_command, stored, ack, timeout, partial)
            return await self._once(
                key,
                ack,
                timeout,
                lambda: self._send_stored(stored_command, stored, ack, timeout, partial),
                lambda outcome: self._again(stored_command, streams, outcome, ack, timeout, partial),
                stored,
            )
        command = Send(target, payload, binary, excluded, json=json, idempotency_key=key)
        if key is None:
            return await self._send_plain(command, ack, timeout, partial)
        return await self._once(
            key,
            ack,
            timeout,
            lambda: self._send_plain(command, ack, timeout, partial, key),
            lambda outcome: self._again(command, (), outcome, ack, timeout, partial),
        )

    async def _send_plain(
        self, command: Send, ack: bool, timeout: float | None, partial: bool, key: str | None = None
    ) -> int | None:
        if ack:
            return await self._count("send", command, timeout, partial, key=key)
        await self._publish(routing.route(command, self.settings.mode), key=key)
        return None

    async def _send_stored(
        self, command: Send, stored: _Stored, ack: bool, timeout: float | None, partial: bool
    ) -> int | None:
        """A send to history streams (``command`` has its send id): appended to them and published with its
        positions. With no node live it is stored all the same and recoverable: no NoLiveNodes (``ack``:
        0)."""
        if ack:
            try:
                return await self._count("send", command, timeout, partial, stored)
            except NoLiveNodes:
                return 0
        await self._publish(routing.route(command, self.settings.mode), stored)
        return None

    async def _again(
        self,
        command: Send,
        streams: tuple[str, ...],
        outcome: Outcome,
        ack: bool,
        timeout: float | None,
        partial: bool,
    ) -> int | None:
        """A repeated key: what the first returned. Published again only when that is unknown - a count
        asked for that the first did not record (yet): the nodes answer for the key, each applying it once
        (those that had the first give its count) - or when the first appended to history but may not
        have published (then with the first's send id and positions, which nodes place, once)."""
        if outcome.count is not None:
            return outcome.count if ack else None
        if not ack and outcome.state != APPENDED:
            return None
        stored = None
        if outcome.sid is not None and outcome.positions is not None:
            command = replace(command, sid=outcome.sid)
            send = StoredSend(outcome.sid, command.payload, command.binary, command.json, command.exclude)
            stored = _Stored(streams, send, outcome.positions)
        if ack:
            try:
                return await self._count("send", command, timeout, partial, stored)
            except NoLiveNodes:
                if stored is None:
                    raise
                return 0
        await self._publish(routing.route(command, self.settings.mode), stored)
        return None

    async def _count(
        self,
        what: str,
        command: Send | Close,
        timeout: float | None,
        partial: bool,
        stored: _Stored | None = None,
        key: str | None = None,
    ) -> int:
        """Publish ``command`` to every node and sum the connections each says it reached."""
        if command.target.kind is not TargetKind.ALL and not command.target.names:
            return 0
        replies = await self._ask(
            what,
            [(naming.ALL, lambda request: _with_request(command, request), None)],
            everyone=True,
            timeout=timeout,
            partial=partial,
            stored=stored,
            key=key,
        )
        return sum(r for r in replies.values() if isinstance(r, int))

    # ------------------------------------------------------------------ closing connections

    @checked
    async def close(
        self,
        client_ids: Names,
        code: int = 1000,
        reason: str = "",
        *,
        data: object = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> int | None:
        """Close these connections, wherever they live; ``data``, when given, is each one's last frame
        (sent before the close). Returns how many were closed (``wait=True``)."""
        ids = names(client_ids, "client_ids")
        owners = routing.split_by_owner(ids)
        last, binary = _last(data, self.json_default)
        if not wait:
            await self._fire_and_forget(Close(Target.clients(*ids), code, reason, last=last, binary=binary))
            return None
        replies = await self._ask(
            "close",
            [
                (
                    routing.owner_address(owner, self.settings.mode),
                    _builder(Close(Target.clients(*mine), code, reason, last=last, binary=binary)),
                    owner,
                )
                for owner, mine in owners.items()
            ],
            everyone=False,
            timeout=timeout,
        )
        return sum(r for r in replies.values() if isinstance(r, int))

    @checked
    async def close_by_flag(
        self,
        flags: Names,
        code: int = 1000,
        reason: str = "",
        *,
        data: object = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> int | None:
        """Close every connection bound to these flags (after ``data``, their last frame, when given).
        Returns how many were closed (``wait=True``)."""
        last, binary = _last(data, self.json_default)
        command = Close(Target.flags(*names(flags, "flags")), code, reason, last=last, binary=binary)
        if not wait:
            await self._fire_and_forget(command)
            return None
        return await self._count("close_by_flag", command, timeout, False)

    @checked
    async def close_guests(
        self,
        older_than: float,
        data: object = None,
        code: int = 1000,
        reason: str = "",
        *,
        timeout: float | None = None,
        partial: bool = False,
    ) -> int:
        """Close every connection of the cluster that has no flag and has been open longer than
        ``older_than`` seconds (after ``data``, its last frame, when given). Returns how many."""
        last, binary = _last(data, self.json_default)
        replies = await self._ask(
            "close_guests",
            [
                (
                    naming.ALL,
                    lambda r: CloseGuests(float(older_than), code, reason, last, binary, r),
                    None,
                )
            ],
            everyone=True,
            timeout=timeout,
            partial=partial,
        )
        return _sum(list(replies.values()))

    # ------------------------------------------------------------------ a payload per recipient

    @checked
    async def send_bulk(
        self, pairs: Iterable[tuple[str, object]], *, idempotency_key: str | None = None
    ) -> None:
        """A different payload per connection: ``pairs`` of (client id, data), each connection getting
        only its own, in order, all in one broker round (one publish per owning node in routing mode).
        ``idempotency_key`` covers the whole call."""
        items = _bulk_items(pairs, self.json_default)
        if self.settings.mode is Mode.FANOUT:
            await self._publish_bulk(
                self._bulk_commands(naming.ALL, TargetKind.CLIENTS, items), idempotency_key
            )
            return
        by_owner: dict[str, list[tuple[str, bytes, bool]]] = {}
        owners: dict[str, str | None] = {}  # a connection usually has several payloads: parse its id once
        for item in items:
            cid = item[0]
            owner = owners[cid] if cid in owners else owners.setdefault(cid, owner_of(cid))
            if owner is not None:
                by_owner.setdefault(owner, []).append(item)
        await self._publish_bulk(
            [
                command
                for owner, mine in by_owner.items()
                for command in self._bulk_commands(naming.node(owner), TargetKind.CLIENTS, mine)
            ],
            idempotency_key,
        )

    async def _publish_bulk(self, commands: list[tuple[Address, Command]], key: str | None) -> None:
        """A bulk call's commands; with a key, each command carries its own (``<key>#<n>``: a node applies
        each once) and the call claims ``key`` (a repeat publishes nothing where the store has it)."""
        if key is None:
            await self._publish(commands)
            return
        if not commands:
            return
        keyed: list[tuple[Address, Command]] = [
            (address, replace(command, idempotency_key=derived(key, str(n))))
            for n, (address, command) in enumerate(commands)
            if isinstance(command, SendBulk)
        ]

        async def first() -> None:
            await self._publish(keyed, key=key)

        async def again(_: Outcome) -> None:
            return None

        await self._once(key, False, None, first, again)

    @checked
    async def send_bulk_by_flag(
        self, pairs: Iterable[tuple[str, object]], *, idempotency_key: str | None = None
    ) -> None:
        """A different payload per flag: ``pairs`` of (flag, data); every connection bound to a flag gets
        that flag's payloads, in order, all in one broker round (one publish per flag in routing mode).

        A flag with a history (``FANOUT_HISTORY``) gets each of its payloads as a send of its own, appended
        to its stream (in order, flags in parallel). ``idempotency_key`` covers the whole call (each of
        those sends gets one derived from it: ``<key>#h<n>``)."""
        stored: dict[str, list[Send]] = {}
        if self._history_on:
            pairs, stored = self._split_stored(list(pairs))
        items = _bulk_items(pairs, self.json_default)  # (every payload encoded before anything is sent)
        if stored:
            await self._send_each_stored(stored, idempotency_key)
        if self.settings.mode is Mode.FANOUT:
            await self._publish_bulk(
                self._bulk_commands(naming.ALL, TargetKind.FLAGS, items), idempotency_key
            )
            return
        by_flag: dict[str, list[tuple[str, bytes, bool]]] = {}
        for item in items:
            by_flag.setdefault(item[0], []).append(item)
        await self._publish_bulk(
            [
                command
                for flag, mine in by_flag.items()
                for command in self._bulk_commands(naming.flag(flag), TargetKind.FLAGS, mine)
            ],
            idempotency_key,
        )

    def _split_stored(
        self, pairs: list[tuple[str, object]]
    ) -> tuple[list[tuple[str, object]], dict[str, list[Send]]]:
        """The pairs whose flag has no history, and the sends of those whose flag has one, per flag."""
        plain: list[tuple[str, object]] = []
        stored: dict[str, list[Send]] = {}
        for name, data in pairs:
            if self._policy.is_history(flag_stream(name)):
                payload, binary = encode_payload(data, self.json_default)
                json = not binary and not isinstance(data, str)
                send = Send(Target.flags(name), payload, binary, json=json, sid=new_send_id())
                stored.setdefault(name, []).append(send)
            else:
                plain.append((name, data))
        return plain, stored

    async def _send_each_stored(self, sends: dict[str, list[Send]], key: str | None = None) -> None:
        """Each flag's sends stored and published one after the other, the flags in parallel (with a key,
        each send keyed ``<key>#h<n>``, numbered in the call's order)."""
        limit = asyncio.Semaphore(_BULK_STORED_AT_ONCE)
        numbers = itertools.count()
        keys = (
            {id(send): derived(key, f"h{next(numbers)}") for name in sends for send in sends[name]}
            if key
            else {}
        )

        async def one(send: Send, streams: tuple[str, ...], key: str | None) -> None:
            stored = _Stored(
                streams, StoredSend(send.sid or "", send.payload, send.binary, send.json, key=key)
            )
            if key is None:
                await self._send_stored(send, stored, False, None, False)
                return
            send = replace(send, idempotency_key=key)
            await self._once(
                key,
                False,
                None,
                lambda: self._send_stored(send, stored, False, None, False),
                lambda outcome: self._again(send, streams, outcome, False, None, False),
                stored,
            )

        async def one_flag(name: str) -> None:
            async with limit:
                for send in sends[name]:
                    await one(send, (flag_stream(name),), keys.get(id(send)))

        await asyncio.gather(*(one_flag(name) for name in sends))

    def _bulk_commands(
        self, address: Address, kind: TargetKind, items: list[tuple[str, bytes, bool]]
    ) -> list[tuple[Address, Command]]:
        """One address's bulk items as SendBulk commands in order, each within the message limit and
        :data:`~fanout.protocol.MAX_NAMES` (a bulk bigger than one message goes out as several, published
        together; the order per connection holds since they share the address)."""
        budget = self.settings.max_message - _BULK_HEADER_ROOM
        commands: list[tuple[Address, Command]] = []
        chunk: list[tuple[str, bytes, bool]] = []
        size = 0
        for item in items:
            # an upper bound of what the item adds to the encoded message: its payload, its name as JSON
            # (at most 6 bytes a character when escaped), its length, its binary flag and separators
            cost = len(item[1]) + 6 * len(item[0]) + 20
            if chunk and (size + cost > budget or len(chunk) == protocol.MAX_NAMES):
                commands.append((address, SendBulk(kind, tuple(chunk))))
                chunk, size = [], 0
            chunk.append(item)
            size += cost
        if chunk:
            commands.append((address, SendBulk(kind, tuple(chunk))))
        return commands

    async def _fire_and_forget(self, command: Send | Close) -> None:
        await self._publish(routing.route(command, self.settings.mode))

    # ------------------------------------------------------------------ membership

    async def _on_owner(
        self,
        what: str,
        client_id: str,
        build: Callable[[Request | None], Command],
        wait: bool,
        timeout: float | None,
    ) -> Json:
        """Publish a command for ``client_id``'s owning node; with ``wait``, return its answer."""
        owner = owner_of(client_id)
        if owner is None:
            return None
        address = routing.owner_address(owner, self.settings.mode)
        if not wait:
            await self._publish([(address, build(None))])
            return None
        replies = await self._ask(what, [(address, build, owner)], everyone=False, timeout=timeout)
        return replies.get(owner)

    @checked
    async def join_group(
        self, client_id: str, groups: Names, *, wait: bool = True, timeout: float | None = None
    ) -> bool | None:
        """Add the connection to these groups, on its node. True if it exists (``wait=True``)."""
        gs = names(groups, "groups")
        found = await self._on_owner(
            "join_group", client_id, lambda r: JoinGroup(client_id, gs, r), wait, timeout
        )
        return bool(found) if wait else None

    @checked
    async def leave_group(
        self, client_id: str, groups: Names, *, wait: bool = True, timeout: float | None = None
    ) -> bool | None:
        """Remove the connection from these groups. True if it exists (``wait=True``)."""
        gs = names(groups, "groups")
        found = await self._on_owner(
            "leave_group", client_id, lambda r: LeaveGroup(client_id, gs, r), wait, timeout
        )
        return bool(found) if wait else None

    @checked
    async def dissolve_group(
        self, group: str, *, wait: bool = True, timeout: float | None = None
    ) -> int | None:
        """Every member of ``group``, on every node, leaves it. Returns how many left (``wait=True``)."""
        if not wait:
            address = naming.ALL if self.settings.mode is Mode.FANOUT else naming.group(group)
            await self._publish([(address, DissolveGroup(group))])
            return None
        replies = await self._ask(
            "dissolve_group",
            [(naming.ALL, lambda r: DissolveGroup(group, r), None)],
            everyone=True,
            timeout=timeout,
        )
        return sum(r for r in replies.values() if isinstance(r, int))

    @checked
    async def bind(
        self,
        client_id: str,
        flag: str,
        replace: bool = True,
        *,
        wait: bool = True,
        timeout: float | None = None,
    ) -> bool | None:
        """Bind the connection to ``flag``, replacing its old flag; with ``replace=False`` only if it has
        none (imi's ``bindNx``). True if it exists, and with ``replace=False`` if it bound (``wait=True``)."""
        found = await self._on_owner(
            "bind", client_id, lambda r: Bind(client_id, flag, r, replace), wait, timeout
        )
        return bool(found) if wait else None

    @checked
    async def unbind(self, client_id: str, *, wait: bool = True, timeout: float | None = None) -> bool | None:
        """Remove the connection's flag. True if the connection exists (``wait=True``)."""
        found = await self._on_owner("unbind", client_id, lambda r: Unbind(client_id, r), wait, timeout)
        return bool(found) if wait else None

    # ------------------------------------------------------------------ sessions

    @checked
    async def set_session(
        self, client_id: str, data: dict[str, Json], *, wait: bool = True, timeout: float | None = None
    ) -> bool | None:
        """Replace the connection's session dict. True if the connection exists (``wait=True``)."""
        return await self._session("set_session", client_id, data, False, wait, timeout)

    @checked
    async def update_session(
        self, client_id: str, data: dict[str, Json], *, wait: bool = True, timeout: float | None = None
    ) -> bool | None:
        """Merge ``data`` into the connection's session. True if the connection exists (``wait=True``)."""
        return await self._session("update_session", client_id, data, True, wait, timeout)

    async def _session(
        self,
        what: str,
        client_id: str,
        data: dict[str, Json],
        merge: bool,
        wait: bool,
        timeout: float | None,
    ) -> bool | None:
        data = session_json(what, data, self.json_default)
        found = await self._on_owner(
            what, client_id, lambda r: SetSession(client_id, data, merge, r), wait, timeout
        )
        return bool(found) if wait else None

    @checked
    async def get_session(self, client_id: str, *, timeout: float | None = None) -> dict[str, Json]:
        """The connection's session dict; ``{}`` if it has none or does not exist."""
        found = await self._query_owner(QueryKind.SESSION, client_id, timeout)
        return found if isinstance(found, dict) else {}

    # ------------------------------------------------------------------ queries

    async def _query_owner(
        self, kind: QueryKind, client_id: str, timeout: float | None, args: tuple[str, ...] = ()
    ) -> Json:
        owner = owner_of(client_id)
        if owner is None:
            return None
        address = routing.owner_address(owner, self.settings.mode)
        replies = await self._ask(
            kind.value,
            [(address, lambda r: Query(kind, r, client_id, args), owner)],
            everyone=False,
            timeout=timeout,
        )
        return replies.get(owner)

    async def _query_all(
        self, kind: QueryKind, arg: str, timeout: float | None, partial: bool, args: tuple[str, ...] = ()
    ) -> list[Json]:
        replies = await self._ask(
            kind.value,
            [(naming.ALL, lambda r: Query(kind, r, arg, args), None)],
            everyone=True,
            timeout=timeout,
            partial=partial,
        )
        return list(replies.values())

    @checked
    async def exists(self, client_id: str, *, timeout: float | None = None) -> bool:
        """Whether the connection is open somewhere in the cluster (``False`` for an unknown id)."""
        return bool(await self._query_owner(QueryKind.EXISTS, client_id, timeout))

    @checked
    async def get_flag(self, client_id: str, *, timeout: float | None = None) -> str | None:
        """The flag the connection is bound to, or None."""
        found = await self._query_owner(QueryKind.FLAG_OF, client_id, timeout)
        return found if isinstance(found, str) else None

    @checked
    async def flag_exists(self, flag: str, *, timeout: float | None = None, partial: bool = False) -> bool:
        """Whether any connection in the cluster is bound to ``flag``."""
        return any(await self._query_all(QueryKind.FLAG_EXISTS, flag, timeout, partial))

    @checked
    async def get_client_ids_by_flag(
        self, flag: str, *, timeout: float | None = None, partial: bool = False
    ) -> list[str]:
        """Client ids of every connection bound to ``flag``."""
        return _concat(await self._query_all(QueryKind.FLAG_CLIENTS, flag, timeout, partial))

    @checked
    async def get_connection_count(self, *, timeout: float | None = None, partial: bool = False) -> int:
        """Open connections in the whole cluster."""
        return _sum(await self._query_all(QueryKind.CONNECTIONS, "", timeout, partial))

    @checked
    async def get_group_count(
        self, group: str, *, timeout: float | None = None, partial: bool = False
    ) -> int:
        """Members of ``group`` in the whole cluster."""
        return _sum(await self._query_all(QueryKind.GROUP_COUNT, group, timeout, partial))

    @checked
    async def get_group_client_ids(
        self, group: str, *, timeout: float | None = None, partial: bool = False
    ) -> list[str]:
        """Client ids of every member of ``group``."""
        return _concat(await self._query_all(QueryKind.GROUP_CLIENTS, group, timeout, partial))

    @checked
    async def get_groups(self, *, timeout: float | None = None, partial: bool = False) -> list[str]:
        """Every group with at least one member, sorted."""
        return sorted(set(_concat(await self._query_all(QueryKind.GROUPS, "", timeout, partial))))

    @checked
    async def is_in_group(self, client_id: str, group: str, *, timeout: float | None = None) -> bool:
        """Whether the connection is a member of ``group``."""
        return bool(await self._query_owner(QueryKind.IN_GROUP, client_id, timeout, (group,)))

    @checked
    async def get_group_flags(
        self, group: str, *, timeout: float | None = None, partial: bool = False
    ) -> list[str]:
        """The distinct flags (users) among the members of ``group``, sorted."""
        return sorted(set(_concat(await self._query_all(QueryKind.GROUP_FLAGS, group, timeout, partial))))

    @checked
    async def get_group_flag_count(
        self, group: str, *, timeout: float | None = None, partial: bool = False
    ) -> int:
        """How many distinct flags (users) the members of ``group`` have."""
        return len(await self.get_group_flags(group, timeout=timeout, partial=partial))

    @checked
    async def get_flags(self, *, timeout: float | None = None, partial: bool = False) -> list[str]:
        """Every flag bound anywhere in the cluster, sorted."""
        return sorted(set(_concat(await self._query_all(QueryKind.FLAGS, "", timeout, partial))))

    @checked
    async def get_flag_count(self, *, timeout: float | None = None, partial: bool = False) -> int:
        """How many distinct flags are bound in the cluster."""
        return len(await self.get_flags(timeout=timeout, partial=partial))

    @checked
    async def get_group_sessions(
        self, group: str, *, timeout: float | None = None, partial: bool = False
    ) -> dict[str, dict[str, Json]]:
        """``{client id: session}`` of every member of ``group``."""
        out: dict[str, dict[str, Json]] = {}
        for answer in await self._query_all(QueryKind.GROUP_SESSIONS, group, timeout, partial):
            if isinstance(answer, dict):
                out.update({k: v for k, v in answer.items() if isinstance(v, dict)})
        return out

    @checked
    async def get_client_ids_by_flags(
        self, flags: Names, *, timeout: float | None = None, partial: bool = False
    ) -> dict[str, list[str]]:
        """``{flag: [client ids]}`` for these flags, in one round (flags with no connection: ``[]``)."""
        wanted = names(flags, "flags")
        out: dict[str, list[str]] = {flag: [] for flag in wanted}
        if wanted:
            for answer in await self._query_all(QueryKind.FLAGS_CLIENTS, "", timeout, partial, wanted):
                if isinstance(answer, dict):
                    for flag, ids in answer.items():
                        if flag in out and isinstance(ids, list):
                            out[flag].extend(i for i in ids if isinstance(i, str))
        return {flag: sorted(ids) for flag, ids in out.items()}

    @checked
    async def get_presence(
        self, group: str, *, timeout: float | None = None, partial: bool = False
    ) -> dict[str, int]:
        """``{flag: number of that flag's connections in group}`` across the cluster."""
        counts: Counter[str] = Counter()
        for answer in await self._query_all(QueryKind.PRESENCE, group, timeout, partial):
            if isinstance(answer, dict):
                counts.update(
                    {k: v for k, v in answer.items() if isinstance(v, int) and not isinstance(v, bool)}
                )
        return dict(sorted(counts.items()))

    @checked
    async def get_nodes(self, *, timeout: float | None = None, partial: bool = False) -> list[NodeRecord]:
        """A record per live node (``node_id``, ``instance``, ``connections``, ...), sorted by node id."""
        records = [
            r for r in await self._query_all(QueryKind.NODE, "", timeout, partial) if isinstance(r, dict)
        ]
        return cast(
            list[NodeRecord], sorted(records, key=lambda r: (str(r.get("node_id")), str(r.get("instance"))))
        )

    # ------------------------------------------------------------------ history (continuity)

    @checked
    async def get_history(self, stream: str, since: int | None = None, limit: int = 100) -> dict[str, Json]:
        """A stream's ``{"epoch", "offset", "entries": [{"offset", "data"}, ...]}``: the entries after
        offset ``since``, oldest first, at most ``limit`` (without ``since``: the latest ``limit``), each
        ``data`` as it was sent (``str``, ``bytes`` or the JSON value). Needs only the store, no node."""
        _ = self.backend  # NotConnected outside ``async with``
        store = await self._history_store()
        return history_api.answer(await store.read(stream, since, limit))

    @checked
    async def remove_history(self, stream: str) -> None:
        """Forget a stream's entries and epoch (its next send starts a new epoch: clients that come back
        with the old one are told ``recovered: false``). Needs only the store, no node."""
        _ = self.backend
        store = await self._history_store()
        await store.remove(stream)


# ---------------------------------------------------------------------- helpers


def _last(data: object, json_default: protocol.JsonDefault | None) -> tuple[bytes | None, bool]:
    """A close's last frame: ``None`` for no data, else the payload as a send would make it."""
    return (None, False) if data is None else encode_payload(data, json_default)


_BULK_HEADER_ROOM = 1024  #: envelope, signature and the bulk header's fixed fields
#: flags of a bulk with history sent at once (each flag's payloads one after the other)
_BULK_STORED_AT_ONCE = 256


def _bulk_items(
    pairs: Iterable[tuple[str, object]], json_default: protocol.JsonDefault | None
) -> list[tuple[str, bytes, bool]]:
    """The (name, data) pairs (checked by the call's arguments) with their data encoded."""
    return [(name, *encode_payload(data, json_default)) for name, data in pairs]


def _with_request(command: Send | Close, request: Request) -> Send | Close:
    return replace(command, request=request)


def _builder(command: Close) -> Callable[[Request], Command]:
    return lambda request: _with_request(command, request)


def _sum(values: list[Json]) -> int:
    return sum(v for v in values if isinstance(v, int) and not isinstance(v, bool))


def _concat(values: list[Json]) -> list[str]:
    return [item for value in values if isinstance(value, list) for item in value if isinstance(item, str)]


def _receiver(settings: Settings) -> Receiver:
    return Receiver(
        secret=settings.secret,
        namespace=settings.namespace,
        max_message=settings.max_message,
        replay_window=settings.replay_window,
    )


def _join_pages(pages: list[Json]) -> Json:
    """A node's paged answer put back together: lists concatenated, objects merged."""
    if all(isinstance(page, list) for page in pages):
        return [item for page in pages for item in page]
    joined: dict[str, Json] = {}
    for page in pages:
        if isinstance(page, dict):
            joined.update(page)
    return joined
