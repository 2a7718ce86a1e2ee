"""The distribution as a user installs it: a wheel in a clean venv, with only the extra a publisher needs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support.nodes import ROOT


def _run(*args: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_wheel_installs_with_only_what_a_redis_publisher_needs(tmp_path: Path) -> None:
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", ROOT, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("fanout-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("fanout/py.typed", "node/py.typed", "node/static/index.html", "node/static/fanout.js"):
        assert expected in names, expected
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fanout = fanout.cli:main" in scripts and "fanout-node = node.main:main" in scripts

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", f"{wheel}[redis]", cwd=tmp_path)
    installed = _run(python, "-m", "pip", "list", "--format=freeze", cwd=tmp_path).lower()
    assert "redis==" in installed and "orjson==" in installed
    for absent in ("websockets", "aio-pika", "aiormq", "prometheus-client", "uvloop"):
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
