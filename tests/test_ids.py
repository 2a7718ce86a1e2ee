"""Client ids and node instances: unique, never reused, and naming their owner; history epochs and send
ids unique across forked processes."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanout.history import new_epoch, new_send_id
from fanout.ids import ClientIds, base36, instance_id, new_boot_token, owner_of


def test_client_ids_are_unique_and_name_their_instance() -> None:
    ids = ClientIds("node-1.abc")
    issued = [ids.next() for _ in range(5000)]
    assert len(set(issued)) == len(issued)
    assert issued[:3] == ["node-1.abc.1", "node-1.abc.2", "node-1.abc.3"]
    assert all(owner_of(client_id) == "node-1.abc" for client_id in issued)


def test_boot_tokens_differ_so_restarts_never_reuse_ids() -> None:
    tokens = {new_boot_token() for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(t.isascii() and t.isalnum() and t == t.lower() and "." not in t for t in tokens)
    first = ClientIds(instance_id("web")).next()
    second = ClientIds(instance_id("web")).next()  # same node id, "restarted"
    assert first != second
    assert owner_of(first) != owner_of(second)


def test_instance_id() -> None:
    assert instance_id("node-1", "boot") == "node-1.boot"
    node_id, _, boot = instance_id("a.b.c").rpartition(".")
    assert node_id == "a.b.c"
    assert boot


@pytest.mark.parametrize(
    ("client_id", "owner"),
    [
        ("node-1.abc.1", "node-1.abc"),
        ("web.eu-1.prod.lq2x8k0c.zz", "web.eu-1.prod.lq2x8k0c"),  # dotted node id
        ("n.b.Z9", "n.b"),
    ],
)
def test_owner_of(client_id: str, owner: str) -> None:
    assert owner_of(client_id) == owner


@pytest.mark.parametrize(
    "client_id",
    [
        *("", "abc", ".", "..", "a.1", "a.b.", "a..1", ".b.1", "a.b.c-d", "a.b.1 ", "a.b.c/d"),
        *("a.b.\u0661", "a.bé.1"),  # non-ASCII "digits" and letters are not base 36
    ],
)
def test_malformed_client_ids_have_no_owner(client_id: str) -> None:
    assert owner_of(client_id) is None


@given(st.text(st.sampled_from("ab-_.")), st.text("0123456789abcdefghijklmnopqrstuvwxyz", min_size=1))
def test_owner_of_inverts_client_id_issue(node_id: str, boot: str) -> None:
    if not node_id:
        return
    instance = instance_id(node_id, boot)
    ids = ClientIds(instance)
    for _ in range(3):
        assert owner_of(ids.next()) == instance


@given(st.integers(0, 2**80))
def test_base36(number: int) -> None:
    assert int(base36(number), 36) == number


def test_a_forked_process_draws_other_epochs_and_send_ids() -> None:
    """They come from the random module's generator, which a forked child (a worker process, a node's
    --processes) must not share with its parent."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, (new_send_id() + new_epoch()).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 24).decode()
    os.close(read)
    os.close(write)
    assert len(child) == 24 and child != new_send_id() + new_epoch()
