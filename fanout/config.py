"""Settings: one frozen value, built from keyword arguments or from the environment.

Environment variables are read only here (``Settings.from_env`` / ``NodeSettings.from_env``), at the
process edge; everything else takes a ``Settings``. Every bad value raises :class:`ConfigError` whose
message names the variable and the accepted values.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .exceptions import ConfigError
from .history import MAX_HISTORY_SIZE, Policy

_T = TypeVar("_T")

SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class Mode(StrEnum):
    FANOUT = "fanout"  #: every node receives every command
    ROUTING = "routing"  #: a node receives only the commands that concern its connections


class BackendKind(StrEnum):
    MEMORY = "memory"
    REDIS = "redis"
    AMQP = "amqp"


_SCHEMES: dict[str, BackendKind] = {
    "memory": BackendKind.MEMORY,
    "redis": BackendKind.REDIS,
    "rediss": BackendKind.REDIS,
    "redis+cluster": BackendKind.REDIS,
    "rediss+cluster": BackendKind.REDIS,
    "amqp": BackendKind.AMQP,
    "amqps": BackendKind.AMQP,
}

DEFAULT_URLS: dict[BackendKind, str] = {
    BackendKind.MEMORY: "memory://",
    BackendKind.REDIS: "redis://127.0.0.1:6379/0",
    BackendKind.AMQP: "amqp://guest:guest@127.0.0.1:5672/",
}


def _choices(enum: type[StrEnum]) -> str:
    return ", ".join(repr(m.value) for m in enum)


def parse_mode(value: str | Mode, setting: str = "FANOUT_MODE") -> Mode:
    try:
        return Mode(str(value).strip().lower())
    except ValueError:
        raise ConfigError(setting, f"unknown mode {value!r}; accepted: {_choices(Mode)}") from None


def parse_backend(value: str | BackendKind, setting: str = "FANOUT_BACKEND") -> BackendKind:
    try:
        return BackendKind(str(value).strip().lower())
    except ValueError:
        raise ConfigError(setting, f"unknown backend {value!r}; accepted: {_choices(BackendKind)}") from None


def backend_for_url(url: str, setting: str = "FANOUT_URL") -> BackendKind:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    try:
        return _SCHEMES[scheme]
    except KeyError:
        accepted = ", ".join(f"{s}://" for s in _SCHEMES)
        raise ConfigError(
            setting, f"unsupported URL {redact_url(url)!r}; accepted schemes: {accepted}"
        ) from None


def validate_url(kind: BackendKind, url: str, setting: str = "FANOUT_URL") -> str:
    """Check that ``url`` suits ``kind``; return it unchanged."""
    found = backend_for_url(url, setting)
    if found is not kind:
        raise ConfigError(setting, f"URL {redact_url(url)!r} is a {found} URL but the backend is {kind}")
    if kind is BackendKind.MEMORY:
        return url
    scheme, rest = url.split("://", 1)
    if scheme.endswith("+cluster"):
        hosts = rest.split("/", 1)[0].split("@")[-1]
        for hostport in hosts.split(","):
            _check_hostport(hostport, url, setting)
        return url
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(setting, f"malformed URL {redact_url(url)!r}: {exc}") from None
    if not parts.hostname:
        raise ConfigError(setting, f"malformed URL {redact_url(url)!r}: no host")
    return url


def _check_hostport(hostport: str, url: str, setting: str) -> None:
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            setting, f"malformed cluster URL {redact_url(url)!r}: expected host:port,host:port,..."
        )


def validate_name(value: str, setting: str) -> str:
    if not SAFE_NAME.fullmatch(value):
        raise ConfigError(setting, f"{value!r} must be 1-64 characters of letters, digits, '_', '-', '.'")
    return value


_USERINFO = re.compile(r"(://[^:/@,]*):([^@/]*)@")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: the one place a URL is made fit for logs and errors."""
    return _USERINFO.sub(r"\1:***@", url)


def redact(text: str, url: str) -> str:
    """``text`` (an error message) with the password of ``url`` and any URL's password replaced by ``***``."""
    match = _USERINFO.search(url)
    if match and match.group(2):
        text = text.replace(match.group(2), "***")
    return redact_url(text)


