"""Loading an application object named ``module:attr`` (a node app, a worker app)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .exceptions import ConfigError


def load_app(spec: str, setting: str = "FANOUT_APP", app_dir: str | None = None) -> Any:
    """Import ``module:attr``; a class is instantiated.

    With ``app_dir`` (the commands' ``--app-dir``, the current directory by default, as uvicorn's),
    that folder is searched first: ``fanout-node --app mychat.events:Events`` run from the folder
    holding ``mychat/`` finds it, as ``python -m`` would. Raises ConfigError with a readable message:
    which module could not be imported, from where, and what to do.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(setting, f"{spec!r} must look like 'package.module:attribute'")
    if app_dir is not None:
        folder = os.path.abspath(app_dir)
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(setting, _import_failure(module_name, exc, app_dir)) from None
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise ConfigError(setting, f"module {module_name!r} has no attribute {attr!r}") from None
    return app() if isinstance(app, type) else app


def _import_failure(module_name: str, exc: ImportError, app_dir: str | None) -> str:
    """What went wrong: the application's own module not found (where it was looked for), or an
    import inside it that failed (a dependency to install, a typo in the application)."""
    missing = getattr(exc, "name", None)
    if missing is None or not (module_name == missing or module_name.startswith(missing + ".")):
        return f"importing {module_name!r} failed: {exc}"
    top = module_name.split(".")[0]
    where = f"in {os.path.abspath(app_dir)} (--app-dir) or " if app_dir is not None else ""
    return (
        f"cannot import {module_name!r}: no module {missing!r} {where}on the Python path; "
        f"run the command from the folder that holds {top}/ (or {top}.py), or name that folder "
        "with --app-dir"
    )
