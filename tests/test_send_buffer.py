"""The send-buffer bound in a burst: a real node process, a publisher on Redis, real clients.

Clients that keep reading must never be cut off for the frames the node itself holds to coalesce a
batch, while clients that never read are cut off and the node's memory stays bounded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from websockets.asyncio.client import ClientConnection

from fanout import ServerUtil
from tests.support.nodes import client, metrics, recv, stalled_websocket, start_node, unique_namespace

REDIS_URL = "redis://127.0.0.1:6379/0"
SEND_BUFFER = 256 * 1024
READERS, STALLED = 20, 20
#: frames of 4 KiB in a burst, and bursts: 640 KiB at once is more than twice the send buffer but fits
#: in what the kernel takes for a client before it reads; 7.5 MiB in all is more than the kernel takes
#: for one that never reads (about 4 MiB on loopback), so those are cut off
BURST, BURSTS = 160, 12


async def test_readers_get_a_burst_whole_and_only_clients_that_never_read_are_cut_off(
    tmp_path: Path,
) -> None:
    ns = unique_namespace()
    node = start_node(
        tmp_path,
        {"FANOUT_URL": REDIS_URL, "FANOUT_NAMESPACE": ns, "FANOUT_SEND_BUFFER": str(SEND_BUFFER)},
    )  # the lobby app: every client is in the group "lobby"
    readers = [(await client(node.port))[0] for _ in range(READERS)]
    stalled = [stalled_websocket(node.port) for _ in range(STALLED)]
    async with ServerUtil(REDIS_URL, namespace=ns, heartbeat_interval=0.5) as util:
        for _ in range(100):
            if await util.get_group_count("lobby") == READERS + STALLED:
                break
            await asyncio.sleep(0.05)
        rss_before = node.rss_kib("VmHWM")
        filler = b"x" * 4091  # a 4 KiB frame with its number in front

        async def read_burst(ws: ClientConnection) -> list[bytes | str]:
            return [await recv(ws, 30) for _ in range(BURST)]

        for burst in range(BURSTS):
            # a burst: its publishes all under way at once, so that the node takes them in one batch
            first = burst * BURST
            expected = [b"%05d" % i + filler for i in range(first, first + BURST)]
            await asyncio.gather(*(util.send_to_group("lobby", frame) for frame in expected))
            # the readers keep up: they take the whole burst (in order, none missing) before the next
            got = await asyncio.gather(*(read_burst(ws) for ws in readers))
            assert got == [expected] * READERS
    samples = await metrics(node.port)
    assert samples["fanout_slow_client_disconnects_total"] == STALLED  # the stalled ones only
    grown_mib = (node.rss_kib("VmHWM") - rss_before) / 1024
    assert grown_mib < 60, f"node peak memory grew {grown_mib:.1f} MiB"
    for sock in stalled:
        sock.close()
    for ws in readers:
        await ws.close()
    assert node.terminate() == 0
