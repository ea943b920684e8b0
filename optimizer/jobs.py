"""Distributed evaluation: a queue of (architecture, protocol settings) jobs on the team's PostgreSQL.

The queue is procrastinate's, in its own PostgreSQL schema ``procrastinate`` (applied by
``archopt db upgrade``). ``archopt submit`` enqueues one job per architecture the archive does not
already hold under the requested protocols; ``archopt worker`` runs them with one loaded base model
(a :class:`~archopt.optimizer.campaign.Campaign`) per (model, settings), kept between jobs.

Guarantees:
- Writes are idempotent (``Campaign.run`` skips what the archive holds, evaluations are unique per
  (architecture, metric, protocol)): a retried job never duplicates a row.
- Each job carries a lock key (model, architecture, settings): a second submit of the same work while
  it is queued or running enqueues nothing (procrastinate's ``queueing_lock`` plus our own check).
- A worker that dies (kill -9, power loss) stops sending heartbeats; every worker runs a sweep that
  asks procrastinate for stalled jobs (``JobManager.get_stalled_jobs``) and puts them back in the queue
  (``retry_job_by_id_async``), which counts as a failed attempt. A job that has used its attempts
  is marked failed; every failure's message is kept in ``procrastinate.archopt_job_log``
  (one row per finished attempt: worker, outcome, seconds, error).
- SIGTERM/SIGINT: the worker finishes the job in hand and exits (procrastinate's graceful stop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from archopt.archdb.archive import Archive
from archopt.archdb.errors import ArchoptError

SCHEMA = "procrastinate"
TASK_NAME = "archopt.evaluate_architecture"
QUEUE = "archopt"
DEFAULT_ATTEMPTS = 3
NEEDS_POSTGRES = ("the job queue needs a PostgreSQL archive (--db postgresql://...); "
                  "`archopt evaluate` does the same work on one machine")

log = logging.getLogger("archopt.jobs")


class QueueError(ArchoptError, RuntimeError):
    """The queue cannot be used (one line)."""


# --- connection and schema ------------------------------------------------------------------------
def conninfo(archive_url: str) -> str:
    """A libpq URL for psycopg from an archive URL (``postgresql+psycopg://`` -> ``postgresql://``)."""
    from sqlalchemy.engine import make_url
    from archopt.archdb.archive import resolve_url
    url = make_url(resolve_url(archive_url))
    if url.get_backend_name() != "postgresql":
        raise QueueError(NEEDS_POSTGRES)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _connect(archive_url: str) -> Any:
    import psycopg
    return psycopg.connect(conninfo(archive_url), autocommit=True, options=f"-c search_path={SCHEMA}")


LOG_DDL = f"""
CREATE TABLE IF NOT EXISTS {SCHEMA}.archopt_job_log (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL,
    attempt integer NOT NULL,
    worker text NOT NULL,
    outcome text NOT NULL,
    seconds double precision,
    error text,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS archopt_job_log_job ON {SCHEMA}.archopt_job_log (job_id);
CREATE TABLE IF NOT EXISTS {SCHEMA}.archopt_workers (
    worker_id bigint PRIMARY KEY,
    name text NOT NULL,
    device text,
    started timestamptz NOT NULL DEFAULT now()
);
"""


def upgrade_queue_schema(archive_url: str) -> bool:
    """Create procrastinate's tables in the ``procrastinate`` schema if they are missing (its own
    schema SQL through its ``SchemaManager``); returns whether anything was created."""
    from procrastinate import SyncPsycopgConnector
    from procrastinate.schema import SchemaManager
    with _connect(archive_url) as conn:
        conn.execute("SELECT pg_advisory_lock(712008)")
        try:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            exists = conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.procrastinate_jobs",)).fetchone()[0]
            if exists is None:
                connector = SyncPsycopgConnector(conninfo=conninfo(archive_url),
                                                 kwargs={"options": f"-c search_path={SCHEMA}"})
                connector.open()
                try:
                    SchemaManager(connector).apply_schema()
                finally:
                    connector.close()
            conn.execute(LOG_DDL)
        finally:
            conn.execute("SELECT pg_advisory_unlock(712008)")
    return exists is None


def require_queue(archive_url: str) -> None:
    if not archive_url.startswith("postgresql"):
        raise QueueError(NEEDS_POSTGRES)
    with _connect(archive_url) as conn:
        if conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.procrastinate_jobs",)).fetchone()[0] is None:
            raise QueueError("the job queue is not set up in this database: run `archopt db upgrade`")


def make_app(archive_url: str, attempts: int = DEFAULT_ATTEMPTS, sync: bool = False) -> Any:
    """A procrastinate App on the archive's database, its queries in the ``procrastinate`` schema."""
    import procrastinate
    kwargs = {"options": f"-c search_path={SCHEMA}"}
    if sync:
        connector = procrastinate.SyncPsycopgConnector(conninfo=conninfo(archive_url), kwargs=kwargs)
    else:
        connector = procrastinate.PsycopgConnector(conninfo=conninfo(archive_url), kwargs=kwargs, min_size=1,
                                                   max_size=4)
    app = procrastinate.App(connector=connector)
    # attempts counts every run: procrastinate's max_attempts counts retries after the first
    retry: Any = procrastinate.RetryStrategy(max_attempts=attempts - 1, wait=1) if attempts > 1 else False
    app.task(name=TASK_NAME, queue=QUEUE, pass_context=True, retry=retry)(_evaluate_task)
    return app


# --- submitting -----------------------------------------------------------------------------------
def settings_payload(settings: Any) -> dict[str, Any]:
    """The protocol-defining settings of a job (device and data dir belong to the worker)."""
    data = dataclasses.asdict(settings)
    data["metrics"] = list(data["metrics"])
    for machine_local in ("device", "data_dir"):
        data.pop(machine_local, None)
    return data


def job_lock(model: str, arch_id: str, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return f"archopt:{model}:{arch_id}:{digest}"


@dataclass
class SubmitReport:
    enqueued: list[int]
    in_archive: int
    in_queue: int
    archive_checked: bool


def _protocol_keys(location: str, settings: Any) -> dict[str, str] | None:
    """The protocol key of each metric (loads only the tokenizer); None when the weights are out of reach."""
    try:
        from transformers import AutoTokenizer
        from archopt import evaluators as ev
        from archopt.optimizer.campaign import cache_dir
        tokenizer = AutoTokenizer.from_pretrained(location)
        evaluator = ev.Evaluator(
            tokenizer, list(settings.metrics), data_dir=settings.data_dir, seq_len=settings.seq_len,
            max_tokens=settings.max_tokens, max_questions=settings.max_questions, shots=settings.shots,
            ptb_split=settings.ptb_split, cache_dir=cache_dir() / "tokens")
    except Exception as exc:  # noqa: BLE001 - the queue still dedupes; the worker skips what is stored
        log.info("cannot compute protocols here (%s): skipping the archive check", str(exc).splitlines()[0][:200])
        return None
    return {metric: task.protocol.key() for metric, task in evaluator.tasks.items()}


def submit(archive: Archive, model: str, archs: Sequence[tuple[Any, str]], settings: Any,
           location: str | None = None, priority: int = 0) -> SubmitReport:
    """Enqueue one job per architecture that is neither in the archive nor queued/running."""
    from procrastinate import exceptions as pexc
    from archopt.archdb import reads
    require_queue(archive.url)
    with archive.read() as session:
        base = reads.get_base_model(session, model)
        name, where = base.name, location or base.location
    if not where:
        raise QueueError(f"no weights location recorded for {name}: pass --weights")
    payload = settings_payload(settings)
    keys = _protocol_keys(where, settings)
    done: set[tuple[str, str, str]] = set()
    if keys is not None:
        with archive.read() as session:
            done = reads.measured_keys(session, reads.get_base_model(session, name), list(keys.values()))
    todo: list[tuple[str, Any, str]] = []
    in_archive = 0
    seen: set[str] = set()
    for arch, origin in archs:
        arch_id = arch.arch_id(name)
        if arch_id in seen:
            continue
        seen.add(arch_id)
        if keys is not None and all((arch_id, metric, key) in done for metric, key in keys.items()):
            in_archive += 1
            continue
        todo.append((arch_id, arch, origin))
    locks = [job_lock(name, arch_id, payload) for arch_id, _, _ in todo]
    with _connect(archive.url) as conn:
        queued = {row[0] for row in conn.execute(
            "SELECT lock FROM procrastinate_jobs WHERE lock = ANY(%s) AND status IN ('todo', 'doing')", (locks,))}
    app = make_app(archive.url, sync=True)
    enqueued: list[int] = []
    in_queue = 0
    with app.open():
        task = app.tasks[TASK_NAME]
        for (arch_id, arch, origin), lock in zip(todo, locks):
            if lock in queued:
                in_queue += 1
                continue
            try:
                job_id = task.configure(lock=lock, queueing_lock=lock, priority=priority).defer(
                    model=name, location=where, arch_id=arch_id, layers=arch.layer_dicts(), origin=origin,
                    settings=payload)
            except pexc.AlreadyEnqueued:
                in_queue += 1
                continue
            enqueued.append(job_id)
    return SubmitReport(enqueued, in_archive, in_queue, keys is not None)


# --- the task -------------------------------------------------------------------------------------
@dataclass
class WorkerConfig:
    archive_url: str
    device: str = "cpu"
    dtype: str | None = None
    data_dir: str | None = None
    max_jobs: int | None = None
    name: str = ""


class _WorkerState:
    """What the worker process keeps between jobs: its config, loaded campaigns, counters."""

    def __init__(self) -> None:
        self.config: WorkerConfig | None = None
        self.archive: Archive | None = None
        self.campaigns: dict[Any, Any] = {}
        self.lock = threading.Lock()
        self.load_lock = threading.Lock()
        self.running = 0
        self.finished = 0
        self.last_activity = time.monotonic()
        self.stop_callback: Any = None


STATE = _WorkerState()


def _evaluate_task(context: Any, model: str, location: str, arch_id: str, layers: list[dict[str, Any]],
                   origin: str, settings: dict[str, Any]) -> dict[str, Any]:
    with STATE.lock:
        STATE.running += 1
    start = time.perf_counter()
    try:
        result = _evaluate(context, model, location, arch_id, layers, origin, settings)
        _log(context.job.id, context.job.attempts, "succeeded", time.perf_counter() - start)
        return result
    except BaseException as exc:
        first = str(exc).splitlines()[0][:500] if str(exc) else ""
        _log(context.job.id, context.job.attempts, "failed", time.perf_counter() - start,
             f"{type(exc).__name__}: {first}")
        raise
    finally:
        with STATE.lock:
            STATE.running -= 1
            STATE.finished += 1
            STATE.last_activity = time.monotonic()
            limit = STATE.config.max_jobs if STATE.config else None
            if limit is not None and STATE.finished >= limit and STATE.stop_callback is not None:
                STATE.stop_callback()


def _evaluate(context: Any, model: str, location: str, arch_id: str, layers: list[dict[str, Any]],
              origin: str, settings: dict[str, Any]) -> dict[str, Any]:
    from archopt.archdb.arch import from_layer_dicts
    from archopt.optimizer.campaign import Campaign, EvalSettings
    config = STATE.config
    assert config is not None and STATE.archive is not None
    values = dict(settings)
    values["metrics"] = tuple(values["metrics"])
    values["device"] = config.device
    values["dtype"] = config.dtype if config.dtype is not None else values.get("dtype")
    values["data_dir"] = config.data_dir
    eval_settings = EvalSettings(**values)
    key = (location, model, eval_settings)
    with STATE.load_lock:  # --concurrency > 1: one load per (model, settings)
        campaign = STATE.campaigns.get(key)
        if campaign is None:
            log.info("loading %s (%s) on %s", model, location, config.device)
            campaign = Campaign(STATE.archive, location, eval_settings, model)
            STATE.campaigns[key] = campaign
    arch = from_layer_dicts(campaign.base.spec, layers)
    if arch.arch_id(campaign.name) != arch_id:
        raise QueueError(f"job architecture {arch_id[:12]} does not match the loaded model {campaign.name}")
    report = campaign.run([(arch, origin)])
    delay = float(os.environ.get("ARCHOPT_TEST_JOB_DELAY") or 0)  # tests: a job that is still running
    if delay:                                                      # after its result was written
        time.sleep(delay)
    result = report.results[0]
    log.info("job %s: %s %s in %.1fs", context.job.id, arch_id[:12], "skipped (in archive)" if result.skipped
             else " ".join(f"{m.metric}={m.value:.4g}" for m in result.measurements if ":" not in m.metric),
             result.seconds)
    return {"arch_id": arch_id, "skipped": result.skipped, "seconds": result.seconds,
            "worker": config.name}


def _log(job_id: int, attempt: int, outcome: str, seconds: float | None, error: str | None = None) -> None:
    """One row of ``archopt_job_log`` per finished attempt (``attempt`` counts from 1)."""
    config = STATE.config
    if config is None:
        return
    try:
        with _connect(config.archive_url) as conn:
            conn.execute("INSERT INTO archopt_job_log (job_id, attempt, worker, outcome, seconds, error) "
                         "VALUES (%s, %s, %s, %s, %s, %s)", (job_id, attempt + 1, config.name, outcome, seconds, error))
    except Exception:  # noqa: BLE001 - the job's own outcome is what matters; procrastinate logs it too
        log.exception("cannot log the outcome of job %s", job_id)


# --- the worker -----------------------------------------------------------------------------------
async def _sweep(app: Any, config: WorkerConfig, stall_timeout: float, attempts: int) -> list[tuple[int, str]]:
    """Retry the jobs of workers whose heartbeat is older than ``stall_timeout`` (one failed attempt
    each); fail the ones that have used their attempts."""
    from procrastinate.jobs import Status
    done: list[tuple[int, str]] = []
    stalled = await app.job_manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=stall_timeout)
    for job in stalled:
        message = f"worker stalled (no heartbeat for {stall_timeout:g}s; killed or lost)"
        try:
            if job.attempts + 1 >= attempts:
                await app.job_manager.finish_job_by_id_async(job.id, Status.FAILED, delete_job=False)
                done.append((job.id, "failed"))
            else:
                await app.job_manager.retry_job_by_id_async(job.id, retry_at=dt.datetime.now(dt.timezone.utc))
                done.append((job.id, "retried"))
        except Exception as exc:  # noqa: BLE001 - another worker's sweep got there first
            log.debug("stalled job %s: %s", job.id, exc)
            continue
        _log(job.id, job.attempts, "stalled", None, message)
        log.warning("job %s: %s: %s", job.id, message, done[-1][1])
    return done


def run_worker(archive_url: str, *, device: str = "cpu", dtype: str | None = None, data_dir: str | None = None,
               concurrency: int = 1, max_jobs: int | None = None, idle_exit: float | None = None,
               attempts: int = DEFAULT_ATTEMPTS, heartbeat: float = 10.0, stall_timeout: float = 60.0,
               poll: float = 2.0, name: str | None = None) -> int:
    """Run jobs until stopped (SIGTERM/SIGINT: finish the job in hand), ``max_jobs`` are done, or no
    job came for ``idle_exit`` seconds. Returns how many jobs this worker ran."""
    from procrastinate import worker as pworker
    require_queue(archive_url)
    import archopt.evaluators  # noqa: F401 - torch and transformers load before this worker takes a job
    import archopt.optimizer.campaign  # noqa: F401
    name = name or f"{socket.gethostname()}:{os.getpid()}"
    config = WorkerConfig(archive_url, device, dtype, data_dir, max_jobs, name)
    STATE.config = config
    STATE.archive = Archive(archive_url)
    STATE.last_activity = time.monotonic()
    app = make_app(archive_url, attempts)

    async def main() -> None:
        async with app.open_async():
            w = pworker.Worker(app, queues=[QUEUE], name=name, concurrency=concurrency,
                               fetch_job_polling_interval=poll, update_heartbeat_interval=heartbeat,
                               stalled_worker_timeout=max(stall_timeout * 4, 60.0),
                               install_signal_handlers=True)
            loop = asyncio.get_running_loop()
            STATE.stop_callback = lambda: loop.call_soon_threadsafe(w.stop)
            if max_jobs is not None and max_jobs <= 0:
                return

            async def sweeper() -> None:
                interval = max(min(stall_timeout / 2, 30.0), 0.5)
                named = False
                while True:
                    if not named and w.worker_id is not None:
                        await app.connector.execute_query_async(
                            "INSERT INTO archopt_workers (worker_id, name, device) VALUES (%(id)s, %(name)s, "
                            "%(device)s) ON CONFLICT DO NOTHING", id=w.worker_id, name=name, device=device)
                        named = True
                    try:
                        await _sweep(app, config, stall_timeout, attempts)
                    except Exception:  # noqa: BLE001 - keep sweeping
                        log.exception("stalled-job sweep failed")
                    if idle_exit is not None and STATE.running == 0 and \
                            time.monotonic() - STATE.last_activity > idle_exit:
                        log.info("no job for %.0fs: exiting", idle_exit)
                        w.stop()
                        return
                    await asyncio.sleep(min(interval, idle_exit / 2) if idle_exit else interval)

            side = asyncio.create_task(sweeper())
            try:
                await w.run()
            finally:
                side.cancel()

    try:
        asyncio.run(main())
    finally:
        STATE.archive.close()
    return STATE.finished


# --- listing and managing -------------------------------------------------------------------------
STATUSES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborting", "aborted")


def list_jobs(archive_url: str, statuses: Iterable[str] | None = None, limit: int = 200) -> dict[str, Any]:
    """The queue as one document: counts per status and per worker, and the newest jobs."""
    require_queue(archive_url)
    wanted = list(statuses or [])
    with _connect(archive_url) as conn:
        counts = dict(conn.execute("SELECT status::text, count(*) FROM procrastinate_jobs WHERE task_name = %s "
                                   "GROUP BY status", (TASK_NAME,)).fetchall())
        live = {n: (d, h) for n, d, h in conn.execute(
            "SELECT coalesce(a.name, 'worker ' || w.id), count(j.id), w.last_heartbeat FROM procrastinate_workers w "
            "LEFT JOIN archopt_workers a ON a.worker_id = w.id "
            "LEFT JOIN procrastinate_jobs j ON j.worker_id = w.id AND j.status = 'doing' "
            "GROUP BY w.id, a.name, w.last_heartbeat").fetchall()}
        done = {n: (ok, bad, sec) for n, ok, bad, sec in conn.execute(
            "SELECT worker, count(*) FILTER (WHERE outcome = 'succeeded'), count(*) FILTER (WHERE outcome <> "
            "'succeeded'), sum(seconds) FILTER (WHERE outcome = 'succeeded') FROM archopt_job_log GROUP BY worker"
        ).fetchall()}
        workers = [{"worker": n, "alive": n in live, "doing": live.get(n, (0, None))[0],
                    "last_heartbeat": live[n][1].isoformat() if n in live and live[n][1] else None,
                    "succeeded": done.get(n, (0, 0, 0))[0], "failed_or_stalled": done.get(n, (0, 0, 0))[1],
                    "busy_seconds": done.get(n, (0, 0, None))[2] or 0.0}
                   for n in sorted(set(live) | set(done))]
        rows = conn.execute(
            "SELECT j.id, j.status::text, j.priority, j.attempts, j.args, "
            "coalesce(a.name, (SELECT worker FROM archopt_job_log x WHERE x.job_id = j.id ORDER BY x.id DESC "
            "LIMIT 1)), "
            "(SELECT max(at) FROM procrastinate_events e WHERE e.job_id = j.id), "
            "(SELECT error FROM archopt_job_log x WHERE x.job_id = j.id AND x.error IS NOT NULL "
            "ORDER BY x.id DESC LIMIT 1) "
            "FROM procrastinate_jobs j LEFT JOIN archopt_workers a ON a.worker_id = j.worker_id "
            "WHERE j.task_name = %s AND (cardinality(%s::text[]) = 0 OR j.status::text = ANY(%s)) "
            "ORDER BY j.id DESC LIMIT %s", (TASK_NAME, wanted, wanted, limit)).fetchall()
    jobs = [{"id": jid, "status": status, "priority": prio, "attempts": att, "model": args.get("model"),
             "arch_id": args.get("arch_id"), "origin": args.get("origin"), "worker": wname,
             "updated": at.isoformat() if at else None, "error": err}
            for jid, status, prio, att, args, wname, at, err in rows]
    return {"schema": "archopt.jobs/1", "counts": {s: counts.get(s, 0) for s in STATUSES if counts.get(s)},
            "workers": workers, "jobs": jobs}


def retry_jobs(archive_url: str, job_ids: Sequence[int]) -> list[int]:
    """Put failed jobs back in the queue (procrastinate retries only failed ones)."""
    require_queue(archive_url)
    app = make_app(archive_url, sync=True)
    done = []
    with _connect(archive_url) as conn:
        retryable = {r[0] for r in conn.execute(
            "SELECT id FROM procrastinate_jobs WHERE id = ANY(%s) AND status = 'failed'",
            (list(job_ids),)).fetchall()}
    with app.open():
        for job_id in job_ids:
            if job_id in retryable:
                app.job_manager.retry_job_by_id(job_id, retry_at=dt.datetime.now(dt.timezone.utc))
                done.append(job_id)
    return done


def cancel_jobs(archive_url: str, job_ids: Sequence[int]) -> list[int]:
    """Cancel queued jobs (a running job is asked to abort; it stops after its current evaluation)."""
    require_queue(archive_url)
    app = make_app(archive_url, sync=True)
    done = []
    with app.open():
        for job_id in job_ids:
            if app.job_manager.cancel_job_by_id(job_id, abort=True):
                done.append(job_id)
    return done
