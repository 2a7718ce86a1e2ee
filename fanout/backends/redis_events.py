"""The worker tier on Redis (and Redis Cluster): a stream per shard, read through one consumer group.

Keys, with ``<ns>`` the namespace and ``<k>`` the shard; the braces are a Redis Cluster hash tag, so a
shard's stream, roster and lease live on one node and change together in one script:

* ``{<ns>:ev:<k>}`` - the shard's stream; group ``workers``. Entries: ``e`` (the event's JSON header) and
  ``d`` (the raw message data);
* ``{<ns>:ev:<k>}:roster:<instance>`` - hash: the connections node ``<instance>`` holds in that shard ->
  their flag (JSON); added with the open event, removed with the close event, in the same script;
* ``{<ns>:ev:<k>}:lease`` - the worker that owns the shard (``SET NX PX``, renewed by its owner);
* ``<ns>:ev:nodes`` - the set of node instances that have rosters; ``<ns>:ev:dead`` - parked events.

:meth:`RedisEventLog.remove` finds them with ``SCAN`` (every shard, whatever the shard count that made it).

Appends go through one Lua script per shard: it refuses events once ``backlog`` events wait in the
shard - delivered and not acknowledged, or not delivered yet (``XINFO GROUPS``: pending + lag) - (close
events always go in: their client is gone, and there is at most one per connection), adds the others and
updates the roster, atomically. The owner of a shard acknowledges what its handlers
finished (``XACK``) and trims what is acknowledged (``XTRIM MINID``), so the stream's length is the
shard's backlog. A new owner first claims everything the previous one took and did not acknowledge
(``XAUTOCLAIM``): those deliveries are ``redelivered``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError, ResponseError

from ..config import Settings
from ..exceptions import BackendError, BackendUnavailable
from .eventlog import LEASE_TTL, Appended, DeadLetter, Delivery, EventLog
from .redis import _no_retry, _parse_target

GROUP = b"workers"

#: KEYS: stream, roster. ARGV: backlog, then per item: header, data, op, client id, flag (JSON or "").
#: op: "add" / "remove" / "flag" / "" - a "flag" item has no event (empty header). Returns how many
#: items were taken, in order: it stops at the first event refused for the backlog.
_APPEND = """
local backlog = tonumber(ARGV[1])
-- waiting = delivered and not acknowledged + not delivered yet (acknowledged entries are trimmed
-- later, so XLEN alone would count them); before any worker made the group, everything waits
local length = redis.call('XLEN', KEYS[1])
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok and #groups > 0 then
  local info = {}
  for i = 1, #groups[1], 2 do info[groups[1][i]] = groups[1][i + 1] end
  if info['lag'] then length = info['pending'] + info['lag'] end
end
local taken = 0
for i = 2, #ARGV, 5 do
  local header, data, op, cid, flag = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if header ~= '' then
    if op ~= 'remove' and length >= backlog then return taken end
    redis.call('XADD', KEYS[1], '*', 'e', header, 'd', data)
    length = length + 1
  end
  if op == 'add' then
    redis.call('HSET', KEYS[2], cid, flag)
  elseif op == 'remove' then
    redis.call('HDEL', KEYS[2], cid)
  elseif op == 'flag' and redis.call('HEXISTS', KEYS[2], cid) == 1 then
    redis.call('HSET', KEYS[2], cid, flag)
  end
  taken = taken + 1
end
return taken
"""

#: KEYS: stream, roster. ARGV: pairs of header, data. Appends the close events, forgets the roster.
_CLOSE_LOST = """
for i = 1, #ARGV, 2 do
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[i], 'd', ARGV[i + 1])
end
redis.call('DEL', KEYS[2])
return #ARGV / 2
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _next_id(entry_id: bytes) -> bytes:
    ms, _, seq = entry_id.partition(b"-")
    return b"%d-%d" % (int(ms), int(seq or 0) + 1)


