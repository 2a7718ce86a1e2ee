"""The continuity store on Redis and Redis Cluster (the contract: :mod:`fanout.backends.store`).

Layout (``<ch>`` is the channel the stream's target is published on in routing mode, e.g.
``fanout:g:lobby``; ``all`` -> ``fanout:all``; the hash tag puts a stream's keys in the slot of its
sharded channel on Redis Cluster):

* ``{<ch>}:hm``: a hash, ``e`` the epoch and ``o`` the top offset; kept :data:`~fanout.history.META_TTL`
  (or ``history_ttl`` if longer) after the stream's last send or position read.
* ``{<ch>}:hl``: a Redis STREAM of the entries, id ``<offset>-1``, fields ``d`` (the payload) and ``m``
  (JSON ``{"sid", "b", "j", "x", "p"}``: the send's id, binary, JSON, its exclusions, and its offset in
  every stream of the send - this one included; :meth:`RedisStore.read` leaves it out); trimmed to
  exactly ``history_size`` entries, expiring ``history_ttl`` after the last send.
* ``<ns>:r:<token>``: a resume record, the flag marker then the record (no hash tag: records spread over
  the cluster, and no command takes two of them); ``-`` once claimed or dropped (a tombstone, so that the
  old connection's later writes cannot bring it back, while a record Redis lost is written again).

A send is **one Lua script** (``_SEND``) on a single server, and on a cluster when all its streams share a
slot: the epoch is created when missing (from a candidate the publisher draws), each offset is HINCRBY'd,
the entry is XADDed to every stream with the full positions, trimmed and expired, then (when the store
:attr:`~RedisStore.publishes`) each message is PUBLISHed (SPUBLISH on a cluster in routing mode) with the
positions line built in the script. Redis runs one script at a time, so on one stream the offset order
is the publication order. On a cluster a message whose channel lives in another slot than the script's
keys (the ``all`` copy of an ``ack=True`` send, a group without history) is SPUBLISHed right after the
script, with the same positions line.

A send whose streams are in several slots of a cluster takes two phases: ``_POSITIONS`` with ``incr``
reserves the offsets slot by slot, then ``_APPEND`` per slot appends the entries (with the full
positions) and publishes that slot's messages. Another publisher may append a later offset of a stream in
between: ``_APPEND`` then puts the entry in its place (the later ones are taken out and put back, the
stream's last id set back with XSETID). A publisher that dies between the phases leaves a hole: an
offset that was given but never written (the nodes' positioning skips it after a short retry).

In fanout mode on a cluster the store does not publish (``publishes`` is false): the backend publishes
every message on one primary (so one publisher's messages keep their order), after the append.

Sends on a plain ``redis://`` server go on a connection of their own
(:class:`~fanout.backends.redis_publisher.PublishConnection`, the backend's publishing connection):
each EVALSHA is written at once, in call order, and its one bulk-string reply read back in order, so
concurrent sends are pipelined and keep their order. So are, there, the history reads (their replies'
nested arrays parsed as they arrive) and the resume records' writes and claims (a reconnect storm makes
thousands at once): packed commands on the same connection, in call order with the sends.

Sends on a cluster: on a plain ``redis+cluster://`` a single-slot send's EVALSHA (and the SPUBLISH of a
message outside its slot) goes the same way on a connection to the master of its slot (a *link*, one per
master, opened on demand with the send script loaded; the master as redis-py's slot map has it). Redis
Cluster checks a command's slot before running it, so a MOVED, ASK, TRYAGAIN or CLUSTERDOWN reply means it
did not run: that call then goes through redis-py, which follows the redirection and updates its slot map
(the next calls look the slot up again), and the slot's later calls follow it there until it is answered,
so that one publisher's concurrent sends to a slot keep their order. A link that cannot be opened sends
the call through redis-py too. A link lost with commands on it fails them (``BackendUnavailable``: they
may have run, so they are never sent again; a retry with an idempotency key is safe) and the slot map is
refreshed before the next link is opened; one whose reply does not come within ``publish_timeout`` is
closed. Sends over several slots (two phases) take redis-py's path, and so do TLS clusters.

Everything else (positions, removals, idempotency keys' checks and records; on a cluster or TLS also
reads and resume records; TLS sends) goes through redis-py, whose ``register_script`` loads a script
when Redis does not know it (NOSCRIPT); at most :data:`POOL_CALLS` of those at once (the others wait
their turn: redis-py's pool raises ``MaxConnectionsError`` rather than wait once ``max_connections`` are
in use, 100 by default in recent releases, and a node resuming hundreds of clients at once makes more
calls than that). Errors become :mod:`fanout.exceptions` through the Redis backend's table:
:class:`BackendUnavailable` when Redis does not answer within ``publish_timeout``,
:class:`BackendError` when it refuses.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from ..commands import TargetKind
from ..config import Mode, Settings, redact, redact_url
from ..exceptions import BackendError, BackendUnavailable, FanoutError, NotConnected
from ..history import META_TTL, Entry, Page, Positions, attach_positions, new_epoch, parse_stream
from ..idempotency import APPENDED, PUBLISHED, Outcome, Repeated, encode_outcome, parse_outcome
from ..naming import ALL, Address, flag, group, safe_segment
from .redis import _REFUSALS, _TRANSLATION, _no_retry, _parse_target
from .redis_publisher import PublishConnection, pack
from .store import TOMBSTONE_SLACK, HistoryStore, StoredSend

_T = TypeVar("_T")

# --------------------------------------------------------------------------- the scripts

#: one send: KEYS hm1, hl1, hm2, hl2, ... [, its idempotency key]; ARGV epoch candidate, size, ttl ms,
#: meta ttl ms, n, m, sid, payload, the meta's '"b":..,"j":..' part, the exclusions as JSON, the publish
#: command, n stream names, m (channel, message) pairs [, the key's window ms [, its state: 'a' when other
#: messages are published after the script]]. Answers '<positions JSON>\n<count> <count> ...', or 'r<what
#: the key holds>' when the key is there (nothing done).
_SEND = """
local candidate, size, ttl, mttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local n, m = tonumber(ARGV[5]), tonumber(ARGV[6])
local ik = KEYS[2 * n + 1]
if ik then
  local prior = redis.call('GET', ik)
  if prior then return 'r' .. prior end
