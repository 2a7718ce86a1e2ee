"""Loading an application object named ``module:attr`` (a node app, a worker app)."""

from __future__ import annotations

import importlib
from typing import Any

from .exceptions import ConfigError


def load_app(spec: str, setting: str = "FANOUT_APP") -> Any:
    """Import ``module:attr``; a class is instantiated. Raises ConfigError with a readable message."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(setting, f"{spec!r} must look like 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(setting, f"cannot import {module_name!r}: {exc}") from None
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise ConfigError(setting, f"module {module_name!r} has no attribute {attr!r}") from None
    return app() if isinstance(app, type) else app