#: longest heartbeat interval: a node's ttl (3 intervals) must stay within what the wire accepts
MAX_HEARTBEAT_INTERVAL = 20.0


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """Where the bus is and how to use it: what ServerUtil and the node share."""

    # -- the bus
    backend: BackendKind = BackendKind.MEMORY
    url: str = DEFAULT_URLS[BackendKind.MEMORY]
    mode: Mode = Mode.ROUTING
    namespace: str = "fanout"
    #: shared key: commands are signed (HMAC-SHA256) and unsigned/forged ones dropped
    secret: bytes | None = field(default=None, repr=False)
    # -- time limits (seconds)
    #: how long a query, an ``ack=True`` send or a membership call waits for the nodes
    query_timeout: float = 5.0
    #: how long a publish may take before it raises BackendUnavailable (SPEC: at most 10 s by default)
    publish_timeout: float = 10.0
    #: how often nodes announce themselves; a node unheard for 3 intervals counts as dead
    heartbeat_interval: float = 1.0
    #: with a secret: how old (or how far in the future) a signed command may be and still be applied
    replay_window: float = 60.0
    # -- limits
    #: biggest encoded command accepted on the bus (bigger ones are refused / dropped)
    max_message: int = 8 * 1024 * 1024
    # -- continuity (docs/continuity.md)
    #: targets whose sends are kept and recoverable: ``group:<pattern>``, ``flag:<pattern>``, ``all``
    history: str = ""
    #: targets whose latest message a newcomer gets at once (same patterns; implies history)
    cache: str = ""
    #: entries kept per stream, and seconds they are kept after the stream's last send
    history_size: int = 100
    history_ttl: float = 300.0
    #: where history, resume records and idempotency keys live ("" = the backend's Redis)
    history_url: str = ""
    #: seconds a dropped client may come back and resume
    resume_ttl: float = 120.0
    #: most entries one stream replays on a resume
    recovery_max: int = 1000
    #: seconds a send's ``idempotency_key`` is remembered (docs/continuity.md, "Idempotent sends")
    idempotency_window: float = 300.0

    def __post_init__(self) -> None:
        validate_url(self.backend, self.url)
        validate_name(self.namespace, "FANOUT_NAMESPACE")
        for name in ("query_timeout", "publish_timeout", "heartbeat_interval", "replay_window"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, "must be a positive number of seconds")
        if self.heartbeat_interval > MAX_HEARTBEAT_INTERVAL:
            raise ConfigError("heartbeat_interval", f"must be at most {MAX_HEARTBEAT_INTERVAL:g} seconds")
        _check_continuity(self)

    def __repr__(self) -> str:
        secret = "set" if self.secret else "unset"
        return (
            f"Settings(backend={self.backend.value!r}, url={redact_url(self.url)!r}, "
            f"mode={self.mode.value!r}, namespace={self.namespace!r}, secret={secret}, "
            f"query_timeout={self.query_timeout:g}, publish_timeout={self.publish_timeout:g}, "
            f"heartbeat_interval={self.heartbeat_interval:g}, replay_window={self.replay_window:g}, "
            f"max_message={self.max_message})"
        )

    @property
    def where(self) -> str:
        """The broker URL without its password, for messages."""
        return redact_url(self.url)

    def redact(self, text: str) -> str:
        """``text`` without the broker password (for error messages that quote a client library)."""
        return redact(text, self.url)

    @classmethod
    def create(
        cls,
        url: str | None = None,
        *,
        backend: str | BackendKind | None = None,
        mode: str | Mode = Mode.ROUTING,
        namespace: str = "fanout",
        secret: str | bytes | None = None,
        **options: Any,
    ) -> Settings:
        """Build settings the way a person writes them: the backend follows from the URL."""
        kind = _pick_backend(backend, url, "backend", "url")
        key = secret.encode() if isinstance(secret, str) else secret
        return cls(
            backend=kind,
            url=url or DEFAULT_URLS[kind],
            mode=parse_mode(mode, "mode"),
            namespace=namespace,
            secret=key or None,
            **options,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        kind = _pick_backend(env.get("FANOUT_BACKEND") or None, env.get("FANOUT_URL") or None)
        secret = env.get("FANOUT_SECRET")
        return cls(
            backend=kind,
            url=env.get("FANOUT_URL") or DEFAULT_URLS[kind],
            mode=parse_mode(env.get("FANOUT_MODE") or Mode.ROUTING),
            namespace=validate_name(env.get("FANOUT_NAMESPACE") or "fanout", "FANOUT_NAMESPACE"),
            secret=secret.encode() if secret else None,
            query_timeout=env_number(env, "FANOUT_QUERY_TIMEOUT", 5.0, float, positive=True),
            publish_timeout=env_number(env, "FANOUT_PUBLISH_TIMEOUT", 10.0, float, positive=True),
            heartbeat_interval=_heartbeat_interval(env),
            replay_window=env_number(env, "FANOUT_REPLAY_WINDOW", 60.0, float, positive=True),
            max_message=env_number(env, "FANOUT_MAX_MESSAGE", 8 * 1024 * 1024, int, positive=True),
            history=env.get("FANOUT_HISTORY", ""),
            cache=env.get("FANOUT_CACHE", ""),
            history_size=env_number(env, "FANOUT_HISTORY_SIZE", 100, int, positive=True),
            history_ttl=env_number(env, "FANOUT_HISTORY_TTL", 300.0, float, positive=True),
            history_url=env.get("FANOUT_HISTORY_URL", ""),
            resume_ttl=env_number(env, "FANOUT_RESUME_TTL", 120.0, float, positive=True),
            recovery_max=env_number(env, "FANOUT_RECOVERY_MAX", 1000, int, positive=True),
            idempotency_window=env_number(env, "FANOUT_IDEMPOTENCY_WINDOW", 300.0, float, positive=True),
        )

    def replace(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @property
    def policy(self) -> Policy:
        """Which targets keep a history and which are cache targets (``FANOUT_HISTORY``, ``FANOUT_CACHE``)."""
        return Policy(self.history, self.cache)


def _check_continuity(settings: Settings) -> None:
    """FANOUT_HISTORY*/CACHE/RESUME*: the patterns parse, the numbers are in range, and history has a
    store (the Redis backend, FANOUT_HISTORY_URL, or the memory backend's process)."""
    policy = Policy(settings.history, settings.cache)  # raises ConfigError for a bad pattern
    if not 1 <= settings.history_size <= MAX_HISTORY_SIZE:
        raise ConfigError("FANOUT_HISTORY_SIZE", f"must be between 1 and {MAX_HISTORY_SIZE}")
    for name, value in (
        ("FANOUT_HISTORY_TTL", settings.history_ttl),
        ("FANOUT_RESUME_TTL", settings.resume_ttl),
        ("FANOUT_IDEMPOTENCY_WINDOW", settings.idempotency_window),
    ):
        if not value > 0:
            raise ConfigError(name, "must be a positive number of seconds")
    if settings.recovery_max < 1:
        raise ConfigError("FANOUT_RECOVERY_MAX", "must be a positive number of entries")
    if settings.history_url:
        kind = backend_for_url(settings.history_url, "FANOUT_HISTORY_URL")
        if kind is not BackendKind.REDIS:
            raise ConfigError("FANOUT_HISTORY_URL", "must be a redis://, rediss:// or redis+cluster:// URL")
        validate_url(kind, settings.history_url, "FANOUT_HISTORY_URL")
    elif policy.enabled and settings.backend is BackendKind.AMQP:
        raise ConfigError(
            "FANOUT_HISTORY",
            "history needs a store: set FANOUT_HISTORY_URL to a Redis (the amqp backend keeps no history)",
        )


def _heartbeat_interval(env: Mapping[str, str]) -> float:
    value = env_number(env, "FANOUT_HEARTBEAT_INTERVAL", 1.0, float, positive=True)
    if value > MAX_HEARTBEAT_INTERVAL:
        raise ConfigError(
            "FANOUT_HEARTBEAT_INTERVAL", f"{value:g} is more than {MAX_HEARTBEAT_INTERVAL:g} seconds"
        )
    return value


def _pick_backend(
    backend: str | BackendKind | None,
    url: str | None,
    backend_setting: str = "FANOUT_BACKEND",
    url_setting: str = "FANOUT_URL",
) -> BackendKind:
    if backend is not None:
        kind = parse_backend(backend, backend_setting)
        if url:
            validate_url(kind, url, url_setting)
        return kind
    if url:
        return backend_for_url(url, url_setting)
    return BackendKind.MEMORY


#: how a value of each type env_number reads is named in its messages
_KIND_NAMES: dict[Callable[[str], Any], str] = {int: "an integer", float: "a number"}


def env_number(
    env: Mapping[str, str], name: str, default: _T, kind: Callable[[str], _T], *, positive: bool = False
) -> _T:
    """The number in ``env[name]`` (``default`` when unset or blank): finite, >= 0 (> 0 if ``positive``)."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not {_KIND_NAMES.get(kind, 'a number')}") from None
    if not math.isfinite(value):  # type: ignore[arg-type]
        raise ConfigError(name, f"{raw!r} must be a finite number")
    if value < 0 or (positive and value == 0):  # type: ignore[operator]
        raise ConfigError(name, f"{raw!r} must be {'greater than 0' if positive else 'at least 0'}")
    return value


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"{raw!r} is not a boolean; accepted: 1/0, true/false, yes/no, on/off")