end
local line, offs, offsets = {}, {}, {}
for i = 1, n do
  local hm, hl = KEYS[2 * i - 1], KEYS[2 * i]
  local epoch = redis.call('HGET', hm, 'e')
  if not epoch then
    epoch = candidate
    redis.call('DEL', hl)
    redis.call('HSET', hm, 'e', epoch)
  end
  local offset = redis.call('HINCRBY', hm, 'o', 1)
  redis.call('PEXPIRE', hm, mttl)
  local name = cjson.encode(ARGV[11 + i])
  offsets[i] = offset
  line[i] = name .. ':[' .. offset .. ',' .. cjson.encode(epoch) .. ']'
  offs[i] = name .. ':' .. offset
end
local positions = '{' .. table.concat(line, ',') .. '}'
local meta = '{"sid":' .. cjson.encode(ARGV[7]) .. ',' .. ARGV[9] .. ',"x":' .. ARGV[10]
  .. ',"p":{' .. table.concat(offs, ',') .. '}}'
for i = 1, n do
  redis.call('XADD', KEYS[2 * i], 'MAXLEN', size, offsets[i] .. '-1', 'd', ARGV[8], 'm', meta)
  redis.call('PEXPIRE', KEYS[2 * i], ttl)
end
if ik then
  local state = ARGV[13 + n + 2 * m]
  if not state then
    state = 'a'
    if m > 0 then state = 'p' end
  end
  redis.call('SET', ik, state .. '\\n' .. ARGV[7] .. '\\n' .. positions, 'PX', ARGV[12 + n + 2 * m])
end
local counts = {}
if m > 0 then
  local head = 'h1 ' .. positions .. '\\n'
  local base = 11 + n
  for k = 1, m do
    counts[k] = redis.call(ARGV[11], ARGV[base + 2 * k - 1], head .. ARGV[base + 2 * k])
  end
end
return positions .. '\\n' .. table.concat(counts, ' ')
"""

#: positions of streams (one slot): KEYS hm1, hl1, ...; ARGV epoch candidate, meta ttl ms, incr (1: reserve
#: the next offset of each), n stream names. Answers '"<stream>":[<offset>,"<epoch>"],...'.
_POSITIONS = """
local candidate, mttl, incr = ARGV[1], ARGV[2], ARGV[3] == '1'
local line = {}
for i = 1, #KEYS / 2 do
  local hm, hl = KEYS[2 * i - 1], KEYS[2 * i]
  local epoch = redis.call('HGET', hm, 'e')
  if not epoch then
    epoch = candidate
    redis.call('DEL', hl)
    redis.call('HSET', hm, 'e', epoch, 'o', 0)
  end
  local offset
  if incr then
    offset = redis.call('HINCRBY', hm, 'o', 1)
  else
    offset = tonumber(redis.call('HGET', hm, 'o') or '0')
  end
  redis.call('PEXPIRE', hm, mttl)
  line[i] = cjson.encode(ARGV[3 + i]) .. ':[' .. offset .. ',' .. cjson.encode(epoch) .. ']'
end
return table.concat(line, ',')
"""

#: phase 2 of a multi-slot send (one slot): KEYS hm1, hl1, ...; ARGV size, ttl ms, meta ttl ms, m, payload,
#: meta, positions line, publish command, then per stream its offset and epoch, then m (channel, message)
#: pairs. An entry whose stream changed epoch since phase 1 is dropped. Answers '<count> <count> ...'.
_APPEND = """
local size, ttl, mttl, m = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local payload, meta, head, cmd = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local n = #KEYS / 2
for i = 1, n do
  local hm, hl = KEYS[2 * i - 1], KEYS[2 * i]
  local offset, epoch = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  if redis.call('HGET', hm, 'e') == epoch then
    redis.call('PEXPIRE', hm, mttl)
    local id = offset .. '-1'
    local top = redis.call('XREVRANGE', hl, '+', '-', 'COUNT', 1)
    if #top == 0 or tonumber(string.match(top[1][1], '^(%d+)')) < tonumber(offset) then
      redis.call('XADD', hl, 'MAXLEN', size, id, 'd', payload, 'm', meta)
    else
      local later = redis.call('XRANGE', hl, offset .. '-0', '+')
      if later[1][1] ~= id then
        for _, entry in ipairs(later) do
          redis.call('XDEL', hl, entry[1])
        end
        redis.call('XSETID', hl, offset .. '-0')
        redis.call('XADD', hl, id, 'd', payload, 'm', meta)
        for _, entry in ipairs(later) do
          redis.call('XADD', hl, entry[1], unpack(entry[2]))
        end
        redis.call('XTRIM', hl, 'MAXLEN', size)
      end
    end
    redis.call('PEXPIRE', hl, ttl)
  end
end
local counts = {}
local base = 8 + 2 * n
for k = 1, m do
  counts[k] = redis.call(cmd, ARGV[base + 2 * k - 1], head .. ARGV[base + 2 * k])
end
return table.concat(counts, ' ')
"""

#: a page: KEYS hm, hl; ARGV epoch candidate, meta ttl ms, since + 1 ('' = the latest), limit.
#: Answers {epoch, top offset, id of the oldest entry kept or '', entries}.
_READ = """
local epoch = redis.call('HGET', KEYS[1], 'e')
local top = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  top = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
end
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first = ''
if #oldest > 0 then first = oldest[1][1] end
local limit = tonumber(ARGV[4])
local entries = {}
if limit > 0 then
  if ARGV[3] == '' then
    entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[2], ARGV[3] .. '-0', '+', 'COUNT', limit)
  end
