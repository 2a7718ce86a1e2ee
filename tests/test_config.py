"""Settings from the environment: good values parse, bad ones name the variable and the choices."""

from __future__ import annotations

import pytest

from fanout.config import DEFAULT_URLS, BackendKind, Mode, Settings, env_flag, env_number, redact_url
from fanout.exceptions import ConfigError, FanoutError


def from_env(**env: str) -> Settings:
    return Settings.from_env(env)


def config_error(**env: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    return info.value


# --------------------------------------------------------------------------- good values


def test_defaults() -> None:
    settings = from_env()
    assert settings.backend is BackendKind.MEMORY
    assert settings.url == "memory://"
    assert settings.mode is Mode.ROUTING
    assert settings.namespace == "fanout"
    assert settings.secret is None
    assert settings.max_message == 8 * 1024 * 1024
    assert 0 < settings.publish_timeout <= 10


@pytest.mark.parametrize(
    ("url", "backend"),
    [
        ("memory://", BackendKind.MEMORY),
        ("redis://localhost:6379/0", BackendKind.REDIS),
        ("rediss://user:pw@redis.example.com:6380", BackendKind.REDIS),
        ("REDIS://localhost", BackendKind.REDIS),
        ("redis+cluster://h1:7000,h2:7001,h3:7002", BackendKind.REDIS),
        ("redis+cluster://:secret@h1:7000,h2:7001/0", BackendKind.REDIS),
        ("rediss+cluster://[::1]:7000", BackendKind.REDIS),
        ("amqp://guest:guest@rabbit:5672/", BackendKind.AMQP),
        ("amqps://rabbit.example.com/vhost", BackendKind.AMQP),
    ],
)
def test_backend_is_inferred_from_the_url_scheme(url: str, backend: BackendKind) -> None:
    settings = from_env(FANOUT_URL=url)
    assert settings.backend is backend
    assert settings.url == url


@pytest.mark.parametrize("backend", list(BackendKind))
def test_backend_without_url_uses_its_local_default(backend: BackendKind) -> None:
    settings = from_env(FANOUT_BACKEND=f" {backend.value.upper()} ")
    assert settings.backend is backend
    assert settings.url == DEFAULT_URLS[backend]


def test_backend_and_matching_url() -> None:
    settings = from_env(FANOUT_BACKEND="redis", FANOUT_URL="redis+cluster://a:1,b:2")
    assert settings.backend is BackendKind.REDIS


@pytest.mark.parametrize(
    ("raw", "mode"), [("fanout", Mode.FANOUT), ("ROUTING", Mode.ROUTING), ("", Mode.ROUTING)]
)
def test_mode(raw: str, mode: Mode) -> None:
    assert from_env(FANOUT_MODE=raw).mode is mode


def test_namespace_secret_and_numbers() -> None:
    settings = from_env(
        FANOUT_NAMESPACE="my-app.v2",
        FANOUT_SECRET="s3cret",
        FANOUT_QUERY_TIMEOUT="0.5",
        FANOUT_PUBLISH_TIMEOUT=" 3 ",
        FANOUT_HEARTBEAT_INTERVAL="2",
        FANOUT_MAX_MESSAGE="1024",
    )
    assert settings.namespace == "my-app.v2"
    assert settings.secret == b"s3cret"
    assert (settings.query_timeout, settings.publish_timeout, settings.heartbeat_interval) == (0.5, 3.0, 2.0)
    assert settings.max_message == 1024
    assert "s3cret" not in repr(settings)


def test_blank_values_mean_the_default() -> None:
    settings = from_env(FANOUT_BACKEND="", FANOUT_URL="", FANOUT_NAMESPACE="", FANOUT_SECRET="")
    assert settings == Settings()


def test_create_from_keywords() -> None:
    settings = Settings.create("amqp://rabbit/", mode="fanout", namespace="ns", secret="k")
    assert (settings.backend, settings.mode, settings.namespace, settings.secret) == (
        BackendKind.AMQP,
        Mode.FANOUT,
        "ns",
        b"k",
    )
    with pytest.raises(ConfigError) as info:
        Settings.create("redis://x", backend="amqp")
    assert info.value.setting == "url"


# --------------------------------------------------------------------------- bad values


def test_unknown_backend_names_the_variable_and_the_choices() -> None:
    error = config_error(FANOUT_BACKEND="kafka")
    assert error.setting == "FANOUT_BACKEND"
    message = str(error)
    assert message.startswith("FANOUT_BACKEND: ")
    assert "'kafka'" in message
    for choice in ("'memory'", "'redis'", "'amqp'"):
        assert choice in message


def test_unknown_mode_names_the_variable_and_the_choices() -> None:
    error = config_error(FANOUT_MODE="broadcast")
    assert error.setting == "FANOUT_MODE"
    assert str(error).startswith("FANOUT_MODE: ")
    assert "'fanout'" in str(error)
    assert "'routing'" in str(error)


@pytest.mark.parametrize("url", ["http://localhost", "localhost:6379", "redis:/localhost", "kafka://k:9092"])
def test_unknown_url_scheme_lists_the_accepted_ones(url: str) -> None:
    error = config_error(FANOUT_URL=url)
    assert error.setting == "FANOUT_URL"
    for scheme in ("redis://", "rediss://", "redis+cluster://", "amqp://", "amqps://"):
        assert scheme in str(error)


@pytest.mark.parametrize(
    "url",
    [
        "redis://",
        "redis://:6379",
        "redis://localhost:notaport",
        "redis://localhost:99999",
        "amqp://guest:guest@/",
        "redis+cluster://",
        "redis+cluster://h1,h2:7001",
        "redis+cluster://h1:7000,",
        "redis+cluster://h1:0",
        "redis+cluster://h1:70000",
        "redis+cluster://:7000",
    ],
)
def test_malformed_urls_are_refused(url: str) -> None:
    error = config_error(FANOUT_URL=url)
    assert error.setting == "FANOUT_URL"
    assert "malformed" in str(error)
    assert redact_url(url) in str(error)  # quoted, but never with its password
    assert "guest:guest" not in str(error)


@pytest.mark.parametrize(
    ("backend", "url"),
    [
        ("amqp", "redis://localhost"),
        ("redis", "amqps://rabbit"),
        ("memory", "redis://x"),
        ("redis", "memory://"),
    ],
)
def test_backend_and_url_must_agree(backend: str, url: str) -> None:
    error = config_error(FANOUT_BACKEND=backend, FANOUT_URL=url)
    assert error.setting == "FANOUT_URL"
    assert f"backend is {backend}" in str(error)


@pytest.mark.parametrize("namespace", ["my app", "a:b", "x" * 65, "ns/1", "é"])
def test_bad_namespace(namespace: str) -> None:
    error = config_error(FANOUT_NAMESPACE=namespace)
    assert error.setting == "FANOUT_NAMESPACE"
    assert "letters, digits, '_', '-', '.'" in str(error)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("FANOUT_QUERY_TIMEOUT", "soon"),
        ("FANOUT_QUERY_TIMEOUT", "-1"),
        ("FANOUT_QUERY_TIMEOUT", "0"),
        ("FANOUT_QUERY_TIMEOUT", "nan"),
        ("FANOUT_PUBLISH_TIMEOUT", "inf"),
        ("FANOUT_PUBLISH_TIMEOUT", "0"),
        ("FANOUT_HEARTBEAT_INTERVAL", "0"),
        ("FANOUT_HEARTBEAT_INTERVAL", "1s"),
        ("FANOUT_MAX_MESSAGE", "1.5"),
        ("FANOUT_MAX_MESSAGE", "8MiB"),
        ("FANOUT_MAX_MESSAGE", "0"),
        ("FANOUT_MAX_MESSAGE", "-5"),
    ],
)
def test_bad_numbers_name_the_variable(name: str, raw: str) -> None:
    error = config_error(**{name: raw})
    assert error.setting == name
    assert str(error).startswith(f"{name}: ")
    assert repr(raw) in str(error)


