"""Real containers with podman: base images built locally, the project's image, its compose file.

Nothing can be pulled on these machines, so the images docker-compose.yml names (``python:3.11-slim``,
``redis:7-alpine``, ``rabbitmq:3.13-alpine``, ``nginx:1.27-alpine``) are stand-ins built from Debian
packages on a ``debootstrap`` base and tagged with those names; the project's own files run unchanged.
They stay in podman's image store between runs and are only built when ``podman image exists`` says
they are missing (or their recipe changed: a label holds its hash). podman-compose (1.6+, PyPI) lives in
its own venv beside the podman settings, in ``FANOUT_CONTAINER_CACHE`` (default /var/tmp/fanout-containers).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.nodes import ROOT

CACHE = Path(os.environ.get("FANOUT_CONTAINER_CACHE") or "/var/tmp/fanout-containers")
CONF = CACHE / "containers.conf"
COMPOSE_VENV = CACHE / "podman-compose"
PODMAN_COMPOSE_VERSION = "1.6.0"
BASE = "localhost/debian-min:bookworm"
RECIPE_LABEL = "fanout.recipe"

# the sandbox forbids raising rlimits above the host's (containers fail to start otherwise), and crun
# fails on this cgroup layout: runc with cgroupfs
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

_APT = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends"
_CLEAN = "rm -rf /var/lib/apt/lists/* /var/cache/apt/*"

#: image name -> Containerfile of its stand-in
STAND_INS: dict[str, str] = {
    "docker.io/library/python:3.11-slim": f"""\
FROM {BASE}
RUN {_APT} python3 python3-venv python3-pip python-is-python3 && {_CLEAN} \\
 && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED && ln -s /usr/bin/python3 /usr/local/bin/python
# pip trusts what the host trusts (after apt: ca-certificates would regenerate the bundle)
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1
CMD ["python3"]
""",
    "docker.io/library/redis:7-alpine": f"""\
FROM {BASE}
RUN {_APT} redis-server && {_CLEAN} \\
 && printf '#!/bin/sh\\n[ "$1" = redis-server ] && set -- "$@" --protected-mode no\\nexec "$@"\\n' \\
    > /usr/local/bin/entry && chmod +x /usr/local/bin/entry
ENTRYPOINT ["/usr/local/bin/entry"]
CMD ["redis-server"]
""",
    "docker.io/library/rabbitmq:3.13-alpine": f"""\
FROM {BASE}
RUN {_APT} rabbitmq-server && {_CLEAN} \\
 && printf 'loopback_users.guest = false\\nlisteners.tcp.default = 5672\\n' > /etc/rabbitmq/rabbitmq.conf \\
 && rm -f /etc/rabbitmq/rabbitmq-env.conf
ENV HOME=/var/lib/rabbitmq RABBITMQ_LOGS=- RABBITMQ_NODENAME=rabbit@localhost
USER rabbitmq
CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
""",
    "docker.io/library/nginx:1.27-alpine": f"""\