class RedisEventLog(EventLog):
    def __init__(self, settings: Settings, *, shards: int, backlog: int, node: str = "") -> None:
        super().__init__(settings, shards=shards, backlog=backlog, node=node)
        self._target = _parse_target(settings.url)
        self._client: Any = None
        ns = settings.namespace
        self._streams = [f"{{{ns}:ev:{k}}}" for k in range(shards)]
        self._nodes_key = f"{ns}:ev:nodes"
        self._dead_key = f"{ns}:ev:dead"
        self._claimed: set[int] = set()  #: shards whose previous owner's pending entries we took
        self._last_trim: dict[int, float] = {}

    # -- keys

    def stream(self, shard: int) -> str:
        return self._streams[shard]

    def roster(self, shard: int, instance: str) -> str:
        return f"{self._streams[shard]}:roster:{instance}"

    def _lease(self, shard: int) -> str:
        return f"{self._streams[shard]}:lease"

    # -- lifecycle

    async def connect(self) -> None:
        kwargs: dict[str, Any] = {
            "retry": _no_retry(),
            "socket_connect_timeout": min(5.0, self.settings.publish_timeout),
            "health_check_interval": 0,
        }
        if self._target.cluster:
            options: dict[str, Any] = dict(parse_url(self._target.node_url(*self._target.nodes[0])))
            for key in ("host", "port", "db", "connection_class"):
                options.pop(key, None)
            options.update(kwargs, ssl=self._target.tls)
            self._client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self._target.nodes], **options
            )
        else:
            host, port = self._target.nodes[0]
            self._client = aioredis.Redis.from_url(self._target.node_url(host, port), **kwargs)
        client = self._client
        self._append = client.register_script(_APPEND)
        self._close_lost = client.register_script(_CLOSE_LOST)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        if self.node:
            await self._call(client.sadd(self._nodes_key, self.node), "register the node")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _call(self, awaitable: Any, what: str) -> Any:
        """One broker call, bounded by the publish timeout, its errors ours (password redacted)."""
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                return await awaitable
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"Redis at {self.settings.where} did not answer ({what}) "
                f"within {self.settings.publish_timeout:g}s"
            ) from exc
        except (RedisError, OSError) as exc:
            unreachable = isinstance(exc, OSError | ConnectionError) or "Connection" in type(exc).__name__
            cls = BackendUnavailable if unreachable else BackendError
            raise cls(
                self.settings.redact(f"Redis at {self.settings.where} failed to {what}: {exc}")
            ) from exc

    # -- node side

    async def append(self, items: Sequence[Appended]) -> list[bool]:
        by_shard: dict[int, list[Appended]] = {}
        for item in items:
            by_shard.setdefault(item.shard, []).append(item)

        async def one(shard: int, mine: list[Appended]) -> tuple[int, int]:
            argv: list[Any] = [self.backlog]
            for item in mine:
                flag = orjson.dumps(item.flag) if item.roster in ("add", "flag") else b""
                argv += [item.header, item.data, item.roster or "", item.client_id, flag]
            keys = [self.stream(shard), self.roster(shard, self.node)]
            taken = await self._call(self._append(keys=keys, args=argv), "append events")
            return shard, int(taken)

        results = await asyncio.gather(*(one(shard, mine) for shard, mine in by_shard.items()))
        taken = dict(results)
        out = []
        seen: dict[int, int] = {}
        for item in items:
            index = seen.get(item.shard, 0)
            seen[item.shard] = index + 1
            out.append(index < taken[item.shard])
        return out

    async def leave(self) -> None:
        client = self._client
        for shard in range(self.shards):
            await self._call(client.delete(self.roster(shard, self.node)), "forget the roster")
        await self._call(client.srem(self._nodes_key, self.node), "unregister the node")

    # -- worker side: shards

    async def acquire(self, shard: int, owner: str) -> bool:
        client = self._client
        ttl = int(LEASE_TTL * 1000)
        got = await self._call(client.set(self._lease(shard), owner, nx=True, px=ttl), "take a shard")
        if not got:
            return False
        try:
            await self._call(
                client.xgroup_create(self.stream(shard), GROUP, id="0", mkstream=True), "create group"
            )
        except BackendError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._claimed.discard(shard)
        return True

    async def renew(self, shards: Iterable[int], owner: str) -> set[int]:
        ttl = int(LEASE_TTL * 1000)
        kept = set()
        for shard in shards:
            if await self._call(self._renew(keys=[self._lease(shard)], args=[owner, ttl]), "renew a shard"):
                kept.add(shard)
        return kept

    async def release(self, shard: int, owner: str) -> None:
        await self._call(self._release(keys=[self._lease(shard)], args=[owner]), "release a shard")
        self._claimed.discard(shard)

    # -- worker side: events

    async def fetch(self, shard: int, owner: str, count: int, wait: float) -> list[Delivery]:
        client = self._client
        stream = self.stream(shard)
        if shard not in self._claimed:
            claimed = await self._claim(shard, owner, count)
            if claimed:
                return claimed
            self._claimed.add(shard)
        try:
            # the read blocks on the server: bound it by the wait plus the usual timeout
            async with asyncio.timeout(wait + self.settings.publish_timeout):
                answer = await client.xreadgroup(
                    GROUP, owner, {stream: ">"}, count=count, block=max(1, int(wait * 1000))
                )
        except TimeoutError as exc:
            raise BackendUnavailable(f"Redis at {self.settings.where} did not answer a read") from exc
        except (RedisError, OSError) as exc:
            if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                self._claimed.discard(shard)  # the stream was deleted under us: recreate on next acquire
            raise BackendUnavailable(
                self.settings.redact(f"Redis at {self.settings.where}: read failed: {exc}")
            ) from exc
        out = []
        for _key, entries in answer or ():
            for entry_id, fields in entries:
                out.append(Delivery(shard, entry_id, fields[b"e"], fields.get(b"d", b""), False))
        return out

    async def _claim(self, shard: int, owner: str, count: int) -> list[Delivery]:
        """What the previous owners of the shard took and did not acknowledge, oldest first."""
        answer = await self._call(
            self._client.xautoclaim(
                self.stream(shard), GROUP, owner, min_idle_time=0, start_id="0-0", count=count
            ),
            "claim pending events",
        )
        entries = answer[1] if answer else []
        return [
            Delivery(shard, entry_id, fields[b"e"], fields.get(b"d", b""), True)
            for entry_id, fields in entries
            if fields  # an entry trimmed while pending has no fields left
        ]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        by_shard: dict[int, list[Any]] = {}
        for delivery in deliveries:
            by_shard.setdefault(delivery.shard, []).append(delivery.token)
        for shard, tokens in by_shard.items():
            await self._call(self._client.xack(self.stream(shard), GROUP, *tokens), "acknowledge events")
            now = time.monotonic()
            if now - self._last_trim.get(shard, 0.0) >= 0.5:
                self._last_trim[shard] = now
                await self._trim(shard)

    async def _trim(self, shard: int) -> None:
        """Drop the acknowledged head of the stream: keep what is pending or not delivered yet."""
        client, stream = self._client, self.stream(shard)
        groups = await self._call(client.xinfo_groups(stream), "read the group")
        group = next((g for g in groups if g.get("name") in (GROUP, GROUP.decode())), None)
        if group is None:
            return
        last = group.get("last-delivered-id")
        if not last or last in (b"0-0", "0-0"):
            return
        pending = await self._call(client.xpending(stream, GROUP), "read pending events")
        keep = pending["min"] if pending and pending.get("pending") else _next_id(_bytes(last))
        await self._call(client.xtrim(stream, minid=keep), "trim acknowledged events")

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        fields = {
            b"e": delivery.header,
            b"d": delivery.data,
            b"err": error.encode()[:2000],
            b"shard": str(delivery.shard),
        }
        await self._call(self._client.xadd(self._dead_key, fields), "park an event")
        await self.ack([delivery])

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        entries = await self._call(self._client.xrange(self._dead_key, count=limit), "list parked events")
        out = []
        for entry_id, fields in entries:
            ms = int(_bytes(entry_id).split(b"-")[0])
            out.append(
                DeadLetter(
                    entry_id,
                    int(fields[b"shard"]),
                    fields[b"e"],
                    fields.get(b"d", b""),
                    fields.get(b"err", b"").decode(errors="replace"),
                    ms / 1000,
                )
            )
        return out

    async def requeue(self, dead: DeadLetter) -> None:
        client = self._client
        await self._call(
            client.xadd(self.stream(dead.shard), {b"e": dead.header, b"d": dead.data}), "requeue"
        )
        await self._call(client.xdel(self._dead_key, dead.token), "forget a parked event")

    async def waiting(self, shard: int) -> int:
        return int(await self._call(self._client.xlen(self.stream(shard)), "count waiting events"))

    # -- node lost

    async def lost_nodes(self, live: set[str]) -> list[str]:
        members = await self._call(self._client.smembers(self._nodes_key), "list nodes with rosters")
        return sorted(m.decode() for m in members if m.decode() not in live)

    async def close_lost(self, instance: str, make_close: Any) -> int:
        """Append ``make_close(client_id, flag) -> (header, data)`` for each connection of ``instance``."""
        client, closed = self._client, 0
        for shard in range(self.shards):
            roster = self.roster(shard, instance)
            members = await self._call(client.hgetall(roster), "read a roster")
            argv: list[Any] = []
            for cid, flag in sorted(members.items()):
                header, data = make_close(cid.decode(), orjson.loads(flag) if flag else None)
                argv += [header, data]
            if argv or members:
                closed += int(
                    await self._call(
                        self._close_lost(keys=[self.stream(shard), roster], args=argv), "close lost"
                    )
                )
        await self._call(client.srem(self._nodes_key, instance), "unregister a lost node")
        return closed

    # -- cleanup

    async def remove(self) -> list[str]:
        if self._client is None:
            await self.connect()
        client = self._client

        async def keys() -> list[str]:
            # (on a cluster, redis-py scans every primary)
            found = {_bytes(k).decode() async for k in client.scan_iter(match=self._pattern(), count=1000)}
            for key in (self._nodes_key, self._dead_key):
                if await client.exists(key):
                    found.add(key)
            return sorted(found)

        names: list[str] = await self._call(keys(), "list the worker tier's keys")
        for name in names:
            await self._call(client.delete(name), "delete a key of the worker tier")
        return names

    def _pattern(self) -> str:
        """Every shard's stream, lease and rosters: ``{<ns>:ev:*`` (a namespace has no glob characters)."""
        return f"{{{self.settings.namespace}:ev:*"


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
