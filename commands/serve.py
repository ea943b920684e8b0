"""``archopt serve``: the archive over HTTP (JSON API, OpenAPI, a page)."""

from __future__ import annotations

from pathlib import Path

import click

from archopt.cli import State, UserError, db_option, pass_state

from .output import hide_password


def _byte_size(text: str) -> int:
    """``64MB``, ``500KB``, ``1GB`` (binary units: MB = 2**20) or a number of bytes."""
    import re
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(|B|K|KB|KIB|M|MB|MIB|G|GB|GIB)\s*", text.upper())
    if not match:
        raise UserError(f"--max-body takes a size such as 64MB, 500KB or a number of bytes, got {text!r}")
    scale = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)[:1]]
    value = int(float(match.group(1)) * scale)
    if value < 1:
        raise UserError("--max-body must be at least 1 byte")
    return value


@click.command()
@db_option("db_url", envvar=None,
           help="Archive database URL (default: archopt --db, $ARCHOPT_DB, else sqlite:///archopt.db).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (each opens the archive and keeps its own memory of answers).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File whose first line is the write token (default: $ARCHOPT_TOKEN; none: read-only).")
@click.option("--max-body", default="64MB", show_default=True, help="Largest request body (413 above it).")
@click.option("--retrain-interval", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds between two background retrains of one stale predictor.")
@click.option("--search-processes", type=click.IntRange(min=0), default=1, show_default=True,
              help="Processes per worker that run cold searches (0: in a thread of the worker).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="Server log level.")
@click.option("--no-access-log", is_flag=True, help="Do not log every request.")
@pass_state
def serve(state: State, db_url: str | None, host: str, port: int, workers: int, token_file: Path | None,
          max_body: str, retrain_interval: float, search_processes: int, log_level: str, no_access_log: bool) -> None:
    """Serve the archive over HTTP: a JSON API under /v1, /openapi.json, and a page at /.

    Queries use the current predictors and never train in the request: stale ones are retrained in
    the background. Writes (POST /v1/evaluations, /v1/predictors/train) need the bearer token of
    $ARCHOPT_TOKEN or --token-file; without one the service is read-only.

    \b
    Example:
      archopt serve --db sqlite:///archopt.db --port 8000
      ARCHOPT_TOKEN=$(cat ~/.archopt-token) archopt serve --db postgresql://archopt@db/archopt \\
          --host 0.0.0.0 --workers 4
    """
    from archopt.service.app import ServiceConfig, read_token
    from archopt.service.server import serve as run_server
    config = ServiceConfig(db=db_url or state.db, token=read_token(str(token_file) if token_file else None),
                           max_body=_byte_size(max_body), retrain_interval=retrain_interval,
                           search_processes=search_processes)
    from archopt.archdb.archive import Archive
    Archive(config.db).close()  # a bad URL or an archive behind head fails here, as one line
    mode = "read-write (bearer token)" if config.token else "read-only (no token: set ARCHOPT_TOKEN or --token-file)"
    state.err.print(f"archopt {mode} on http://{host}:{port}, {workers} worker(s), archive "
                    f"{hide_password(config.db)}", markup=False)
    if config.token and host not in ("127.0.0.1", "localhost", "::1"):
        state.err.print("note: the token travels in clear text over http: put the service behind a TLS proxy",
                        markup=False)
    run_server(config, host=host, port=port, workers=workers, token_file=str(token_file) if token_file else None,
               log_level=log_level, access_log=not no_access_log)
