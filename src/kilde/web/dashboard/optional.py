"""APIs that other stages provide and that may not be installed in this version.

The dashboard shows what exists: a page over a missing API says so instead of failing. Their
route functions are called as they are (many are async; pages run in worker threads).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

from anyio.from_thread import run as _run_async
from fastapi import Request


def module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def insights(request: Request) -> ModuleType | None:
    """The insights API, when installed and mounted (its engine runs in this app)."""
    found = module("kilde.web.insights_api")
    if found is None or not hasattr(request.app.state, "insights"):
        return None
    return found


def privacy(request: Request) -> ModuleType | None:
    """The privacy API, when installed and mounted."""
    found = module("kilde.web.privacy_api")
    if found is None or not _mounted(request, "/api/privacy"):
        return None
    return found


def _mounted(request: Request, prefix: str) -> bool:
    """Whether the app serves paths under `prefix` (its OpenAPI schema is built once)."""
    try:
        paths: dict[str, Any] = request.app.openapi().get("paths", {})
    except Exception:  # a schema that cannot be built must not take a page down
        return False
    return any(path.startswith(prefix) for path in paths)


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a route function from a page (a worker thread), awaiting it when it is async."""
    bound = functools.partial(fn, *args, **kwargs)
    if _is_async(fn):
        return _run_async(bound)
    return bound()


def _is_async(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)
