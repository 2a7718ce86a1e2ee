"""Issue 17's acceptance, the other side: ``recovered: false`` and nothing partial when more than the history
was missed, after its TTL, and when the store restarted empty; a reused, forged or other user's token and
an expired one restore nothing. Real node processes on Redis (a throw-away redis-server for the restart),
plain fanout.v1 websocket clients (every frame checked), the admission-by-query app (tests/apps/streams.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from fanout import FanoutError, ServerUtil
from tests.support.continuity import REDIS, STREAMS, V1, forgetting, node_env, two_nodes, until_gone, util_of
from tests.support.nodes import metrics, start_node
from tests.support.redis_servers import start_redis


@pytest.fixture(autouse=True)
def _forget_namespaces() -> Iterator[None]:
    yield from forgetting()


async def test_not_recovered_when_more_than_the_history_was_missed_and_nothing_partial(
    tmp_path: Path,
) -> None:
    env = node_env(REDIS, FANOUT_HISTORY_SIZE="5")
    a, b = two_nodes(tmp_path, env)
    async with util_of(env) as util:
        ann = await V1.open(a.port, "user=ann&groups=h-over,h-exact,h-few")
        for group in ("h-over", "h-exact", "h-few"):
            await util.send_to_group(group, f"{group} seen")
            assert (await ann.frame())["data"] == f"{group} seen"
        token, positions = ann.snapshot()
        ann.abort()
        await until_gone(util, ann.client_id)
        for n in range(6):  # one more than the history keeps
            await util.send_to_group("h-over", {"over": n})
        for n in range(5):  # exactly what it keeps
            await util.send_to_group("h-exact", {"exact": n})
        for n in range(2):
            await util.send_to_group("h-few", {"few": n})

        back = await V1.open(b.port, "user=ann")
        await back.resume(token, positions)
        replay, resumed = await back.until_resumed()
        # h-over: nothing of it (the 2 of its 6 that were trimmed cannot be had, so none of them is given)
        assert [f for f in replay if "group:h-over" in f["streams"]] == []
        assert [f["data"] for f in replay if "group:h-exact" in f["streams"]] == [
            {"exact": n} for n in range(5)
        ]
        assert [f["data"] for f in replay if "group:h-few" in f["streams"]] == [{"few": n} for n in range(2)]
        assert len(replay) == 7
        epochs = {s: p[0] for s, p in positions.items()}
        assert resumed == {
            "type": "resumed",
            "recovered": False,
            "streams": {
                "group:h-over": {"recovered": False, "epoch": epochs["group:h-over"], "offset": 7},
                "group:h-exact": {"recovered": True, "epoch": epochs["group:h-exact"], "offset": 6},
                "group:h-few": {"recovered": True, "epoch": epochs["group:h-few"], "offset": 3},
            },
        }
        # the token was good: its state is back, and live sends go on from the streams' positions
        for group in ("h-over", "h-exact", "h-few"):
            assert await util.is_in_group(back.client_id, group)
        await util.send_to_group("h-over", "live")
        assert await back.frame() == {"type": "message", "data": "live", "streams": {"group:h-over": 8}}
        await back.nothing_more(0.3)
        await back.ws.close()


async def test_not_recovered_after_the_history_ttl(tmp_path: Path) -> None:
    env = node_env(REDIS, FANOUT_HISTORY_TTL="1")
    node = start_node(tmp_path, {**env, "FANOUT_NODE_ID": "ttl"}, app=STREAMS)
    async with util_of(env) as util:
        bob = await V1.open(node.port, "user=bob&groups=h-ttl")
        for n in range(2):
            await util.send_to_group("h-ttl", {"n": n})
        assert [(await bob.frame())["data"] for _ in range(2)] == [{"n": 0}, {"n": 1}]
        token, positions = bob.snapshot()
        bob.abort()
        await until_gone(util, bob.client_id)
        for n in range(2, 5):
            await util.send_to_group("h-ttl", {"n": n})
        await asyncio.sleep(2.5)  # more than FANOUT_HISTORY_TTL after the last send: the entries are gone
        page = await util.get_history("group:h-ttl")
        assert page["entries"] == [] and page["offset"] == 5 and page["epoch"] == positions["group:h-ttl"][0]

        back = await V1.open(node.port, "user=bob")
        await back.resume(token, positions)
        replay, resumed = await back.until_resumed()
        assert replay == []
        assert resumed == {
            "type": "resumed",
            "recovered": False,
            "streams": {
                "group:h-ttl": {"recovered": False, "epoch": positions["group:h-ttl"][0], "offset": 5}
            },
        }
        assert await util.is_in_group(back.client_id, "h-ttl")  # its state is back all the same
        await util.send_to_group("h-ttl", {"n": 5})
        assert await back.frame() == {"type": "message", "data": {"n": 5}, "streams": {"group:h-ttl": 6}}
        await back.ws.close()


async def test_not_recovered_when_the_store_restarted_empty(tmp_path: Path) -> None:
    """A throw-away redis-server is backend and store; it is killed and started again without its data:
    the stream's epoch changes. The client that was away is told so and given nothing of the new epoch
    it did not ask for; the one that stayed connected is closed with 3010 (its node lost track)."""
    server = start_redis(tmp_path / "redis")
    try:
        env = node_env(server.url)
        a, b = two_nodes(tmp_path, env)
        async with util_of(env) as util:
            carol = await V1.open(a.port, "user=carol&groups=h-store")
            dave = await V1.open(a.port, "user=dave&groups=h-store")
            for n in range(3):
                await util.send_to_group("h-store", {"n": n})
            for client in (carol, dave):
                assert [(await client.frame())["data"]["n"] for _ in range(3)] == [0, 1, 2]
            token, positions = carol.snapshot()
            old_epoch = positions["group:h-store"][0]
            carol.abort()
            await until_gone(util, carol.client_id)

            server.kill()
            server.restart()  # the same port, no data
            await asyncio.to_thread(a.wait_healthy, 30)
            await asyncio.to_thread(b.wait_healthy, 30)
            for n in range(3, 5):
                await send_until_it_goes(util, "h-store", {"n": n})
            page = await util.get_history("group:h-store")
            new_epoch = page["epoch"]
            assert new_epoch != old_epoch and page["offset"] == 2

            # dave's node sees the new epoch: what it had not delivered is gone, dave must resume
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await dave.frame()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 3010

            back = await V1.open(b.port, "user=carol&groups=h-store")
            await back.resume(token, positions)
            replay, resumed = await back.until_resumed()
            assert replay == []  # nothing partial: not the new epoch's sends either
            assert resumed["recovered"] is False
            assert resumed["streams"] == {
                "group:h-store": {"recovered": False, "epoch": new_epoch, "offset": 2}
            }
            await util.send_to_group("h-store", {"n": 5})
            assert await back.frame() == {
                "type": "message",
                "data": {"n": 5},
                "streams": {"group:h-store": 3},
            }
            await back.ws.close()
    finally:
        server.stop()


async def send_until_it_goes(util: ServerUtil, group: str, data: object) -> None:
    """A send, tried again while the publisher's link to the restarted Redis comes back."""
    for _ in range(50):
        try:
            await util.send_to_group(group, data)
            return
        except FanoutError:
            await asyncio.sleep(0.1)
    await util.send_to_group(group, data)