FROM {BASE}
RUN {_APT} nginx && {_CLEAN} \\
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
""",
}


def env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONF)}


def _run(
    what: str,
    command: Sequence[str],
    args: Sequence[str],
    *,
    check: bool,
    timeout: float,
    extra_env: Mapping[str, str] | None,
) -> subprocess.CompletedProcess[str]:
    """Run ``command args`` from the repository with the podman settings; with ``check``, fail loudly."""
    result = subprocess.run(
        [*command, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env(), **(extra_env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{what} {' '.join(args)} -> {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def podman(
    *args: str, check: bool = True, timeout: float = 120, extra_env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return _run("podman", ["podman"], args, check=check, timeout=timeout, extra_env=extra_env)


def missing_tools() -> list[str]:
    return [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]


def setup() -> dict[str, float]:
    """Everything but the project's image: settings, podman-compose, base and stand-in images.

    Returns how long each step that had to run took (seconds), by name.
    """
    timings: dict[str, float] = {}
    CACHE.mkdir(parents=True, exist_ok=True)
    if not CONF.exists() or CONF.read_text() != CONTAINERS_CONF:
        CONF.write_text(CONTAINERS_CONF)
    if not (COMPOSE_VENV / "bin" / "podman-compose").exists():
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(COMPOSE_VENV)], check=True, timeout=120)
        subprocess.run(
            [str(COMPOSE_VENV / "bin" / "pip"), "install", "-q", f"podman-compose=={PODMAN_COMPOSE_VERSION}"],
            check=True,
            timeout=300,
        )
        timings["podman-compose venv"] = time.monotonic() - start
    if podman("image", "exists", BASE, check=False).returncode != 0:
        start = time.monotonic()
        rootfs = CACHE / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
            check=True,
            capture_output=True,
            timeout=600,
        )
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            assert tar.stdout is not None
            with tar.stdout:  # podman reads it; this process must not keep its end open
                subprocess.run(
                    ["podman", "import", "-", BASE], stdin=tar.stdout, env=env(), check=True, timeout=300
                )
            tar.wait(60)
        shutil.rmtree(rootfs, ignore_errors=True)
        timings["debootstrap base image"] = time.monotonic() - start
    for name, recipe in STAND_INS.items():
        digest = hashlib.sha256(recipe.encode()).hexdigest()[:16]
        if podman("image", "exists", name, check=False).returncode == 0:
            label = podman("image", "inspect", "--format", f'{{{{index .Labels "{RECIPE_LABEL}"}}}}', name)
            if label.stdout.strip() == digest:
                continue
        start = time.monotonic()
        context = CACHE / "context" / name.rsplit("/", 1)[-1].replace(":", "-")
        context.mkdir(parents=True, exist_ok=True)
        (context / "Containerfile").write_text(recipe)
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", context / "ca-certificates.crt")
        build(context, name, containerfile=context / "Containerfile", labels={RECIPE_LABEL: digest})
        timings[f"stand-in {name.rsplit('/', 1)[-1]}"] = time.monotonic() - start
    return timings


def build(
    context: Path, tag: str, containerfile: Path | None = None, labels: Mapping[str, str] | None = None
) -> None:
    args = ["build", "--network", "host", "--format", "docker", "-q", "-t", tag]
    for key, value in (labels or {}).items():
        args += ["--label", f"{key}={value}"]
    if containerfile is not None:
        args += ["-f", str(containerfile)]
    podman(*args, str(context), timeout=600)


def compose(
    project: str,
    *args: str,
    profiles: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    command = [
        str(COMPOSE_VENV / "bin" / "podman-compose"),
        "-p",
        project,
        "-f",
        str(ROOT / "docker-compose.yml"),
    ]
    for profile in profiles:
        command += ["--profile", profile]
    return _run("podman-compose", command, args, check=check, timeout=timeout, extra_env=extra_env)


def leftovers(project: str) -> list[str]:
    """Containers, pods, networks and volumes of ``project`` that still exist."""
    found = []
    label = f"label=io.podman.compose.project={project}"
    for kind in ("container", "pod", "network", "volume"):
        args = [kind, "ls", "-q"] if kind != "container" else ["ps", "-a", "-q"]
        result = podman(*args, "--filter", label, check=False)
        found += [f"{kind} {line}" for line in result.stdout.split()]
    return found


def remove_project(project: str) -> None:
    """``podman-compose down -v`` for the project, then whatever it left (by the project's label)."""
    compose(project, "down", "-v", "-t", "5", profiles=("redis", "amqp"), check=False)
    label = f"label=io.podman.compose.project={project}"
    for line in podman("ps", "-a", "-q", "--filter", label, check=False).stdout.split():
        podman("rm", "-f", "-t", "0", line, check=False)
    for kind in ("pod", "network", "volume"):
        for line in podman(kind, "ls", "-q", "--filter", label, check=False).stdout.split():
            podman(kind, "rm", "-f", line, check=False)
