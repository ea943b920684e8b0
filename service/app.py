"""The ASGI application: routes, token check, body limit and JSON errors.

Every handler parses its request, makes one library call off the event loop
(``run_in_threadpool``) and returns its document; the documents are those of ``documents`` and
``run_query``, which the CLI prints too. No SQL, no search logic and no torch here.

Errors are JSON ``{"error": "..."}`` with one readable line: 400 for a body that is not JSON,
401/403 for writes without or with a wrong token (403 with a hint when the service has no token:
it is then read-only), 404 for what the archive does not hold, 413 for a body over the limit, 422
for a request or file the archive refuses, 503 (with Retry-After) while a first predictor trains
or when the database cannot be reached, 500 without details for anything else (the server log has
the traceback).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from archopt import __version__
from archopt.archdb.arch import ArchitectureError
from archopt.archdb.archive import Archive, ArchiveError
from archopt.archdb.errors import ArchoptError
from archopt.archdb.formats import FormatError
from archopt.archdb.protocol import ProtocolError
from archopt.archdb.reads import NotFound
from archopt.archdb.sizes import SizeError
from archopt.archdb.store import StoreError

from . import documents
from .documents import RequestError
from .queries import NotReady, QueryService, parse_query_body
from .trainer import Trainer

log = logging.getLogger("archopt.service")
STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_BODY = 64 * 1024 * 1024
INGEST_FORMATS = ("jsonl", "csv", "lmeval")
_CONTENT_TYPES = {"application/x-ndjson": "jsonl", "application/jsonl": "jsonl", "application/x-jsonlines": "jsonl",
                  "text/csv": "csv"}
_REFUSED = (RequestError, SizeError, FormatError, ArchitectureError, ProtocolError, StoreError)


@dataclass
class ServiceConfig:
    """How one service process runs; ``archopt serve`` builds it from its options."""

    db: str | None = None
    token: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    retrain_interval: float = 30.0  # seconds between two background retrains of one metric
    retry_after: int = 5  # what a 503 tells a client while a first predictor trains
    state_ttl: float = 1.0  # seconds a query plan (model, size, predictor versions, staleness) is reused
    search_processes: int = 1  # worker processes for cold queries (0: search in a thread of this process)

    def public(self) -> dict[str, Any]:
        """The settings without the token (for logs and worker processes)."""
        return {k: v for k, v in asdict(self).items() if k != "token"}


class Service:
    """What the handlers share: the archive, the trainer, the query service and the token."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.archive = Archive(config.db)
        self.trainer = Trainer(self.archive, min_interval=config.retrain_interval)
        self.pool = None
        if config.search_processes > 0 and ":memory:" not in self.archive.url:
            from .worker import SearchPool
            self.pool = SearchPool(self.archive.url, config.search_processes)
        self.queries = QueryService(self.archive, self.trainer, retry_after=config.retry_after,
                                    state_ttl=config.state_ttl, pool=self.pool)
        self.trainer.listeners.append(self.queries.forget_state)

    def close(self) -> None:
        self.trainer.close()
        if self.pool is not None:
            self.pool.close()
        self.archive.close()

    def require_token(self, request: Request) -> None:
        """Writes need ``Authorization: Bearer TOKEN``, compared in constant time."""
        token = self.config.token
        if not token:
            raise HTTPException(403, "this service is read-only: it was started without a write token "
                                     "(set ARCHOPT_TOKEN or pass --token-file to archopt serve)")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(401, "this write needs a token: send 'Authorization: Bearer TOKEN' "
                                     "(archopt ... --server URL --token TOKEN)", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(403, "wrong token")


# --- body limit -----------------------------------------------------------------------------------
class BodyLimit:
    """Answer 413 for a body over ``limit`` bytes: by its Content-Length, or while it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than this service accepts ({_mb(self.limit)}; archopt serve --max-body)"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    await _send_json(send, 400, {"error": "Content-Length is not a number"})
                    return
                if int(value) > self.limit:
                    await _send_json(send, 413, {"error": message})
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited, send)


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB" if n >= 2**20 else f"{n} bytes"


async def _send_json(send: Send, status: int, doc: dict[str, Any]) -> None:
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# --- helpers --------------------------------------------------------------------------------------
def _service(request: Request) -> Service:
    return request.app.state.service


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise HTTPException(400, "the request body is empty: send a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"the request body is not valid JSON: {str(exc).splitlines()[0][:120]}") from None


def _int_param(request: Request, name: str, minimum: int | None = None) -> int | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise RequestError(f"query parameter {name!r} must be an integer, got {text[:40]!r}") from None
    if minimum is not None and value < minimum:
        raise RequestError(f"query parameter {name!r} must be at least {minimum}, got {value}")
    return value


def _bool_param(request: Request, name: str) -> bool:
    text = (request.query_params.get(name) or "").lower()
    if text in ("", "0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise RequestError(f"query parameter {name!r} must be true or false, got {text[:40]!r}")


def _display_name(text: str | None) -> str:
    """The client's name of an uploaded file, safe to print (no control characters, bounded)."""
    cleaned = re.sub(r"[\x00-\x1f\x7f]", "", text or "").strip()[:200]
    return cleaned or "request body"


# --- handlers -------------------------------------------------------------------------------------
async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html")


async def healthz(request: Request) -> Response:
    service = _service(request)
    revision = await run_in_threadpool(service.archive.current_revision)
    return JSONResponse({"status": "ok", "version": __version__, "database": service.archive.dialect,
                         "schema": revision, "read_only": not service.config.token,
                         "queries": dict(service.queries.stats)})


async def openapi(request: Request) -> Response:
    from .openapi import openapi_document
    return JSONResponse(openapi_document(__version__))


async def list_models(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(documents.models_document, _service(request).archive))


async def get_model(request: Request) -> Response:
    model = request.path_params["model"]
    return JSONResponse(await run_in_threadpool(documents.model_document, _service(request).archive, model))


async def list_archs(request: Request) -> Response:
    model = request.path_params["model"]
    sort = request.query_params.get("sort") or None
    protocol = _int_param(request, "protocol", 1)
    limit = _int_param(request, "limit", 1)
    offset = _int_param(request, "offset", 0) or 0
    doc = await run_in_threadpool(documents.archs_document, _service(request).archive, model, sort, protocol,
                                  limit, offset)
    return JSONResponse(doc)


async def get_arch(request: Request) -> Response:
    model = request.query_params.get("model") or None
    doc = await run_in_threadpool(documents.arch_document, _service(request).archive,
                                  request.path_params["arch_id"], model)
    return JSONResponse(doc)


async def post_query(request: Request) -> Response:
    query = parse_query_body(await _json_body(request))
    return JSONResponse(await _service(request).queries.answer(query))


async def get_stored_query(request: Request) -> Response:
    from archopt.optimizer.query import get_query
    text = request.path_params["query_id"]
    if not text.isdigit():
        raise RequestError(f"query id must be a positive integer, got {text[:40]!r}")
    return JSONResponse(await run_in_threadpool(get_query, _service(request).archive, int(text)))


async def post_evaluations(request: Request) -> Response:
    """Ingest a JSONL, CSV or lm-eval results body: one transaction, like ``archopt ingest FILE``."""
    from archopt.archdb.ingest import ingest_file
    service = _service(request)
    service.require_token(request)
    fmt = request.query_params.get("format") or None
    if fmt is not None and fmt not in INGEST_FORMATS:
        raise RequestError(f"query parameter 'format' must be one of {', '.join(INGEST_FORMATS)}, got {fmt[:40]!r}")
    allow_limit = _bool_param(request, "allow_limit")
    name = _display_name(request.query_params.get("filename"))
    if fmt is None:
        fmt = _CONTENT_TYPES.get(request.headers.get("content-type", "").split(";")[0].strip().lower())
    suffix = Path(name).suffix.lower()
    folder = tempfile.mkdtemp(prefix="archopt-upload-")
    try:
        path = Path(folder) / ("body" + (suffix if suffix in (".jsonl", ".ndjson", ".csv", ".json") else ""))
        size = 0
        with open(path, "wb") as handle:
            async for chunk in request.stream():
                size += len(chunk)
                handle.write(chunk)
        if size == 0:
            raise HTTPException(400, "the request body is empty: send a JSONL, CSV or lm-eval results file")
        report = await run_in_threadpool(ingest_file, service.archive, path, fmt=fmt, allow_limit=allow_limit,
                                         name=name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return JSONResponse(documents.ingest_document(name, report))


async def list_predictors(request: Request) -> Response:
    service = _service(request)
    model = request.query_params.get("model") or None
    doc = await run_in_threadpool(documents.predictors_document, service.archive, model)
    doc["training"] = service.trainer.status()
    return JSONResponse(doc)


async def train_predictors(request: Request) -> Response:
    """Train new versions now (``"wait": true``: answer when done) or in the background (202)."""
    import asyncio
    service = _service(request)
    service.require_token(request)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise RequestError('the request body must be a JSON object such as {"model": "llama-2-7b"}')
    unknown = [k for k in body if k not in ("model", "metrics", "protocol", "seed", "wait")]
    if unknown:
        raise RequestError(f"unknown field {str(unknown[0])[:40]!r} (known: model, metrics, protocol, seed, wait)")
    model, metrics = body.get("model"), body.get("metrics")
    protocol, seed, wait = body.get("protocol"), body.get("seed", 0), body.get("wait", False)
    if not isinstance(model, str) or not model.strip():
        raise RequestError("field 'model' is required: a model name")
    if isinstance(metrics, str):
        metrics = [x.strip() for x in metrics.split(",") if x.strip()]
    if metrics is not None and (not isinstance(metrics, list) or not metrics
                                or not all(isinstance(x, str) for x in metrics)):
        raise RequestError("field 'metrics' must be a non-empty list of metric names")
    for name, value in (("protocol", protocol), ("seed", seed)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError(f"field {name!r} must be an integer, got {value!r}")
    if not isinstance(wait, bool):
        raise RequestError(f"field 'wait' must be true or false, got {wait!r}")
    doc = await run_in_threadpool(documents.model_document, service.archive, model)
    names = metrics or [m for m in doc["metrics"] if ":" not in m]
    if not names:
        raise RequestError(f"model {doc['name']!r} has no evaluations to train on (run archopt evaluate or ingest)")
    missing = [m for m in names if m not in doc["metrics"]]
    if missing:
        raise RequestError(f"model {doc['name']!r} has no {missing[0]} evaluations (it has: "
                           f"{', '.join(doc['metrics'][:8]) or 'none'})")
    futures = {m: service.trainer.submit(doc["name"], m, protocol=protocol, force=True, seed=seed) for m in names}
    if not wait:
        return JSONResponse({"schema": "archopt.training/1", "model": doc["name"], "queued": names}, status_code=202)
    trained: dict[str, Any] = {}
    for metric, future in futures.items():
        trained.update(await asyncio.wrap_future(future))
    return JSONResponse({"schema": "archopt.training/1", "model": doc["name"], "trained": trained})


# --- errors ---------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404 and detail in (None, "Not Found"):
        detail = f"no such endpoint: {request.url.path} (see /openapi.json)"
    elif exc.status_code == 405 and detail in (None, "Method Not Allowed"):
        detail = f"{request.method} is not allowed on {request.url.path}"
    return _error(exc.status_code, str(detail), dict(exc.headers or {}))


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, _one_line(exc))


async def _refused(request: Request, exc: Exception) -> Response:
    return _error(422, _one_line(exc))


async def _not_ready(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NotReady)
    return _error(503, _one_line(exc), {"Retry-After": str(exc.retry_after)})


async def _archive_error(request: Request, exc: Exception) -> Response:
    log.warning("archive error on %s %s: %s", request.method, request.url.path, _one_line(exc))
    return _error(503, _one_line(exc))


async def _user_error(request: Request, exc: Exception) -> Response:
    return _error(422, _one_line(exc))


async def _internal(request: Request, exc: Exception) -> Response:
    # Starlette re-raises the exception after this answer, so uvicorn logs its traceback
    return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")


# --- the app --------------------------------------------------------------------------------------
ROUTES = [
    Route("/", index, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}/archs", list_archs, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/archs/{arch_id}", get_arch, methods=["GET"]),
    Route("/v1/query", post_query, methods=["POST"]),
    Route("/v1/queries/{query_id}", get_stored_query, methods=["GET"]),
    Route("/v1/evaluations", post_evaluations, methods=["POST"]),
    Route("/v1/predictors", list_predictors, methods=["GET"]),
    Route("/v1/predictors/train", train_predictors, methods=["POST"]),
    Mount("/static", StaticFiles(directory=STATIC), name="static"),
]


def create_app(config: ServiceConfig | None = None) -> Starlette:
    """The ASGI app over the archive ``config.db`` (opened, and migrated if new, right away)."""
    config = config or ServiceConfig()
    service = Service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    handlers: dict[Any, Any] = {HTTPException: _http_error, NotFound: _not_found, NotReady: _not_ready,
                                ArchiveError: _archive_error, Exception: _internal}
    for cls in _REFUSED:
        handlers[cls] = _refused
    handlers[ArchoptError] = _user_error  # PredictorError and the other one-line user errors
    app = Starlette(routes=ROUTES, exception_handlers=handlers, lifespan=lifespan,
                    middleware=[Middleware(BodyLimit, limit=config.max_body)])
    app.state.service = service
    return app


SETTINGS_ENV = "ARCHOPT_SERVE_SETTINGS"


def app_from_env() -> Starlette:
    """The app of one worker process of ``archopt serve --workers N`` (settings in the environment)."""
    settings = json.loads(os.environ.get(SETTINGS_ENV, "{}"))
    token_file = settings.pop("token_file", None)
    config = ServiceConfig(**settings)
    config.token = read_token(token_file)
    return create_app(config)


def read_token(token_file: str | None) -> str | None:
    """The write token: the first line of ``token_file``, else ``$ARCHOPT_TOKEN``, else none (read-only)."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            raise ArchoptError(f"cannot read the token file {token_file}: "
                               f"{getattr(exc, 'strerror', None) or 'empty or unreadable'}") from None
        if not token:
            raise ArchoptError(f"the token file {token_file} is empty")
        return token
    return os.environ.get("ARCHOPT_TOKEN") or None
