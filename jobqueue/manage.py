"""``archopt jobs``: the queue as one document (counts, workers, newest jobs); retry and cancel jobs."""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Sequence

from .app import TASK_NAME, make_app
from .connection import connect
from .schema import require_queue

STATUSES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborting", "aborted")


def list_jobs(archive_url: str, statuses: Iterable[str] | None = None, limit: int = 200) -> dict[str, Any]:
    """The queue as one document (``archopt.jobs/1``): counts per status and per worker, and the newest jobs."""
    require_queue(archive_url)
    wanted = list(statuses or [])
    with connect(archive_url) as conn:
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
    """Put failed jobs back in the queue (procrastinate retries only failed ones); returns their ids."""
    require_queue(archive_url)
    app = make_app(archive_url, sync=True)
    done = []
    with connect(archive_url) as conn:
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
    """Cancel queued jobs (a running job is asked to abort; it stops after its current evaluation);
    returns the ids cancelled."""
    require_queue(archive_url)
    app = make_app(archive_url, sync=True)
    done = []
    with app.open():
        for job_id in job_ids:
            if app.job_manager.cancel_job_by_id(job_id, abort=True):
                done.append(job_id)
    return done
