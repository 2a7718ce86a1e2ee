"""Every exception fanout raises.

::

    FanoutError                      root: ``except fanout.FanoutError`` catches everything below
    ├── ConfigError (ValueError)     bad URL, mode, namespace, node id, ... (message names the setting)
    ├── PayloadError (TypeError)     data that cannot be sent (not str/bytes/JSON-serialisable, too big)
    ├── ProtocolError (ValueError)   a command that cannot be decoded
    │   ├── UnsupportedVersion       the wire version is not one we speak
    │   ├── BadSignature             FANOUT_SECRET is set and the command is unsigned or forged
    │   └── MessageTooLarge          bigger than the configured maximum
    ├── BackendError                 the broker did not accept an operation
    │   └── BackendUnavailable       the broker cannot be reached (within the publish timeout)
    ├── QueryTimeout (TimeoutError)  some live nodes did not answer in time; ``.missing`` names them
    ├── NoLiveNodes (LookupError)    no node at all answers in this namespace (wrong namespace? nodes down?)
    ├── ConfigMismatch (ConfigError) this publisher's mode or secret differs from the live nodes'
    └── NotConnected                 a ServerUtil used outside ``async with`` / after close

Errors of the client libraries (redis-py, aio-pika, websockets) never escape unwrapped from the
public API: they are re-raised as one of these with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Sequence


class FanoutError(Exception):
    """Root of every exception raised by fanout."""


class ConfigError(FanoutError, ValueError):
    """A setting has a value fanout does not accept; the message names the setting and the choices."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


class PayloadError(FanoutError, TypeError):
    """The data of a send cannot be encoded, or an argument has the wrong type."""


class ProtocolError(FanoutError, ValueError):
    """A command could not be decoded (malformed, wrong version, forged, oversized)."""

    #: short machine-friendly reason, used as a metrics label
    reason = "malformed"


class UnsupportedVersion(ProtocolError):
    reason = "version"


class BadSignature(ProtocolError):
    reason = "signature"


class MessageTooLarge(ProtocolError):
    reason = "oversized"


class BackendError(FanoutError):
    """The backend refused or failed an operation."""


class BackendUnavailable(BackendError):
    """The backend could not be reached within the configured time."""


class QueryTimeout(FanoutError, TimeoutError):
    """Live nodes did not answer a query (or an acknowledged command) in time."""

    def __init__(self, what: str, missing: Sequence[str], timeout: float) -> None:
        names = ", ".join(missing) if missing else "unknown nodes"
        super().__init__(f"{what}: no answer within {timeout:g}s from {names}")
        self.missing = list(missing)
        self.timeout = timeout


class NoLiveNodes(FanoutError, LookupError):
    """A call that needs the nodes found none alive in its namespace."""

    def __init__(self, namespace: str, where: str) -> None:
        super().__init__(
            f"no live nodes in namespace {namespace!r} on {where} (are the nodes running, and with the "
            f"same FANOUT_NAMESPACE and FANOUT_URL?)"
        )
        self.namespace = namespace


class ConfigMismatch(ConfigError):
    """The live nodes use another mode, or another secret, than this publisher: its commands would be lost."""


class NotConnected(FanoutError):
    """The ServerUtil is not connected: use it as ``async with`` (or call ``connect()``)."""


#: the errors a node may report in a reply, by class name; they are raised again on the caller's side
REMOTE_ERRORS: dict[str, type[FanoutError]] = {
    cls.__name__: cls for cls in (BackendError, BackendUnavailable, PayloadError, MessageTooLarge)
}


def remote_error(node: str, kind: str, message: str) -> FanoutError:
    """The exception to raise for an error a node reported (unknown kinds become FanoutError)."""
    cls = REMOTE_ERRORS.get(kind, FanoutError)
    return cls(f"node {node}: {message}")
