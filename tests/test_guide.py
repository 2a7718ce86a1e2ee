"""The guide's node application, token snippet and commands run exactly as printed, on real processes."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import orjson
import pytest
from websockets.exceptions import InvalidStatus

from fanout import tokens
from tests.support import free_port
from tests.support.nodes import (
    ROOT,
    STARTED,
    NodeProcess,
    client,
    nothing_more,
    recv,
    start_node,
    unique_namespace,
)
from tests.support.workers import WorkerProcess

GUIDE = (ROOT / "docs" / "guide.md").read_text()
WORKERS = (ROOT / "docs" / "workers.md").read_text()


def _block(first_line: str, page: str = GUIDE) -> str:
    """The python block of a docs page whose first line is ``first_line`` (a file name comment)."""
    for block in re.findall(r"```python\n(.*?)```", page, flags=re.S):
        if block.splitlines()[0].startswith(first_line):
            return str(block)
    raise AssertionError(f"the page has no block starting with {first_line!r}")


def _run_as_printed(
    command: str, folder: Path, env: Mapping[str, str], port: int, tmp_path: Path
) -> NodeProcess:
    """Run a command line of the docs as a user would: from ``folder`` (which holds the application),
    the installed console scripts on the PATH, no PYTHONPATH; the line's ``VAR=value`` prefixes set
    those variables, unless ``env`` gives a local value (a broker here, not 10.0.0.5)."""
    words = shlex.split(command)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_") and k != "PYTHONPATH"}
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        full_env[name] = value
    full_env.update(env)
    full_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full_env.get("PATH", "")])
    log_path = tmp_path / f"{words[0]}-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(words, env=full_env, cwd=folder, stdout=log_file, stderr=subprocess.STDOUT)
    started = (WorkerProcess if words[:2] == ["fanout", "worker"] else NodeProcess)(
        port, full_env, proc, log_path, words
    )
    STARTED.append(started)
    started.wait_healthy()
    return started


def _write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "__init__.py").touch()
    path.write_text(text)
    return path


async def test_the_guides_chat_app_and_token_snippet_run_as_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = tmp_path / "code"
    _write(code, "mychat/events.py", _block("# mychat/events.py"))
    tokens_file = _write(code, "webapp/chat_tokens.py", _block("# webapp/chat_tokens.py"))
    key = "guide-key-" + unique_namespace()
    monkeypatch.setenv("CHAT_TOKEN_KEY", key)
    spec = importlib.util.spec_from_file_location("guide_chat_tokens", tokens_file)
    assert spec is not None and spec.loader is not None
    webapp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(webapp)

    env = {
        "FANOUT_URL": "redis://127.0.0.1:6379/0",
        "FANOUT_NAMESPACE": unique_namespace(),
        "CHAT_TOKEN_KEY": key,
        "PYTHONPATH": str(code),
    }
    node = start_node(tmp_path, env, app="mychat.events:Events")
    with pytest.raises(InvalidStatus) as refused:
        await client(node.port, "/?token=not-a-token")
    assert refused.value.response.status_code == 401

    ann, _ = await client(node.port, "/?token=" + webapp.chat_token("user-1", "Ann"))
    assert orjson.loads(await recv(ann)) == {"type": "joined", "name": "Ann"}
    bob, _ = await client(node.port, "/?token=" + webapp.chat_token("user-2", "Bob"))
    assert orjson.loads(await recv(bob)) == {"type": "joined", "name": "Bob"}
    assert orjson.loads(await recv(ann)) == {"type": "joined", "name": "Bob"}

    await ann.send(orjson.dumps({"type": "say", "text": "hi all"}).decode())
    said = {"type": "said", "from": "user-1", "name": "Ann", "text": "hi all"}
    assert orjson.loads(await recv(ann)) == said and orjson.loads(await recv(bob)) == said

    await bob.send(orjson.dumps({"type": "join", "room": "r1"}).decode())
    await bob.send(orjson.dumps({"type": "say", "room": "r1", "text": "just me"}).decode())
    assert orjson.loads(await recv(bob)) == {
        "type": "said",
        "from": "user-2",
        "name": "Bob",
        "text": "just me",
    }
    await ann.send(orjson.dumps({"type": "say", "room": "r1", "text": "not a member"}).decode())
    assert await nothing_more(ann) and await nothing_more(bob)

    await bob.close()
    assert orjson.loads(await recv(ann)) == {"type": "left", "name": "Bob"}
    await ann.close()
    assert node.terminate() == 0
    assert "Traceback" not in node.log()


async def test_the_guides_commands_run_as_printed_from_the_folder_of_the_app(tmp_path: Path) -> None:
    # docs/guide.md's node application, and docs/workers.md's node and worker, each started with the
    # command printed on the page, from the folder holding the application: nothing on PYTHONPATH
    code = tmp_path / "code"
    _write(code, "mychat/events.py", _block("# mychat/events.py"))
    _write(code, "myapp/node.py", _block("# myapp/node.py", WORKERS))
    _write(code, "myapp/worker.py", _block("# myapp/worker.py", WORKERS))
    key = "guide-key-" + unique_namespace()
    local = {
        "FANOUT_URL": "redis://127.0.0.1:6379/0",
        "CHAT_TOKEN_KEY": key,
        "FANOUT_HEARTBEAT_INTERVAL": "0.5",
    }

    guide_command = re.search(r"# mychat/events.py — run with: (.*)", GUIDE)
    assert guide_command is not None
    port = free_port()
    env = {**local, "FANOUT_NAMESPACE": unique_namespace(), "FANOUT_PORT": str(port)}
    chat = _run_as_printed(guide_command[1], code, env, port, tmp_path)
    ann, _ = await client(port, "/?token=" + tokens.issue(key, "user-1", claims={"name": "Ann"}))
    assert orjson.loads(await recv(ann)) == {"type": "joined", "name": "Ann"}
    await ann.close()
    assert chat.terminate() == 0

    (node_command,) = re.findall(r"\n(FANOUT_URL=\S+ FANOUT_EVENTS=\S+ fanout-node .*)\n", WORKERS)
    worker_command = re.search(r"# myapp/worker.py — run with: (.*)", WORKERS)
    assert worker_command is not None
    namespace, port, worker_port = unique_namespace(), free_port(), free_port()
    env = {**local, "FANOUT_NAMESPACE": namespace, "FANOUT_PORT": str(port)}
    node = _run_as_printed(node_command, code, env, port, tmp_path)
    worker_env = {**local, "FANOUT_NAMESPACE": namespace, "FANOUT_WORKER_PORT": str(worker_port)}
    worker = _run_as_printed(worker_command[1], code, worker_env, worker_port, tmp_path)
    bob, _ = await client(port, "/?token=" + tokens.issue(key, "user-2"))
    await bob.send("hello workers")
    assert orjson.loads(await recv(bob, 15)) == {"from": "user-2", "text": "hello workers"}
    assert worker.terminate() == 0  # before the close: that page's on_close is a sketch
    await bob.close()
    assert node.terminate() == 0