async def test_a_reused_forged_or_other_users_token_restores_nothing(tmp_path: Path) -> None:
    env = node_env(REDIS)
    a, b = two_nodes(tmp_path, env)
    async with util_of(env) as util:
        ann = await V1.open(a.port, "user=ann&groups=h-tok")
        await util.set_session(ann.client_id, {"secret": "ann's"})
        await util.send_to_group("h-tok", "seen")
        assert (await ann.frame())["data"] == "seen"
        token, positions = ann.snapshot()
        ann.abort()
        await until_gone(util, ann.client_id)
        for n in range(2):
            await util.send_to_group("h-tok", {"missed": n})

        async def refused(query: str, attempt: str) -> None:
            """A resume with ``attempt`` restores nothing: no replay, no group, no session, no flag."""
            other = await V1.open(b.port, query)
            await other.resume(attempt, positions)
            assert await other.frame() == {"type": "resumed", "recovered": False, "streams": {}}
            assert not await util.is_in_group(other.client_id, "h-tok")
            assert await util.get_session(other.client_id) == {}
            assert await util.get_flag(other.client_id) == (query.split("=")[1] if query else None)
            await util.send_to_group("h-tok", "not for it")  # (and no live send of the group)
            await other.nothing_more(0.3)
            await other.ws.close()

        await refused("user=mallory", token)  # another user's token
        await refused("", token)  # a guest with a user's token
        await refused("user=ann", token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))  # forged
        await refused("user=ann", "made-up")

        back = await V1.open(b.port, "user=ann")  # ann herself: the token was not used up by the others
        await back.resume(token, positions)
        replay, resumed = await back.until_resumed()
        # (the refused connections' "not for it" went to h-tok too)
        assert [f["data"] for f in replay] == [{"missed": 0}, {"missed": 1}] + ["not for it"] * 4
        assert resumed["recovered"] is True
        assert await util.get_session(back.client_id) == {"secret": "ann's"}

        await refused("user=ann", token)  # reused: used once, it restores nothing
        samples = await metrics(b.port)
        assert samples["fanout_resumes_total"] == 1 and samples["fanout_resumes_refused_total"] == 5
        await back.ws.close()


async def test_a_token_after_the_resume_ttl_restores_nothing(tmp_path: Path) -> None:
    env = node_env(REDIS, FANOUT_RESUME_TTL="1")
    a, b = two_nodes(tmp_path, env)
    async with util_of(env) as util:
        frank = await V1.open(a.port, "user=frank&groups=h-late")
        await util.set_session(frank.client_id, {"k": "v"})
        await util.send_to_group("h-late", "seen")
        assert (await frank.frame())["data"] == "seen"
        token, positions = frank.snapshot()
        frank.abort()
        await until_gone(util, frank.client_id)
        await util.send_to_group("h-late", "missed")
        await asyncio.sleep(2.0)  # more than FANOUT_RESUME_TTL since it went
        back = await V1.open(b.port, "user=frank")
        await back.resume(token, positions)
        assert await back.frame() == {"type": "resumed", "recovered": False, "streams": {}}
        assert not await util.is_in_group(back.client_id, "h-late")
        assert await util.get_session(back.client_id) == {}
        await back.nothing_more(0.3)
        await back.ws.close()
