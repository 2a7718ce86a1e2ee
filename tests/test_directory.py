"""The live-node directory: heartbeats keep a node alive for its ttl; a bye removes it at once."""

from __future__ import annotations

from fanout.commands import NodeInfo
from fanout.directory import NodeDirectory


def info(instance: str, ttl: float = 3.0, connections: int = 0) -> NodeInfo:
    return NodeInfo(instance=instance, node_id=instance.split(".")[0], connections=connections, ttl=ttl)


def test_a_node_is_live_until_its_ttl_runs_out() -> None:
    directory = NodeDirectory()
    directory.heard(info("a.1", ttl=3.0), now=100.0)
    assert directory.is_live("a.1", 102.9)
    assert list(directory.live(102.9)) == ["a.1"]
    assert not directory.is_live("a.1", 103.0)
    assert directory.live(103.0) == {}
    # expired nodes are forgotten, not just hidden
    assert not directory.is_live("a.1", 100.0)


def test_each_heartbeat_extends_the_ttl_and_updates_the_record() -> None:
    directory = NodeDirectory()
    directory.heard(info("a.1", connections=1), now=0.0)
    directory.heard(info("a.1", connections=5), now=2.0)
    assert directory.live(4.0)["a.1"].connections == 5
    assert directory.is_live("a.1", 4.9)
    assert not directory.is_live("a.1", 5.0)


def test_ttl_is_per_node() -> None:
    directory = NodeDirectory()
    directory.heard(info("fast.1", ttl=1.0), now=0.0)
    directory.heard(info("slow.1", ttl=10.0), now=0.0)
    assert set(directory.live(0.5)) == {"fast.1", "slow.1"}
    assert set(directory.live(5.0)) == {"slow.1"}


def test_bye_drops_a_node_at_once() -> None:
    directory = NodeDirectory()
    directory.heard(info("a.1"), now=0.0)
    directory.heard(info("b.1"), now=0.0)
    directory.gone("a.1")
    assert set(directory.live(0.1)) == {"b.1"}
    assert not directory.is_live("a.1", 0.1)
    directory.gone("never-heard")  # harmless
    # a node that comes back after its bye is live again
    directory.heard(info("a.1"), now=1.0)
    assert directory.is_live("a.1", 1.0)


def test_unknown_nodes_are_not_live() -> None:
    assert not NodeDirectory().is_live("x.1", 0.0)
    assert NodeDirectory().live(0.0) == {}
