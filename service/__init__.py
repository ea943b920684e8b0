"""The archopt HTTP service: a thin JSON API over the archive, the predictors and queries, and a page.

``create_app(ServiceConfig(db=...))`` builds the ASGI app (Starlette); ``serve`` runs it with
uvicorn (``archopt serve``); ``Client`` is what ``archopt ... --server URL`` uses. The documents the
API serves are built in ``documents`` (shared with the CLI, no web framework imported there).
Importing this package loads neither Starlette nor torch: they load with ``create_app``/``serve``.
"""

from __future__ import annotations

from typing import Any

from .client import Client, ServerError

__all__ = ["Client", "ServerError", "ServiceConfig", "create_app", "serve"]


def __getattr__(name: str) -> Any:  # the web framework loads only when the app is wanted
    if name in ("ServiceConfig", "create_app"):
        from . import app
        return getattr(app, name)
    if name == "serve":
        from .server import serve
        return serve
    raise AttributeError(name)
