"""The guide's node application and token snippet run exactly as printed, on a real node on Redis."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import orjson
import pytest
from websockets.exceptions import InvalidStatus

from tests.support.nodes import ROOT, client, nothing_more, recv, start_node, unique_namespace

GUIDE = (ROOT / "docs" / "guide.md").read_text()


def _block(first_line: str) -> str:
    """The python block of the guide whose first line is ``first_line`` (a file name comment)."""
    for block in re.findall(r"```python\n(.*?)```", GUIDE, flags=re.S):
        if block.splitlines()[0].startswith(first_line):
            return str(block)
    raise AssertionError(f"the guide has no block starting with {first_line!r}")


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
