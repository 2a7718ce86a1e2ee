"""SyncServerUtil is typed like ServerUtil: the same signatures, overloads on ``ack=``/``wait=``, and mypy
--strict catches a typo'd method, a wrong argument or an ``ack=False`` result used as a number."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from fanout import NodeRecord, ServerUtil, SyncServerUtil
from fanout.sync import OPERATIONS

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = Path(__file__).resolve().parent / "typing_samples"
#: the operations whose ``ack=`` (sends) or ``wait=`` (membership, sessions, closes) picks value or None
DECIDED_BY = {
    **dict.fromkeys(("send", "send_by_flag", "send_to_group", "send_to_all"), "ack"),
    **dict.fromkeys(
        (
            "join_group",
            "leave_group",
            "dissolve_group",
            "bind",
            "unbind",
            "set_session",
            "update_session",
            "close",
            "close_by_flag",
        ),
        "wait",
    ),
}


def test_every_operation_is_a_method_of_its_own() -> None:
    """A coroutine method added to ServerUtil must be written out on SyncServerUtil too."""
    missing = sorted(name for name in OPERATIONS if not inspect.isfunction(vars(SyncServerUtil).get(name)))
    assert not missing, f"SyncServerUtil does not define {missing}: add them to fanout/sync.py"


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_signature_is_serverutils(name: str) -> None:
    """Same parameters (names, kinds, defaults, annotations) and the awaited return type."""
    mine = inspect.signature(getattr(SyncServerUtil, name))
    theirs = inspect.signature(getattr(ServerUtil, name))
    assert mine == theirs, f"SyncServerUtil.{name}{mine} != ServerUtil.{name}{theirs}"
    assert getattr(SyncServerUtil, name).__doc__ == getattr(ServerUtil, name).__doc__


def test_constructor_takes_serverutils_arguments() -> None:
    assert inspect.signature(SyncServerUtil) == inspect.signature(ServerUtil)


@pytest.mark.parametrize("name", sorted(DECIDED_BY))
def test_overloads_split_on_ack_or_wait(name: str) -> None:
    """Literal[True] -> the value, Literal[False] -> None, plain bool -> either; otherwise as the method."""
    flag = DECIDED_BY[name]
    implementation = inspect.signature(getattr(SyncServerUtil, name))
    value = implementation.return_annotation.removesuffix(" | None")
    variants = typing.get_overloads(getattr(SyncServerUtil, name))
    assert [inspect.signature(v).parameters[flag].annotation for v in variants] == [
        "Literal[True]",
        "Literal[False]",
        "bool",
    ]
    assert [inspect.signature(v).return_annotation for v in variants] == [
        value,
        "None",
        implementation.return_annotation,
    ]
    for variant in variants:
        parameters = inspect.signature(variant).parameters
        assert list(parameters) == list(implementation.parameters)
        for parameter in implementation.parameters.values():
            other = parameters[parameter.name]
            assert other.kind is parameter.kind
            assert (other.default is inspect.Parameter.empty) == (
                parameter.default is inspect.Parameter.empty
            ) or parameter.name == flag
            if parameter.name != flag:
                assert other.annotation == parameter.annotation


def test_node_records_are_typed() -> None:
    for util in (ServerUtil, SyncServerUtil):
        assert inspect.signature(util.get_nodes).return_annotation == "list[NodeRecord]"
    assert NodeRecord.__required_keys__ == {
        "node_id",
        "instance",
        "connections",
        "host",
        "port",
        "started_at",
        "mode",
        "signed",
    }
    assert {"healthy", "role", "shards"} <= NodeRecord.__optional_keys__


def _mypy(*files: Path) -> dict[str, set[tuple[int, str]]]:
    """``{file name: {(line, error code)}}`` from mypy --strict with the project's configuration."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-pretty", *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    errors: dict[str, set[tuple[int, str]]] = {file.name: set() for file in files}
    for match in re.finditer(r"^(.+?):(\d+): error: .*\[([a-z-]+)\]$", result.stdout, re.MULTILINE):
        errors.setdefault(Path(match[1]).name, set()).add((int(match[2]), match[3]))
    return errors


def test_mypy_accepts_good_calls_and_rejects_bad_ones() -> None:
    good, bad = SAMPLES / "sync_ok.py", SAMPLES / "sync_bad.py"
    expected = {
        (number, match[1])
        for number, line in enumerate(bad.read_text().splitlines(), 1)
        if (match := re.search(r"# expect: ([a-z-]+)$", line))
    }
    assert {code for _, code in expected} >= {"attr-defined", "arg-type", "assignment", "operator"}
    errors = _mypy(good, bad)
    assert errors[good.name] == set()
    assert errors[bad.name] == expected
