"""fanout: websocket push distribution across nodes, over Redis pub/sub or AMQP.

::

    from fanout import ServerUtil

    async with ServerUtil("redis://127.0.0.1:6379/0") as util:
        await util.send_to_group("lobby", {"text": "hi"})
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import tokens
from .admission import Admit, ConnectRequest, Reject
from .commands import NodeRecord
from .config import BackendKind, Mode, Settings
from .exceptions import (
    BackendError,
    BackendUnavailable,
    BadSignature,
    ConfigError,
    ConfigMismatch,
    FanoutError,
    MessageTooLarge,
    NoLiveNodes,
    NotConnected,
    PayloadError,
    ProtocolError,
    QueryTimeout,
    UnsupportedVersion,
)
from .outbox import Outbox
from .serverutil import ServerUtil
from .sync import SyncServerUtil
from .worker import Worker, WorkerOptions

if TYPE_CHECKING:
    from .client import Client as Client

__version__ = "0.1.0"

__all__ = [
    "Admit",
    "BackendError",
    "BackendKind",
    "BackendUnavailable",
    "BadSignature",
    "ConfigError",
    "ConfigMismatch",
    "ConnectRequest",
    "FanoutError",
    "MessageTooLarge",
    "Mode",
    "NoLiveNodes",
    "NodeRecord",
    "NotConnected",
    "Outbox",
    "PayloadError",
    "ProtocolError",
    "QueryTimeout",
    "Reject",
    "ServerUtil",
    "Settings",
    "SyncServerUtil",
    "UnsupportedVersion",
    "Worker",
    "WorkerOptions",
    "__version__",
    "tokens",
]


def __getattr__(name: str) -> object:
    """``fanout.Client``: the websocket client (fanout/client.py), imported only when used, so a publisher
    that never uses it never imports the ``websockets`` library."""
    if name == "Client":
        from .client import Client

        return Client
    raise AttributeError(f"module 'fanout' has no attribute {name!r}")
