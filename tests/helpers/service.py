"""``archopt serve`` in a thread on 127.0.0.1, with a test token and a small body limit."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from archopt.service.app import ServiceConfig, create_app
from archopt.service.server import BackgroundServer

TOKEN = "test-token-0123456789"
MAX_BODY = 64 * 1024


@contextlib.contextmanager
def serving(url: str, **config: Any) -> Iterator[BackgroundServer]:
    """A running server on the archive ``url`` (``server.service``: the app's service object)."""
    app = create_app(ServiceConfig(db=url, **{"token": TOKEN, "max_body": MAX_BODY, "search_processes": 0,
                                              **config}))
    with BackgroundServer(app) as server:
        server.service = app.state.service
        yield server
