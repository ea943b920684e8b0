"""Running the app with uvicorn: ``archopt serve`` (one or more worker processes), and a server in a
thread for tests, benchmarks and notebooks."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from .app import SETTINGS_ENV, ServiceConfig, create_app


def serve(config: ServiceConfig, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          token_file: str | None = None, log_level: str = "info", access_log: bool = True) -> None:
    """Serve until interrupted. With ``workers > 1`` each worker process opens the archive itself."""
    import uvicorn
    options: dict[str, Any] = {"host": host, "port": port, "log_level": log_level, "access_log": access_log,
                               "proxy_headers": False, "server_header": False}
    if workers <= 1:
        uvicorn.run(create_app(config), **options)
        return
    # worker processes build their app from the environment; the token itself never goes there
    # (they read $ARCHOPT_TOKEN or the token file themselves)
    os.environ[SETTINGS_ENV] = json.dumps({**config.public(), "token_file": token_file})
    uvicorn.run("archopt.service.app:app_from_env", factory=True, workers=workers, **options)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread; ``url`` once started.

    >>> with BackgroundServer(create_app(ServiceConfig(db="sqlite:///a.db"))) as server:
    ...     urllib.request.urlopen(server.url + "/healthz")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn
        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="archopt-test-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
