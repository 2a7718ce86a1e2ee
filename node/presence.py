"""The node's side of presence (``FANOUT_PRESENCE``): publish what it contributes, announce what changes.

See :mod:`fanout.presence` for the model. Every ``TICK`` seconds the node recomputes its contribution
(the flags of its local members of each presence group) from its table, publishes it on the presence
address when it changed (and every ``REFRESH`` seconds anyway, so that every node converges after a
broker outage or a restart); the leader steps the state machine and announces the transitions:
a frame ``{"type": "presence", "group", "event": "join" | "leave", "flag"}`` to the group's members, and,
with the worker tier on, a ``presence`` event for the workers (``on_presence``).

While the node's link to the broker is down, or for ``REFRESH`` seconds after it came back (or after the
node started), nothing is announced: the view is not trustworthy until every live node has been heard.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from typing import TYPE_CHECKING

from fanout import naming
from fanout.commands import PresenceChange, PresenceSnapshot
from fanout.exceptions import FanoutError, MessageTooLarge
from fanout.presence import Pair, PresenceState

if TYPE_CHECKING:
    from .surfaces import PresenceHost

log = logging.getLogger("fanout.node.presence")

TICK = 0.25
REFRESH = 2.0
#: a node that started this many seconds before us had announced its presence before we came
SEEDED_BEFORE = 10.0


class Presence:
    def __init__(self, node: PresenceHost, patterns: re.Pattern[str], debounce: float) -> None:
        self.node = node
        self.patterns = patterns
        self.state = PresenceState(debounce)
        self.announced: Counter[str] = Counter()  #: transitions announced by this node, by change
        self._last: frozenset[Pair] | None = None
        self._published_at = 0.0
        self._trusted_at: float | None = None  #: loop time from which transitions are announced
        self._seeded = False
        self._too_big = False  #: the last contribution could not be published (warned once)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.node.backend.subscribe([naming.PRESENCE])
        await self.node.util.watch_nodes()
        self._task = asyncio.create_task(self._run(), name="fanout-presence")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def heard(self, message: PresenceSnapshot | PresenceChange) -> None:
        if message.node == self.node.instance:
            return
        if isinstance(message, PresenceSnapshot):
            self.state.update(message.node, ((g, f) for g, flags in message.groups.items() for f in flags))
        else:
            self.state.took(message.group, message.flag, message.change)

    def local(self) -> frozenset[Pair]:
        """This node's contribution now, from its table."""
        table, match = self.node.table, self.patterns.match
        pairs = set()
        for group in table.group_names():
            if match(group):
                for client_id in table.group_members(group):
                    flag = table.flag_of(client_id)
                    if flag is not None:
                        pairs.add((group, flag))
        return frozenset(pairs)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK)
            try:
                await self._tick(loop.time())
            except Exception:  # a bug here must not end presence for good
                log.exception("presence step failed")

    async def _tick(self, now: float) -> None:
        node = self.node
        local = self.local()
        self.state.update(node.instance, local)
        if local != self._last or now - self._published_at >= REFRESH:
            await self._publish(local, now)
        infos = node.util.live_node_infos()
        if infos is None or not node.backend.healthy:
            self._trusted_at = None  # not heard everyone (yet, or any more): hold the announcements
            return
        if self._trusted_at is None:
            self._trusted_at = now + REFRESH
        if now < self._trusted_at:
            return
        live = {*infos, node.instance}
        if not self._seeded:
            # what nodes running well before this one contribute was announced before it came (a
            # restart does not announce everyone again); nodes that started with it have not announced
            before = node.started_at - SEEDED_BEFORE
            older = {instance for instance, info in infos.items() if 0 < info.started_at < before}
            self.state.seed(self.state.present(older - {node.instance}))
            self._seeded = True
        if min(live) != node.instance:
            return  # the leader announces; this node follows what it says (heard)
        for group, flag, change in self.state.step(live, now):
            await self._announce(group, flag, change)

    async def _publish(self, local: frozenset[Pair], now: float) -> None:
        groups: dict[str, list[str]] = {}
        for group, flag in sorted(local):
            groups.setdefault(group, []).append(flag)
        snapshot = PresenceSnapshot(self.node.instance, {g: tuple(f) for g, f in groups.items()})
        try:
            message = self.node.encoder.encode(snapshot, time.time())
            limit = self.node.settings.max_message
            if len(message) > limit:
                raise MessageTooLarge(f"{len(message)} bytes, more than FANOUT_MAX_MESSAGE={limit}")
        except FanoutError as exc:  # too many flags for one message: the other nodes cannot hear them
            if not self._too_big:
                log.warning(
                    "presence: this node's contribution (%d flags in presence groups) cannot be shared "
                    "(%s); other nodes will not see these flags as present (see the guide's Presence limits)",
                    len(local),
                    exc,
                )
            self._too_big = True
            return
        self._too_big = False
        try:
            await self.node.backend.publish(naming.PRESENCE, message)
        except FanoutError as exc:
            log.debug("presence snapshot not published: %s", exc)
            return
        self._last, self._published_at = local, now

    async def _announce(self, group: str, flag: str, change: str) -> None:
        self.announced[change] += 1
        node = self.node
        try:
            await node.util.send_to_group(
                group, {"type": "presence", "group": group, "event": change, "flag": flag}
            )
            took = PresenceChange(node.instance, group, flag, change)
            await node.backend.publish(naming.PRESENCE, node.encoder.encode(took, time.time()))
        except FanoutError as exc:
            log.warning("presence %s of %s in %s not announced: %s", change, flag, group, exc)
        if self.node.events is not None:
            self.node.events.presence(group, flag, change)
