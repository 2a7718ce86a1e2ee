"""The distribution as a user installs it: a wheel in a clean venv, with only the extra a publisher needs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support.nodes import ROOT

_NOT_SOURCES = (".git", ".venv*", "build", "dist", "*.egg-info", "node_modules", "__pycache__", ".*_cache")


def _run(*args: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_wheel_installs_with_only_what_a_redis_publisher_needs(tmp_path: Path) -> None:
    # built from a copy of the sources: setuptools keeps a build/ folder in the tree it builds
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCES))
    _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", source, cwd=tmp_path
    )
    (wheel,) = (tmp_path / "dist").glob("fanout-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "fanout/py.typed",
        "fanout_node/py.typed",
        "fanout_node/static/index.html",
        "fanout_node/static/fanout.js",
        "fanout/django/migrations/0001_outbox.py",  # fanout.django: an app, its migration and command
        "fanout/django/management/commands/fanout_relay.py",
    ):
        assert expected in names, expected
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fanout = fanout.cli:main" in scripts and "fanout-node = fanout_node.main:main" in scripts
    assert not any(n.startswith("node/") for n in names)  # no generic top-level name taken

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", f"{wheel}[redis]", cwd=tmp_path)
    installed = _run(python, "-m", "pip", "list", "--format=freeze", cwd=tmp_path).lower()
    assert "redis==" in installed and "orjson==" in installed
    for absent in ("websockets", "aio-pika", "aiormq", "prometheus-client", "uvloop", "psycopg"):
        assert absent not in installed, f"{absent} installed for a redis publisher"
    assert (venv / "bin" / "fanout").exists() and (venv / "bin" / "fanout-node").exists()
    # a backend whose client is not installed: an error that names the extra
    script = (
        "from fanout import SyncServerUtil\n"
        "try:\n"
        "    SyncServerUtil('amqp://guest:guest@127.0.0.1:5672/', namespace='pkg').send_to_group('g', 'x')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = _run(python, "-c", script, cwd=tmp_path)  # (not from the checkout: cwd is elsewhere)
    assert out.startswith("ConfigError") and "pip install 'fanout[amqp]'" in out, out
    # the outbox's commands without psycopg: one line naming the extra (fanout.Outbox itself needs none)
    done = subprocess.run(
        [venv / "bin" / "fanout", "relay", "--dsn", "postgresql://127.0.0.1/x"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "pip install 'fanout[outbox]'" in done.stderr, done.stderr
    _run(python, "-c", "import fanout; fanout.Outbox", cwd=tmp_path)
    # the same for the worker tier: its event log names the extra too
    script = (
        "import fanout\n"
        "try:\n"
        "    fanout.Worker(object(), 'amqp://guest:guest@127.0.0.1:5672/', namespace='pkg')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = _run(python, "-c", script, cwd=tmp_path)
    assert out.startswith("ConfigError") and "pip install 'fanout[amqp]'" in out, out
    # the node: its extra, its console script, under its own name (no top-level `node` taken)
    _run(python, "-m", "pip", "install", "-q", f"{wheel}[node]", cwd=tmp_path)
    assert "SO_REUSEPORT" in _run(venv / "bin" / "fanout-node", "--help", cwd=tmp_path)
    _run(python, "-c", "import fanout_node.app", cwd=tmp_path)
    taken = subprocess.run([python, "-c", "import node"], cwd=tmp_path, capture_output=True, text=True)
    assert taken.returncode != 0 and "No module named 'node'" in taken.stderr


def test_an_editable_publisher_install_is_quiet_typed_and_names_the_node_extra(tmp_path: Path) -> None:
    # README's editable install (strict mode) of a copy of the checkout, with only the redis extra
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCES))
    readme = (ROOT / "README.md").read_text().replace("\n", " ")
    (command,) = re.findall(
        r"`(pip install -e path/to/fanout --config-settings editable_mode=strict)`", readme
    )
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    args = [f"{source}[redis]" if word == "path/to/fanout" else word for word in shlex.split(command)]
    built = subprocess.run(
        [python, "-m", *args, "-v"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert built.returncode == 0, built.stdout
    assert "would be ignored" not in built.stdout and "absent from the `packages`" not in built.stdout

    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing found through the current directory
    elsewhere.mkdir()
    # fanout-node without the [node] extra: one line naming it, status 2
    node = subprocess.run([venv / "bin" / "fanout-node"], cwd=elsewhere, capture_output=True, text=True)
    assert node.returncode == 2 and node.stdout == "", node.stdout + node.stderr
    (line,) = node.stderr.strip().splitlines()
    assert 'pip install "fanout[node]"' in line and "websockets" in line, line
    # examples/chat's node app imports the installed package, not the checkout's node/
    shutil.copytree(ROOT / "examples" / "chat", elsewhere / "examples" / "chat")
    (elsewhere / "examples" / "__init__.py").touch()
    loaded = "import examples.chat.node_app as m; print(m.app.__mro__[1].__module__)"
    assert _run(python, "-c", loaded, cwd=elsewhere).strip() == "fanout_node.app"
    # mypy, run outside the checkout, sees the editable install and its types
    (elsewhere / "check.py").write_text(
        "import fanout\n"
        "from fanout_node.app import DemoChat\n\n\n"
        "def notify(util: fanout.SyncServerUtil) -> int:\n"
        '    return util.send_to_group("lobby", "hi", ack=True)\n\n\n'
        "demo: DemoChat = DemoChat()\n"
    )
    mypy = [sys.executable, "-m", "mypy", "--strict", "--python-executable", python, "check.py"]
    assert "Success" in _run(*mypy, cwd=elsewhere)
