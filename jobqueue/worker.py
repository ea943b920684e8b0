"""``archopt worker``: run queued jobs on this machine, and put the jobs of dead workers back in the queue."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
from typing import Any

from archopt.archdb.archive import Archive

from .app import DEFAULT_ATTEMPTS, QUEUE, make_app
from .joblog import record_attempt
from .schema import require_queue
from .task import CONTEXT_KEY, WorkerConfig, WorkerState

log = logging.getLogger("archopt.jobs")


async def sweep_stalled(app: Any, config: WorkerConfig, stall_timeout: float, attempts: int) -> list[tuple[int, str]]:
    """Retry the jobs of workers whose heartbeat is older than ``stall_timeout`` (one failed attempt
    each); fail the ones that have used their attempts. Returns (job id, "retried" or "failed")."""
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
        record_attempt(config.archive_url, config.name, job.id, job.attempts, "stalled", None, message)
        log.warning("job %s: %s: %s", job.id, message, done[-1][1])
    return done


def run_worker(archive_url: str, *, device: str = "cpu", dtype: str | None = None, data_dir: str | None = None,
               concurrency: int = 1, max_jobs: int | None = None, idle_exit: float | None = None,
               attempts: int = DEFAULT_ATTEMPTS, heartbeat: float = 10.0, stall_timeout: float = 60.0,
               poll: float = 2.0, name: str | None = None) -> int:
    """Run jobs until stopped (SIGTERM/SIGINT: finish the job in hand), ``max_jobs`` are done, or no
    job came for ``idle_exit`` seconds. Returns how many jobs this worker ran."""
    require_queue(archive_url)
    import archopt.evaluators  # noqa: F401 - torch and transformers load before this worker takes a job
    import archopt.optimizer.campaign  # noqa: F401
    config = WorkerConfig(archive_url, device, dtype, data_dir, max_jobs,
                          name or f"{socket.gethostname()}:{os.getpid()}")
    app = make_app(archive_url, attempts)
    state = WorkerState(config, Archive(archive_url))  # this run's own: nothing outlives it
    try:
        return asyncio.run(_serve(app, state, concurrency=concurrency, idle_exit=idle_exit, attempts=attempts,
                                  heartbeat=heartbeat, stall_timeout=stall_timeout, poll=poll))
    finally:
        state.archive.close()


async def _serve(app: Any, state: WorkerState, *, concurrency: int, idle_exit: float | None, attempts: int,
                 heartbeat: float, stall_timeout: float, poll: float) -> int:
    """The worker's event loop: procrastinate's worker beside a sweeper of stalled jobs."""
    from procrastinate import worker as pworker
    config = state.config
    async with app.open_async():
        w = pworker.Worker(app, queues=[QUEUE], name=config.name, concurrency=concurrency,
                           fetch_job_polling_interval=poll, update_heartbeat_interval=heartbeat,
                           stalled_worker_timeout=max(stall_timeout * 4, 60.0), install_signal_handlers=True,
                           additional_context={CONTEXT_KEY: state})
        loop = asyncio.get_running_loop()
        state.stop = lambda: loop.call_soon_threadsafe(w.stop)  # tasks run in threads
        if config.max_jobs is not None and config.max_jobs <= 0:
            return state.finished

        async def sweeper() -> None:
            interval = max(min(stall_timeout / 2, 30.0), 0.5)
            named = False
            while True:
                if not named and w.worker_id is not None:
                    await app.connector.execute_query_async(
                        "INSERT INTO archopt_workers (worker_id, name, device) VALUES (%(id)s, %(name)s, "
                        "%(device)s) ON CONFLICT DO NOTHING", id=w.worker_id, name=config.name, device=config.device)
                    named = True
                try:
                    await sweep_stalled(app, config, stall_timeout, attempts)
                except Exception:  # noqa: BLE001 - keep sweeping
                    log.exception("stalled-job sweep failed")
                if idle_exit is not None and state.idle_for() > idle_exit:
                    log.info("no job for %.0fs: exiting", idle_exit)
                    w.stop()
                    return
                await asyncio.sleep(min(interval, idle_exit / 2) if idle_exit else interval)

        side = asyncio.create_task(sweeper())
        try:
            await w.run()
        finally:
            side.cancel()
    return state.finished
