"""The procrastinate App on the archive's database, with archopt's one task registered."""

from __future__ import annotations

from typing import Any

from .connection import conninfo, connector_kwargs
from .task import evaluate_task

TASK_NAME = "archopt.evaluate_architecture"
QUEUE = "archopt"
DEFAULT_ATTEMPTS = 3


def make_app(archive_url: str, attempts: int = DEFAULT_ATTEMPTS, sync: bool = False) -> Any:
    """A procrastinate App on the archive's database, its queries in the ``procrastinate`` schema
    (``sync``: a synchronous connector, for submitting and managing jobs outside an event loop)."""
    import procrastinate
    if sync:
        connector = procrastinate.SyncPsycopgConnector(conninfo=conninfo(archive_url), kwargs=connector_kwargs())
    else:
        connector = procrastinate.PsycopgConnector(conninfo=conninfo(archive_url), kwargs=connector_kwargs(),
                                                   min_size=1, max_size=4)
    app = procrastinate.App(connector=connector)
    # attempts counts every run: procrastinate's max_attempts counts retries after the first
    retry: Any = procrastinate.RetryStrategy(max_attempts=attempts - 1, wait=1) if attempts > 1 else False
    app.task(name=TASK_NAME, queue=QUEUE, pass_context=True, retry=retry)(evaluate_task)
    return app