end
return {epoch, top, first, entries}
"""

#: take a resume record if it was saved with this flag marker, leaving a tombstone: KEYS record; ARGV
#: marker, the tombstone's ttl (ms)
_CLAIM = """
local record = redis.call('GET', KEYS[1])
if not record or string.sub(record, 1, #ARGV[1]) ~= ARGV[1] then
  return false
end
redis.call('SET', KEYS[1], '-', 'PX', ARGV[2])
return string.sub(record, #ARGV[1] + 1)
"""

#: write a resume record unless its token was claimed or dropped (a tombstone): KEYS record; ARGV the
#: record, its ttl (ms)
_SAVE = """
if redis.call('GET', KEYS[1]) == '-' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

#: a plain send with an idempotency key: KEYS the key; ARGV its window ms, the publish command, then
#: (channel, message) pairs. Answers '<count> <count> ...', or 'r<what the key holds>' (nothing published).
_ONCE = """
local prior = redis.call('GET', KEYS[1])
if prior then return 'r' .. prior end
redis.call('SET', KEYS[1], 'p', 'PX', ARGV[1])
local counts = {}
for k = 1, (#ARGV - 2) / 2 do
  counts[k] = redis.call(ARGV[2], ARGV[1 + 2 * k], ARGV[2 + 2 * k])
end
return table.concat(counts, ' ')
"""

#: keep a key's outcome: KEYS the key; ARGV the outcome, the window ms (when the key is gone)
_RECORD = """
if not redis.call('SET', KEYS[1], ARGV[1], 'XX', 'KEEPTTL') then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""

_SCRIPTS = {
    "once": _ONCE,
    "record": _RECORD,
    "send": _SEND,
    "positions": _POSITIONS,
    "append": _APPEND,
    "read": _READ,
    "claim": _CLAIM,
    "save": _SAVE,
}
#: the send script's SHA1, as EVALSHA names it (the sends' connections pack their EVALSHA with it)
SEND_SHA = hashlib.sha1(_SEND.encode()).hexdigest()

#: the script errors that mean "Redis does not know it (any more)": load it and run it again
_NOSCRIPT = "NOSCRIPT"
#: a cluster's error replies for a command that did not run there (redis-py's path follows them)
_REDIRECTED = frozenset({"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"})
#: the scripts a cluster's sends' links load when they open
_LINK_SCRIPTS = ("send",)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


#: send shapes (streams, messages) whose packed parts a store keeps (beyond: forgotten, packed again)
_PACKED_SHAPES = 10_000
#: redis-py calls of one store at once (below redis-py's default pool size, 100 per server)
POOL_CALLS = 64


def _bulk(part: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(part), part)


#: the send scripts' ``"b":..,"j":..`` argument (the entry's meta), by (binary, json)
_KIND = {
    (binary, json): b'"b":%s,"j":%s' % (str(binary).lower().encode(), str(json).lower().encode())
    for binary in (False, True)
    for json in (False, True)
}
#: the same as RESP bulk strings
_KIND_BULKS = {kind: _bulk(text) for kind, text in _KIND.items()}


def _text(script: str | bytes | memoryview) -> bytes:
    return script.encode() if isinstance(script, str) else bytes(script)


def _marker(flag_name: str | None) -> bytes:
    """What a resume record starts with: its flag, length-prefixed (no flag can be a prefix of another)."""
    if flag_name is None:
        return b"g\n"
    raw = flag_name.encode("utf-8", "surrogatepass")
    return b"f%d:%s\n" % (len(raw), raw)


def _positions(fragments: Iterable[bytes]) -> Positions:
    """``{stream: (epoch, offset)}`` from the scripts' ``"<stream>":[offset,"epoch"]`` fragments."""
    raw: dict[str, list[Any]] = orjson.loads(b"{" + b",".join(fragments) + b"}")
    return {stream: (str(value[1]), int(value[0])) for stream, value in raw.items()}


def _counts(text: bytes) -> list[int | None]:
    return [int(count) for count in text.split()]


def _repeated(reply: bytes) -> None:
    """Raise Repeated if a script answered that its idempotency key was there (``r<outcome>``)."""
    if reply[:1] == b"r":
        raise Repeated(parse_outcome(reply[1:]))


def _parse_send(reply: Any) -> tuple[Positions, list[int | None]]:
    """The send script's answer: ``<positions JSON>\n<count> <count> ...`` (or ``r<outcome>``)."""
    reply = bytes(reply)
    _repeated(reply)
    line, _, counts = reply.partition(b"\n")
    raw: dict[str, list[Any]] = orjson.loads(line)  # the script wrote each as [<number>, <string>]
    return {stream: (epoch, offset) for stream, (offset, epoch) in raw.items()}, _counts(counts)


def _offset_of(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


class RedisStore(HistoryStore):
    """History and resume records on Redis (``redis://``, ``rediss://``) or Redis Cluster
    (``redis+cluster://``); see the module docstring."""

    def __init__(self, settings: Settings, *, url: str, publishes: bool) -> None:
        super().__init__(settings)
        self.url = url
        self._target = _parse_target(url)
        self._sharded = self._target.cluster and settings.mode is Mode.ROUTING
        # fanout mode on a cluster: the backend publishes on one primary, to keep a publisher's order
        self.publishes = publishes and (self._sharded or not self._target.cluster)
        self._command = b"SPUBLISH" if self._sharded else b"PUBLISH"
        #: a plain send's key checked in the script that publishes it: one server that is the bus
        self.atomic_keys = self.publishes and not self._target.cluster
        self._window = str(_ms(settings.idempotency_window)).encode()
        self._connect_timeout = min(5.0, settings.publish_timeout)
        self._size = str(settings.history_size).encode()
        self._ttl = str(_ms(settings.history_ttl)).encode()
        self._meta_ttl = str(_ms(max(META_TTL, settings.history_ttl))).encode()
        self._tombstone_ms = str(_ms(settings.resume_ttl + TOMBSTONE_SLACK)).encode()
        self._client: aioredis.Redis | None = None
        self._cluster: RedisCluster | None = None
        self._scripts: dict[str, AsyncScript] = {}
        #: plain redis:// server: the sends' own connection (see the module docstring), opened on demand
        self._fast = not self._target.cluster and not self._target.tls
        self._raw: PublishConnection | None = None
        self._raw_lock = asyncio.Lock()
        #: plain redis+cluster://: a sends' connection per master (see "Sends on a cluster" above)
        self._cluster_fast = self._target.cluster and not self._target.tls
        self._links: dict[str, PublishConnection] = {}  #: by the master's name (host:port)
        self._slot_links: dict[int, PublishConnection] = {}  #: the link of a slot, as last looked up
        self._links_lock = asyncio.Lock()  #: held while a link is looked up and opened
        self._refresh_map = False  #: a link was lost: refresh the slot map before the next lookup
        #: slots with calls on redis-py's path (after a redirection): the slot's later calls follow them
        self._slow: dict[int, int] = {}
        self._slow_locks: dict[int, asyncio.Lock] = {}
        #: calls of ours that went to redis-py after the fast path was refused (MOVED, ASK, no link)
        self.redirected = 0
        #: the send script's EVALSHA and sha (the SHA1 of its text), and its constant arguments (size, ttl,
        #: meta ttl), packed
        self._evalsha_send = _bulk(b"EVALSHA") + _bulk(SEND_SHA.encode())
        self._constants = b"".join(map(_bulk, (self._size, self._ttl, self._meta_ttl)))
        self._send_shapes: dict[tuple[tuple[str, ...], int, bool, bool], tuple[bytes, bytes, bytes]] = {}
        self._db = 0 if self._target.cluster else int(str(dict(parse_url(url)).get("db") or 0))
        self._connect_lock = asyncio.Lock()
        self._closed = False
        #: at most this many cluster calls at once for one call of ours (a bulk's many streams)
        self._fanout_limit = 64
        #: at most POOL_CALLS redis-py calls at once, whoever makes them
        self._pool_calls = asyncio.Semaphore(POOL_CALLS)

    # ------------------------------------------------------------------ helpers

    @property
    def where(self) -> str:
        return redact_url(self.url)

    def _error(self, exc: BaseException, what: str) -> BackendError:
        """Our exception for a redis-py one (the Redis backend's table), password taken out."""
        if isinstance(exc, BackendError):
            return exc
        for classes, ours, template in _TRANSLATION:
            if isinstance(exc, classes):
                error = ours(redact(template.format(where=self.where, what=what, exc=exc), self.url))
                error.__cause__ = exc
                return error
        raise AssertionError("unreachable: the last row matches every Exception")

    async def _bounded(self, what: str, call: Awaitable[_T]) -> _T:
        """``call`` within ``publish_timeout``, its errors translated."""
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                return await call
        except TimeoutError as exc:
            raise self._timed_out(what, exc) from exc
        except FanoutError:
            raise
        except Exception as exc:
            raise self._error(exc, what) from exc

    def _timed_out(self, what: str, exc: TimeoutError) -> BackendUnavailable:
        if self._raw is not None:  # a hung server: fail what waits on it, start afresh next time
            raw, self._raw = self._raw, None
            raw.close()
        return BackendUnavailable(
            f"Redis at {self.where} did not answer {what} within {self.settings.publish_timeout:g}s"
        )

    def channel(self, stream: str) -> str:
        """The channel of ``stream``'s target in routing mode (its keys' hash tag)."""
        kind, name = parse_stream(stream)
        address = ALL if kind is TargetKind.ALL else group(name) if kind is TargetKind.GROUPS else flag(name)
        return address.channel(self.settings.namespace)

    def keys(self, stream: str) -> tuple[str, str]:
        """The epoch/offset hash and the entries' stream of ``stream``."""
        tag = "{" + self.channel(stream) + "}"
        return tag + ":hm", tag + ":hl"

    def _resume_key(self, token: str) -> str:
        return f"{self.settings.namespace}:r:{safe_segment(token)}"

    def _slot_of(self, stream: str) -> int:
        return key_slot(self.channel(stream).encode())

    # ------------------------------------------------------------------ connect / close

    async def connect(self) -> None:
        """Connect and check that Redis answers. Raises BackendUnavailable / BackendError."""
        if self._closed:
            raise NotConnected("the history store was closed")
        async with self._connect_lock:
            if self._client is not None or self._cluster is not None:
                return
            try:
                await self._bounded("the connection", self._open())
            except BaseException:
                await self._close_clients()
                raise

    async def _open(self) -> None:
        options: dict[str, Any] = {
            "retry": _no_retry(),
            "socket_connect_timeout": self._connect_timeout,
            "socket_timeout": self.settings.publish_timeout,
            "health_check_interval": 0,
        }
        if self._target.cluster:
            startup: dict[str, Any] = dict(parse_url(self._target.node_url(*self._target.nodes[0])))
            for key in ("host", "port", "db", "connection_class"):
                startup.pop(key, None)
            startup.update(options, ssl=self._target.tls)
            cluster = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self._target.nodes], **startup
            )
            self._cluster = cluster
            try:
                await cluster.initialize()
            except (RedisError, RedisClusterException) as exc:
                if isinstance(exc, _REFUSALS):
                    raise
                raise self._error(ConnectionError(str(exc)), "the cluster's slot map") from exc
            self._scripts = {name: cluster.register_script(text) for name, text in _SCRIPTS.items()}
            return
        client = aioredis.Redis.from_url(self.url, **options)
        self._client = client
        await client.ping()
        self._scripts = {name: client.register_script(text) for name, text in _SCRIPTS.items()}
        if self._fast:
            await self._raw_connection()

    async def close(self) -> None:
        self._closed = True
        await self._close_clients()

    async def _close_clients(self) -> None:
        if self._raw is not None:
            raw, self._raw = self._raw, None
            raw.close()
        links, self._links, self._slot_links = self._links, {}, {}
        for link in links.values():
            link.close()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
        if self._cluster is not None:
            cluster, self._cluster = self._cluster, None
            await cluster.aclose()

    async def _ready(self) -> None:
        if self._client is None and self._cluster is None:
            await self.connect()

    # ------------------------------------------------------------------ running scripts

    async def _raw_connection(self) -> PublishConnection:
        raw = self._raw
        if raw is not None and raw.alive and not self._raw_lock.locked():
            return raw
        async with self._raw_lock:
            if self._raw is not None and self._raw.alive:
                return self._raw
            host, port = self._target.nodes[0]
            raw = await PublishConnection.open(
                host,
                port,
                userinfo=self._target.userinfo,
                client_name=f"{self.settings.namespace}-history"[:120],
                timeout=self._connect_timeout,
            )
            if self._db:
                reply = await raw.send([pack(b"SELECT", str(self._db).encode())])[0]
                if isinstance(reply, Exception):
                    raw.close()
                    raise reply
            self._raw = raw
            return raw

    async def _fast_eval(self, name: str, command: bytes) -> Any:
        """An EVALSHA (packed) on the sends' connection, written with the others of this turn of the event
        loop, in call order (which is then Redis's order)."""
        raw = self._raw
        if raw is None or not raw.alive or self._raw_lock.locked():
            raw = await self._raw_connection()
        reply = await raw.send_soon(command)
        if isinstance(reply, Exception):
            reply = await self._fast_retry(name, command, reply)
        return reply

    async def _fast_retry(self, name: str, command: bytes, error: Exception) -> Any:
        """After an error reply: NOSCRIPT (Redis restarted, or its scripts flushed) loads the script and
        runs the command again; any other error is raised."""
        raw = self._raw
        if raw is None or not isinstance(error, ResponseError) or not str(error).startswith(_NOSCRIPT):
            raise error
        loaded = await raw.send([pack(b"SCRIPT", b"LOAD", _text(self._scripts[name].script))])[0]
        if isinstance(loaded, Exception):
            raise loaded
        reply = await raw.send([command])[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _fast_script(self, name: str, keys: Sequence[bytes], args: Sequence[bytes]) -> Any:
        """Script ``name`` on the sends' connection (a plain server), in call order with the sends."""
        sha = self._scripts[name].sha.encode()
        return await self._fast_eval(name, pack(b"EVALSHA", sha, b"%d" % len(keys), *keys, *args))

    async def _fast_command(self, *parts: bytes) -> Any:
        """One command on the sends' connection (a plain server); an error reply is raised."""
        raw = self._raw
        if raw is None or not raw.alive or self._raw_lock.locked():
            raw = await self._raw_connection()
        reply = await raw.send_soon(pack(*parts))
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _eval(self, name: str, keys: Sequence[bytes | str], args: Sequence[bytes | str]) -> Any:
        """Run a script through redis-py (single server or cluster: routed by its keys' slot)."""
        return await self._pooled(self._scripts[name](keys=list(keys), args=list(args)))

    async def _pooled(self, call: Awaitable[_T]) -> _T:
        """A redis-py call, waiting its turn (see POOL_CALLS)."""
        try:
            await self._pool_calls.acquire()
        except BaseException:  # timed out (cancelled) before its turn: the call never starts
            if isinstance(call, Coroutine):
                call.close()
            raise
        try:
            return await call
        finally:
            self._pool_calls.release()

    # ------------------------------------------------------------------ a cluster's sends' links

    async def _slot_call(
        self, slot: int, name: str | None, command: bytes, slow: Callable[[], Awaitable[Any]]
    ) -> Any:
        """``command`` (packed; script ``name``'s EVALSHA, or None) on the link to ``slot``'s master,
        written with the others of this turn of the event loop, in call order; through ``slow()`` (redis-py,
        which follows redirections and learns the new slot map) when Redis redirects it (MOVED, ASK,
        TRYAGAIN, CLUSTERDOWN: the command did not run), when no link can be opened, or while calls of this
        slot before it are still on that path (so that they keep their order). A link lost with commands on
        it fails them (they may have run: never sent again) and the slot map is refreshed."""
        link = None
        if not self._slow.get(slot):
            link = None if self._links_lock.locked() else self._slot_links.get(slot)
            if link is None or not link.alive:
                link = await self._open_link(slot)
        if link is not None and not self._slow.get(slot):
            loop = asyncio.get_running_loop()
            sent = loop.time()
            try:
                reply = await link.send_soon(command)
            except asyncio.CancelledError:  # timed out (a hung master): fail what waits on it, reopen
                if loop.time() - sent >= 0.9 * self.settings.publish_timeout:
                    self._drop_link(link)
                raise
            except RedisError:
                self._drop_link(link)
                raise
            if not isinstance(reply, Exception):
                return reply
            code = str(reply).split(" ", 1)[0]
            if name is not None and code == _NOSCRIPT:  # its scripts were flushed: load, run again
                loaded = await link.send([pack(b"SCRIPT", b"LOAD", _text(self._scripts[name].script))])[0]
                if isinstance(loaded, Exception):
                    raise loaded
                reply = await link.send([command])[0]
                code = "" if not isinstance(reply, Exception) else str(reply).split(" ", 1)[0]
                if not isinstance(reply, Exception):
                    return reply
            if code not in _REDIRECTED:
                raise reply
            self._slot_links.pop(slot, None)
        return await self._slowly(slot, slow)

    async def _slowly(self, slot: int, slow: Callable[[], Awaitable[_T]]) -> _T:
        """``slow()`` after the calls of ``slot`` that took redis-py's path before it (in order)."""
        self.redirected += 1
        self._slow[slot] = self._slow.get(slot, 0) + 1
        lock = self._slow_locks.setdefault(slot, asyncio.Lock())
        try:
            async with lock:
                return await slow()
        finally:
            left = self._slow[slot] - 1
            if left:
                self._slow[slot] = left
            else:
                del self._slow[slot]
                self._slow_locks.pop(slot, None)

    async def _open_link(self, slot: int) -> PublishConnection | None:
        """The link to ``slot``'s master as redis-py's slot map has it, opened if needed (with the
        scripts loaded); None if it cannot be opened (the call goes through redis-py)."""
        cluster = self._cluster
        if cluster is None:
            raise NotConnected("the history store is not connected")
        async with self._links_lock:
            link = self._slot_links.get(slot)
            if link is not None and link.alive:
                return link
            try:
                if self._refresh_map:
                    self._refresh_map = False
                    await cluster.nodes_manager.initialize()
                node = cluster.nodes_manager.get_node_from_slot(slot)
            except (RedisError, RedisClusterException, OSError):
                return None
            link = self._links.get(node.name)
            if link is None or not link.alive:
                opened: PublishConnection | None = None
                try:
                    opened = await PublishConnection.open(
                        node.host,
                        int(node.port),
                        userinfo=self._target.userinfo,
                        client_name=f"{self.settings.namespace}-history"[:120],
                        timeout=self._connect_timeout,
                    )
                    loads = opened.send(
                        [pack(b"SCRIPT", b"LOAD", _text(self._scripts[n].script)) for n in _LINK_SCRIPTS]
                    )
                    for loaded in await asyncio.gather(*loads):
                        if isinstance(loaded, Exception):
                            raise loaded
                except (RedisError, OSError, TimeoutError):
                    if opened is not None:
                        opened.close()
                    self._refresh_map = True
                    return None
                link = self._links[node.name] = opened
            self._slot_links[slot] = link
            return link

    def _drop_link(self, link: PublishConnection) -> None:
        link.close()
        self._refresh_map = True
        for name, known in list(self._links.items()):
            if known is link:
                del self._links[name]
        for slot, known in list(self._slot_links.items()):
            if known is link:
                del self._slot_links[slot]

    # ------------------------------------------------------------------ history

    async def append_counted(
        self, streams: Sequence[str], send: StoredSend, publish: Sequence[tuple[Address, bytes]] = ()
    ) -> tuple[Positions, list[int | None]]:
        streams = list(dict.fromkeys(streams))
        if not streams:
            raise ValueError("a stored send needs at least one stream")
        if self._client is None and self._cluster is None:
            await self.connect()
        items = list(publish) if self.publishes else []
        if not self._fast:
            return await self._bounded("the history send", self._append(streams, send, items))
        # the common case, with as few coroutines in between as can be (each costs every caller)
        namespace = self.settings.namespace
        command = self._pack_send(
            streams, send, [(address.channel(namespace).encode(), message) for address, message in items]
        )
        raw = self._raw
        if raw is None or not raw.alive or self._raw_lock.locked():
            return await self._bounded("the history send", self._fast_send(command))
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                reply = await raw.send_soon(command)
                if isinstance(reply, Exception):
                    reply = await self._fast_retry("send", command, reply)
        except TimeoutError as exc:
            raise self._timed_out("the history send", exc) from exc
        except FanoutError:
            raise
        except Exception as exc:
            raise self._error(exc, "the history send") from exc
        return _parse_send(reply)

    async def _fast_send(self, command: bytes) -> tuple[Positions, list[int | None]]:
        return _parse_send(await self._fast_eval("send", command))

    async def _append(
        self, streams: list[str], send: StoredSend, items: list[tuple[Address, bytes]]
    ) -> tuple[Positions, list[int | None]]:
        namespace = self.settings.namespace
        channels = [address.channel(namespace).encode() for address, _ in items]
        if self._cluster is None:  # a TLS server (a plain one takes append_counted's own path)
            pairs = [(channel, message) for channel, (_, message) in zip(channels, items, strict=True)]
            return await self._send_script(streams, send, pairs)
        slots: dict[int, list[str]] = {}
        for stream in streams:
            slots.setdefault(self._slot_of(stream), []).append(stream)
        item_slots = [key_slot(channel) for channel in channels]
        counts: list[int | None] = [None] * len(items)
        if len(slots) == 1:
            (slot,) = slots
            mine = [i for i, s in enumerate(item_slots) if s == slot]
            here = [(channels[i], items[i][1]) for i in mine]
            complete = len(here) == len(items)
            if self._cluster_fast:
                reply = await self._slot_call(
                    slot,
                    "send",
                    self._pack_send(streams, send, here, complete),
                    lambda: self._eval_send(streams, send, here, complete),
                )
                positions, found = _parse_send(reply)
            else:
                positions, found = await self._send_script(streams, send, here, complete)
            for i, count in zip(mine, found, strict=True):
                counts[i] = count
        else:  # the key checked before, kept after (see docs/continuity.md, "Idempotent sends")
            if send.key is not None and (prior := await self.check_key(send.key, streams)) is not None:
                raise Repeated(prior)
            positions = await self._reserve(slots)
            done = await self._append_slots(slots, send, positions, channels, items, item_slots)
            for i, count in done.items():
                counts[i] = count
            if send.key is not None:  # published once what is outside the slots is (below)
                await self.record_key(send.key, Outcome(APPENDED, None, send.sid, positions), streams)
        outside = [i for i, count in enumerate(counts) if count is None]
        for i in outside:  # messages outside every stream's slot
            message = attach_positions(items[i][1], positions)
            counts[i] = int(await self._publish_in_slot(channels[i], message))
        if send.key is not None and (outside or len(slots) > 1) and items:
            await self.record_key(send.key, Outcome(PUBLISHED, None, send.sid, positions), streams)
        return positions, counts

    async def _publish_in_slot(self, channel: bytes, message: bytes) -> Any:
        """One message published on a cluster (after the script that stored it)."""
        cluster = self._cluster
        assert cluster is not None

        def slow() -> Awaitable[Any]:
            return self._pooled(cluster.execute_command(self._command.decode(), channel, message))

        if not self._cluster_fast:
            return await slow()
        return await self._slot_call(key_slot(channel), None, pack(self._command, channel, message), slow)

    def _variable(
        self, streams: list[str], send: StoredSend, items: list[tuple[bytes, bytes]]
    ) -> list[bytes]:
        """The send script's arguments after its constants: counts, the send, the publish command."""
        return [
            b"%d" % len(streams),
            b"%d" % len(items),
            send.sid.encode(),
            send.payload,
            _KIND[send.binary, send.json],
            orjson.dumps(list(send.exclude)) if send.exclude else b"[]",
            self._command if items else b"",
        ]

    def _pack_send(
        self, streams: list[str], send: StoredSend, items: list[tuple[bytes, bytes]], complete: bool = True
    ) -> bytes:
        """The send script's EVALSHA as RESP, for the sends' own connection(s); ``complete`` as in
        :meth:`_send_script`. What depends only on the streams and the number of messages is packed once
        (:meth:`_send_shape`); per send the key, epoch candidate, send and messages go in between."""
        keyed = send.key is not None
        appended = keyed and not complete
        head, middle, tail = self._send_shape(streams, len(items), keyed, appended)
        epoch, sid, payload = new_epoch().encode(), send.sid.encode(), send.payload
        exclude = orjson.dumps(list(send.exclude)) if send.exclude else b"[]"
        parts = [
            head,
            _bulk(self.key_name(send.key, streams).encode()) if send.key is not None else b"",
            b"$%d\r\n%s\r\n%s$%d\r\n%s\r\n$%d\r\n%s\r\n%s$%d\r\n%s\r\n%s"
            % (
                len(epoch),
                epoch,
                middle,
                len(sid),
                sid,
                len(payload),
                payload,
                _KIND_BULKS[send.binary, send.json],
                len(exclude),
                exclude,
                tail,
            ),
        ]
        for channel, message in items:
            parts.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(channel), channel, len(message), message))
        if keyed:
            parts.append(_bulk(self._window))
        if appended:
            parts.append(_bulk(APPENDED.encode()))
        return b"".join(parts)

    def _send_shape(
        self, streams: list[str], m: int, keyed: bool, appended: bool
    ) -> tuple[bytes, bytes, bytes]:
        """The parts of a send's EVALSHA that depend only on its streams, its number of messages ``m``
        and whether it has a key (kept: a publisher has few streams): up to the keys (its key excluded),
        from the constants to the send, and from the publish command to the stream names."""
        shape = (tuple(streams), m, keyed, appended)
        found = self._send_shapes.get(shape)
        if found is None:
            if len(self._send_shapes) >= _PACKED_SHAPES:
                self._send_shapes.clear()
            n = len(streams)
            count = 3 + 3 * n + 4 + 7 + 2 * m + 2 * keyed + appended  # keyed: its key and window
            keys = [_bulk(key.encode()) for stream in streams for key in self.keys(stream)]
            found = self._send_shapes[shape] = (
                b"".join([b"*%d\r\n" % count, self._evalsha_send, _bulk(b"%d" % (2 * n + keyed)), *keys]),
                self._constants + _bulk(b"%d" % n) + _bulk(b"%d" % m),
                b"".join(
                    [_bulk(self._command if m else b""), *(_bulk(stream.encode()) for stream in streams)]
                ),
            )
        return found

    async def _send_script(
        self, streams: list[str], send: StoredSend, items: list[tuple[bytes, bytes]], complete: bool = True
    ) -> tuple[Positions, list[int | None]]:
        """The send script through redis-py (a TLS server or cluster, a plain cluster's redirected send);
        ``complete``: ``items`` are all the send's messages (else its key is kept as appended: the rest
        follow)."""
        return _parse_send(await self._eval_send(streams, send, items, complete))

    async def _eval_send(
        self, streams: list[str], send: StoredSend, items: list[tuple[bytes, bytes]], complete: bool
    ) -> Any:
        keys: list[bytes] = []
        for stream in streams:
            keys.extend(key.encode() for key in self.keys(stream))
        args = [
            new_epoch().encode(),
            self._size,
            self._ttl,
            self._meta_ttl,
            *self._variable(streams, send, items),
            *(stream.encode() for stream in streams),
            *(part for channel, message in items for part in (channel, message)),
        ]
        if send.key is not None:
            keys.append(self.key_name(send.key, streams).encode())
            args.append(self._window)
            if not complete:
                args.append(APPENDED.encode())
        return await self._eval("send", keys, args)

    async def _per_slot(self, calls: list[Awaitable[_T]]) -> list[_T]:
        """Run ``calls`` (one per slot) at most a few at a time."""
        limit = asyncio.Semaphore(self._fanout_limit)

        async def bounded(call: Awaitable[_T]) -> _T:
            async with limit:
                return await call

        return list(await asyncio.gather(*(bounded(call) for call in calls)))

    async def _positions_in(self, streams: list[str], incr: bool) -> bytes:
        keys: list[str] = []
        for stream in streams:
            keys.extend(self.keys(stream))
        args = [new_epoch(), self._meta_ttl.decode(), "1" if incr else "0", *streams]
        return bytes(await self._eval("positions", keys, args))

    async def _reserve(self, slots: dict[int, list[str]]) -> Positions:
        """Phase 1 of a multi-slot send: the next offset of every stream, slot by slot."""
        fragments = await self._per_slot([self._positions_in(mine, True) for mine in slots.values()])
        return _positions(f for f in fragments if f)

    async def _append_slots(
        self,
        slots: dict[int, list[str]],
        send: StoredSend,
        positions: Positions,
        channels: list[bytes],
        items: list[tuple[Address, bytes]],
        item_slots: list[int],
    ) -> dict[int, int | None]:
        """Phase 2: per slot, the entries with the full positions, and that slot's messages."""
        full = orjson.dumps({stream: offset for stream, (_, offset) in positions.items()})
        meta = b'{"sid":%s,%s,"x":%s,"p":%s}' % (
            orjson.dumps(send.sid),
            _KIND[send.binary, send.json],
            orjson.dumps(list(send.exclude)),
            full,
        )
        head = attach_positions(b"", positions)
        done: dict[int, int | None] = {}

        async def one(slot: int, mine: list[str]) -> None:
            keys: list[str] = []
            per_stream: list[bytes] = []
            for stream in mine:
                keys.extend(self.keys(stream))
                epoch, offset = positions[stream]
                per_stream += [b"%d" % offset, epoch.encode()]
            here = [i for i, s in enumerate(item_slots) if s == slot]
            args = [
                self._size,
                self._ttl,
                self._meta_ttl,
                b"%d" % len(here),
                send.payload,
                meta,
                head,
                self._command,
                *per_stream,
                *(part for i in here for part in (channels[i], items[i][1])),
            ]
            counts = _counts(bytes(await self._eval("append", keys, args)))
            done.update(zip(here, counts, strict=True))

        await self._per_slot([one(slot, mine) for slot, mine in slots.items()])
        return done

    # ------------------------------------------------------------------ idempotency keys

    def key_name(self, key: str, streams: Sequence[str] = ()) -> str:
        """Where ``key`` lives: ``<ns>:ik:<key>``; on a cluster, a history send's in the slot of its first
        stream (``{<channel>}:ik:<key>``), so that the send script claims it with the append."""
        if self._target.cluster and streams:
            return "{" + self.channel(streams[0]) + "}:ik:" + key
        return f"{self.settings.namespace}:ik:{key}"

    async def publish_once(self, key: str, publish: Sequence[tuple[Address, bytes]]) -> list[int | None]:
        await self._ready()
        namespace = self.settings.namespace
        args = [self._window, self._command]
        for address, message in publish:
            args += [address.channel(namespace).encode(), message]
        name = self.key_name(key).encode()
        if self._fast:  # on the sends' own connection, in order with the history sends
            command = pack(b"EVALSHA", self._scripts["once"].sha.encode(), b"1", name, *args)
            reply = bytes(await self._bounded("a keyed send", self._fast_eval("once", command)))
        else:
            reply = bytes(await self._bounded("a keyed send", self._eval("once", [name], args)))
        _repeated(reply)
        return _counts(reply)

    async def check_key(self, key: str, streams: Sequence[str] = ()) -> Outcome | None:
        await self._ready()
        call = self._redis().get(self.key_name(key, streams))
        found: Any = await self._bounded("an idempotency key", self._pooled(call))
        return None if found is None else parse_outcome(bytes(found))

    async def record_key(self, key: str, outcome: Outcome, streams: Sequence[str] = ()) -> None:
        await self._ready()
        args = [encode_outcome(outcome), self._window]
        await self._bounded("an idempotency key", self._eval("record", [self.key_name(key, streams)], args))

    async def positions(self, streams: Iterable[str]) -> Positions:
        wanted = list(dict.fromkeys(streams))
        if not wanted:
            return {}
        await self._ready()

        async def run() -> Positions:
            if self._cluster is None:
                return _positions([await self._positions_in(wanted, False)])
            slots: dict[int, list[str]] = {}
            for stream in wanted:
                slots.setdefault(self._slot_of(stream), []).append(stream)
            fragments = await self._per_slot([self._positions_in(mine, False) for mine in slots.values()])
            return _positions(f for f in fragments if f)

        return await self._bounded("a position read", run())

    async def read(self, stream: str, since: int | None = None, limit: int = 100) -> Page:
        await self._ready()
        start = "" if since is None else str(max(since, 0) + 1)
        args = [new_epoch(), self._meta_ttl.decode(), start, str(max(limit, 0))]
        if self._fast:  # on the sends' connection (a storm of resumes reads a lot)
            keys = [key.encode() for key in self.keys(stream)]
            call = self._fast_script("read", keys, [arg.encode() for arg in args])
        else:
            call = self._eval("read", list(self.keys(stream)), args)
        reply = await self._bounded("a history read", call)
        epoch, top, first_id, raw = reply
        top = int(top)
        entries = [self._entry(stream, entry) for entry in raw]
        if since is None:
            entries.reverse()
        first = _offset_of(first_id) if first_id else top + 1
        return Page(epoch.decode() if isinstance(epoch, bytes) else str(epoch), top, tuple(entries), first)

    @staticmethod
    def _entry(stream: str, raw: list[Any]) -> Entry:
        entry_id, flat = raw
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        meta = orjson.loads(fields[b"m"])
        others = {name: int(offset) for name, offset in meta.get("p", {}).items() if name != stream}
        return Entry(
            offset=_offset_of(entry_id),
            sid=str(meta["sid"]),
            payload=bytes(fields[b"d"]),
            binary=bool(meta.get("b")),
            json=bool(meta.get("j")),
            exclude=tuple(meta.get("x") or ()),
            positions=others,
        )

    async def remove(self, stream: str) -> None:
        await self._ready()
        client = self._cluster if self._cluster is not None else self._client
        assert client is not None
        await self._bounded("a history removal", self._pooled(client.delete(*self.keys(stream))))

    # ------------------------------------------------------------------ resume records

    def _redis(self) -> aioredis.Redis | RedisCluster:
        client = self._cluster if self._cluster is not None else self._client
        if client is None:
            raise NotConnected("the history store is not connected")
        return client

    async def save_resume(
        self, token: str, flag: str | None, record: bytes, ttl: float, *, create: bool = False
    ) -> None:
        await self._ready()
        key, value, px = self._resume_key(token), _marker(flag) + record, _ms(ttl)
        if self._fast:  # on the sends' connection: pipelined with every other of this turn
            name = key.encode()
            if create:
                call = self._fast_command(b"SET", name, value, b"PX", b"%d" % px)
            else:
                call = self._fast_script("save", [name], [value, b"%d" % px])
            await self._bounded("a resume record", call)
        elif create:
            await self._bounded("a resume record", self._pooled(self._redis().set(key, value, px=px)))
        else:  # unless claimed or dropped (a tombstone): one claimed by a resume is never written back
            await self._bounded("a resume record", self._eval("save", [key], [value, str(px).encode()]))

    async def keep_resume(self, tokens: Iterable[str], ttl: float) -> None:
        keys = [self._resume_key(token) for token in dict.fromkeys(tokens)]
        if not keys:
            return
        await self._ready()
        if self._fast:
            px = b"%d" % _ms(ttl)
            calls = [self._fast_command(b"PEXPIRE", key.encode(), px) for key in keys]
            await self._bounded("keeping resume records", asyncio.gather(*calls))
            return
        client = self._redis()

        async def run() -> None:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.pexpire(key, _ms(ttl))
            await pipe.execute()

        await self._bounded("keeping resume records", self._pooled(run()))

    async def claim_resume(self, token: str, flag: str | None) -> bytes | None:
        await self._ready()
        if self._fast:
            name = self._resume_key(token).encode()
            call = self._fast_script("claim", [name], [_marker(flag), self._tombstone_ms])
        else:
            call = self._eval("claim", [self._resume_key(token)], [_marker(flag), self._tombstone_ms])
        reply = await self._bounded("a resume claim", call)
        return None if reply is None else bytes(reply)

    async def drop_resume(self, token: str) -> None:
        await self._ready()
        if self._fast:
            name = self._resume_key(token).encode()
            await self._bounded(
                "dropping a resume record", self._fast_command(b"SET", name, b"-", b"PX", self._tombstone_ms)
            )
            return
        call = self._redis().set(self._resume_key(token), b"-", px=int(self._tombstone_ms))
        await self._bounded("dropping a resume record", self._pooled(call))


__all__ = ["RedisStore"]
