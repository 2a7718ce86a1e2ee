"""The Django example project (examples/django/) as tests run it: its processes (runserver, celery,
manage.py commands) and a browser's HTTP side (session and CSRF cookies, form POSTs, the page's token)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.support import scaled
from tests.support.nodes import ROOT, recv

EXAMPLE = ROOT / "examples" / "django"


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return f"--- {self.name} ---\n" + self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(scaled(10))


def spawn(name: str, args: list[str], env: Mapping[str, str], tmp_path: Path) -> Process:
    """Run ``args`` in examples/django/ as the guide does, with the settings from ``env`` only."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FANOUT_", "CELERY_", "PUSH_"))}
    full_env.update({"PYTHONUNBUFFERED": "1", **env})
    log_path = tmp_path / f"{name}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(args, env=full_env, cwd=EXAMPLE, stdout=log_file, stderr=subprocess.STDOUT)
    return Process(name, proc, log_path)


class Browser:
    """What the example page does over HTTP: a cookie jar (session, CSRF cookie) and form POSTs."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def csrf(self) -> str:
        return next((cookie.value or "" for cookie in self.jar if cookie.name == "csrftoken"), "")

    def request(self, method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, Any]:
        data = urlencode(form or {}).encode() if method == "POST" else None
        headers = {"X-CSRFToken": self.csrf()} if method == "POST" else {}
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with self.opener.open(request, timeout=scaled(10)) as answer:
                status, body, kind = answer.status, answer.read(), answer.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            status, body, kind = exc.code, exc.read(), exc.headers.get_content_type()
        return status, orjson.loads(body) if kind == "application/json" else body.decode()

    async def get(self, path: str) -> tuple[int, Any]:
        return await asyncio.to_thread(self.request, "GET", path)

    async def post(self, path: str, form: dict[str, str] | None = None) -> tuple[int, Any]:
        return await asyncio.to_thread(self.request, "POST", path, form)

    async def login(self, user: str) -> None:
        status, page = await self.get("/")  # the page sets the CSRF cookie
        assert status == 200 and "log in" in page
        assert await self.post("/login", {"user": user}) == (200, {"user": user})

    async def connect(self) -> tuple[ClientConnection, str]:
        """The page's script: a token from /token, then the websocket to the node it names."""
        status, issued = await self.get("/token")
        assert status == 200, issued
        ws = await connect(issued["url"] + "?token=" + issued["token"])
        welcome = orjson.loads(await recv(ws))
        assert welcome["type"] == "welcome", welcome
        return ws, welcome["client_id"]
