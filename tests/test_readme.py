"""The README's promises: its example runs, its commands exist, its table lists every variable."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import orjson

from tests.support import free_port
from tests.support.nodes import (
    ROOT,
    NodeProcess,
    client,
    http_get,
    nothing_more,
    recv,
    run_module,
    start_node,
    unique_namespace,
)
from tests.support.redis_servers import start_redis

README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


async def test_the_readme_example_runs_against_a_real_node(tmp_path: Path) -> None:
    (example,) = _blocks("python")
    redis = start_redis(tmp_path)
    try:
        node = start_node(tmp_path, {"FANOUT_URL": redis.url})  # tests.apps.lobby: clients join "lobby"
        ws, _client_id = await client(node.port)
        await asyncio.sleep(0.2)
        script = tmp_path / "example.py"
        script.write_text(example.replace("redis://127.0.0.1:6379/0", redis.url))
        run = partial(subprocess.run, [sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
        result = await asyncio.get_running_loop().run_in_executor(None, run)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "1 connections online"
        assert orjson.loads(await recv(ws)) == {"text": "hello from a worker"}
        assert await nothing_more(ws)  # user-42 is not online: no mail
        await ws.close()
        assert node.terminate() == 0
    finally:
        redis.stop()


async def test_the_readme_one_liner_raises_no_live_nodes_where_no_node_runs(tmp_path: Path) -> None:
    one_liner = 'SyncServerUtil.from_env().send_to_group("lobby", "hi")'
    assert f"`{one_liner}`" in README
    script = tmp_path / "cron.py"
    script.write_text(f"from fanout import SyncServerUtil\n\n{one_liner}\n")
    ns = unique_namespace("readme")
    env = {"FANOUT_URL": "redis://127.0.0.1:6379/0", "FANOUT_NAMESPACE": ns}
    env["FANOUT_HEARTBEAT_INTERVAL"] = "0.5"  # the node's and the script's

    def run() -> subprocess.CompletedProcess[str]:  # a fresh process, as a cron job would be
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")} | env
        return subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=full_env
        )

    result = await asyncio.get_running_loop().run_in_executor(None, run)
    assert result.returncode == 1
    assert f"NoLiveNodes: no live nodes in namespace '{ns}'" in result.stderr, result.stderr
    node = start_node(tmp_path, env)  # tests.apps.lobby: clients join "lobby"
    ws, _client_id = await client(node.port)
    result = await asyncio.get_running_loop().run_in_executor(None, run)
    assert result.returncode == 0, result.stderr
    assert await recv(ws) == "hi"
    await ws.close()
    assert node.terminate() == 0


def test_the_readme_commands_are_what_ci_runs() -> None:
    shell = [line.strip() for block in _blocks("sh") for line in block.splitlines() if line.strip()]
    assert shell == ["scripts/run-node.sh", "scripts/test.sh"]
    assert "scripts/test.sh" in (ROOT / ".ci/run").read_text()
    for command in shell:
        assert (ROOT / command).stat().st_mode & 0o111, f"{command} is not executable"


def test_the_readme_node_command_builds_its_venv_and_serves_the_demo(tmp_path: Path) -> None:
    """``scripts/run-node.sh`` in a checkout that has no venv yet (a new user's first command): it builds
    ``.venv`` from the lock and runs a node on the embedded default that serves the demo page, then stops
    on SIGTERM with status 0."""
    checkout = tmp_path / "checkout"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # (a file deleted in the working tree and not yet committed: left out)
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FANOUT_", "VIRTUAL_ENV"))}
    env["FANOUT_PORT"] = str(port)
    log_path = tmp_path / "run-node.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["scripts/run-node.sh"], cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    node = NodeProcess(port, env, proc, log_path)  # (the script execs the node: this is its pid)
    try:
        node.wait_healthy(timeout=600)  # building the venv first: about 25 s here
        status, page = http_get(port, "/")
        assert status == 200 and "<html" in page.lower()
        assert (checkout / ".venv" / "bin" / "fanout-node").exists()
        assert node.terminate(30) == 0
    finally:
        node.kill()


def test_every_environment_variable_is_documented() -> None:
    used: set[str] = set()
    for path in [*ROOT.glob("fanout/**/*.py"), *ROOT.glob("node/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        used |= set(re.findall(r"\bFANOUT_[A-Z_]+\b", path.read_text()))
    used = {name for name in used if not name.endswith("_")}
    documented = set(re.findall(r"`(FANOUT_[A-Z_]+)`", README))
    assert used - documented == set(), "undocumented variables"


def test_cli_help_lists_every_command() -> None:
    result = run_module("fanout", "--help")
    assert result.returncode == 0
    for command in (
        "send",
        "send-by-flag",
        "send-to-group",
        "send-to-all",
        "close",
        "close-by-flag",
        "join",
        "leave",
        "dissolve",
        "bind",
        "unbind",
        "stats",
        "nodes",
    ):
        assert command in result.stdout