def test_config_errors_are_value_errors_and_fanout_errors() -> None:
    error = config_error(FANOUT_MODE="x")
    assert isinstance(error, ValueError)
    assert isinstance(error, FanoutError)


def test_settings_validate_their_own_fields() -> None:
    with pytest.raises(ConfigError, match="query_timeout"):
        Settings(query_timeout=0)
    with pytest.raises(ConfigError, match="FANOUT_URL"):
        Settings(backend=BackendKind.REDIS, url="memory://")
    with pytest.raises(ConfigError, match="FANOUT_NAMESPACE"):
        Settings(namespace="a b")


# --------------------------------------------------------------------------- helpers


def test_env_number_allows_zero_unless_positive() -> None:
    assert env_number({"N": "0"}, "N", 5, int) == 0
    assert env_number({}, "N", 5, int) == 5
    assert env_number({"N": "  "}, "N", 5, int) == 5
    with pytest.raises(ConfigError, match=r"^N: '0' must be greater than 0"):
        env_number({"N": "0"}, "N", 5, int, positive=True)


def test_env_number_names_the_kind_in_plain_english() -> None:
    assert str(config_error(FANOUT_MAX_MESSAGE="1.5")) == "FANOUT_MAX_MESSAGE: '1.5' is not an integer"
    assert str(config_error(FANOUT_QUERY_TIMEOUT="soon")) == "FANOUT_QUERY_TIMEOUT: 'soon' is not a number"


@pytest.mark.parametrize(
    ("raw", "value"), [("1", True), ("Yes", True), ("on", True), ("0", False), ("off", False)]
)
def test_env_flag(raw: str, value: bool) -> None:
    assert env_flag({"F": raw}, "F", not value) is value
    assert env_flag({}, "F", value) is value


def test_env_flag_rejects_other_words() -> None:
    with pytest.raises(ConfigError, match=r"^F: 'maybe' is not a boolean; accepted: 1/0, true/false"):
        env_flag({"F": "maybe"}, "F", False)
