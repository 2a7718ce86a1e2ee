"""Issue 17's acceptance, with the worker tier and in the browser: a resumed connection's ``open`` event
carries ``resumed_from`` (a real worker process, tests/apps/recording_worker.py); the JS client
(``/fanout.js`` with ``recover: true``) in headless Chromium, its node SIGKILLed while sends go on, gets
every send once, in order, and ``onResumed`` says ``recovered: true``. Real node processes on Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.apps.recording_worker import read_records
from tests.support.continuity import REDIS, V1, forgetting, node_env, two_nodes, until, util_of
from tests.support.workers import start_worker
from tests.test_js_client import browser_page, wait_for


@pytest.fixture(autouse=True)
def _forget_namespaces() -> Iterator[None]:
    yield from forgetting()


async def test_a_resumed_connections_open_event_carries_the_old_client_id(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    env = node_env(REDIS, FANOUT_EVENTS="open,message,close")
    a, b = two_nodes(tmp_path, env)
    start_worker(tmp_path, {**env, "RECORDING_WORKER_DIR": str(records)})

    def handled(kind: str, cid: str) -> list[dict[str, Any]]:
        return [r for r in read_records(records) if r["kind"] == kind and r["cid"] == cid]

    async with util_of(env) as util:
        ann = await V1.open(a.port, "user=ann&groups=h-work")
        await ann.ws.send(orjson.dumps({"type": "message", "data": "first"}).decode())  # (its open goes)
        assert (await ann.frame())["data"] == {"echo": "first"}  # (the app echoes)
        await util.send_to_group("h-work", "seen")
        assert (await ann.frame())["data"] == "seen"
        old = ann.client_id
        token, positions = ann.snapshot()
        ann.abort()
        await util.send_to_group("h-work", "missed")

        back = await V1.open(b.port, "user=ann")
        await back.resume(token, positions)
        replay, resumed = await back.until_resumed()
        assert [f["data"] for f in replay] == ["missed"] and resumed["recovered"] is True
        await back.ws.send(orjson.dumps({"type": "message", "data": "after"}).decode())
        # a resume that restores nothing (the token is used) is no resume: no resumed_from
        other = await V1.open(b.port, "user=ann")
        await other.resume(token, positions)
        assert (await other.frame())["recovered"] is False
        await other.ws.send(orjson.dumps({"type": "message", "data": "other"}).decode())

        new = back.client_id
        await until(lambda: handled("message", new) and handled("message", other.client_id), 20, "the events")
        await until(lambda: handled("close", old), 20, "the old connection's close")
        assert [r["resumed_from"] for r in handled("open", old)] == [None]
        assert [r["resumed_from"] for r in handled("open", new)] == [old]
        assert [r["resumed_from"] for r in handled("open", other.client_id)] == [None]
        assert [r["data"] for r in handled("message", old)] == ["first"]
        assert [r["data"] for r in handled("message", new)] == ["after"]
        # the open event's snapshot has the state the resume brought back
        (opened,) = handled("open", new)
        assert opened["flag"] == "ann"
        await back.ws.close()
        await other.ws.close()


PAGE_CLIENT = """import('/fanout.js').then((m) => new Promise((resolve) => {
  window.log = [];
  window.client = m.connect(%s, {
    recover: true, minDelay: 50, maxDelay: 300,
    onMessage: (d) => log.push(d),
    onResumed: (r) => log.push({resumed: r}),
    onWelcome: () => resolve(true),
  });
}))"""


async def test_the_js_client_gets_every_send_once_in_order_across_its_killed_node(tmp_path: Path) -> None:
    env = node_env(REDIS)
    a, b = two_nodes(tmp_path, env)
    query = "?user=ann&groups=h-page"
    urls = [f"ws://127.0.0.1:{a.port}/{query}", f"ws://127.0.0.1:{b.port}/{query}"]
    sent = 0
    stop = asyncio.Event()
    async with (
        util_of(env) as util,
        # the page comes from node-b, which lives: the page's node is node-a, the first of its list
        browser_page(tmp_path / "profile", f"http://127.0.0.1:{b.port}/") as page,
    ):
        await wait_for(page, "location.protocol === 'http:' && document.readyState === 'complete'")
        await page.evaluate(PAGE_CLIENT % orjson.dumps(urls).decode())
        assert await page.evaluate("[client.v1, client.nodeId]") == [True, "node-a"]

        async def publish() -> None:
            nonlocal sent
            while not stop.is_set():
                await util.send_to_group("h-page", {"n": sent})
                sent += 1
                await asyncio.sleep(0.01)

        publishing = asyncio.create_task(publish())
        try:
            await wait_for(page, "log.length >= 20", timeout=10)
            a.kill()  # SIGKILL, the sends going on
            await wait_for(page, "client.resumed", timeout=20)
            at_resume = sent
            await until(lambda: sent >= at_resume + 20, 20, "sends after the resume")
        finally:
            stop.set()
            await publishing
        await wait_for(page, f"log.filter((e) => e.n !== undefined).length >= {sent}", timeout=20)
        await asyncio.sleep(0.3)  # a duplicate would come meanwhile
        log: list[Any] = await page.evaluate("log")
        resumed = [entry for entry in log if "resumed" in entry]
        assert [entry for entry in log if "resumed" not in entry] == [{"n": n} for n in range(sent)]
        assert len(resumed) == 1 and resumed[0]["resumed"]["recovered"] is True, resumed
        assert resumed[0]["resumed"]["streams"]["group:h-page"]["recovered"] is True
        assert await page.evaluate("[client.nodeId, client.positions['group:h-page'].offset]") == [
            "node-b",
            sent,
        ]
