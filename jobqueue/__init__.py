"""Distributed evaluation: a queue of (architecture, protocol settings) jobs on the team's PostgreSQL.

The queue is procrastinate's, in its own PostgreSQL schema ``procrastinate`` (applied by
``archopt db upgrade``: module ``schema``). ``archopt submit`` enqueues one job per architecture the
archive does not already hold under the requested protocols (``submission``); ``archopt worker``
runs them with one loaded base model (a :class:`~archopt.optimizer.campaign.Campaign`) per (model,
settings), kept between jobs (``worker``, ``task``); ``archopt jobs`` lists, retries and cancels
them (``manage``). ``connection`` says where the queue lives, ``app`` builds procrastinate's App,
``joblog`` keeps archopt's record of every attempt.

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
- No module-level state: each ``run_worker`` call owns a :class:`WorkerState`.
"""

from __future__ import annotations

from .app import DEFAULT_ATTEMPTS, QUEUE, TASK_NAME, make_app
from .connection import NEEDS_POSTGRES, SCHEMA, QueueError, conninfo
from .manage import STATUSES, cancel_jobs, list_jobs, retry_jobs
from .schema import require_queue, upgrade_queue_schema
from .submission import SubmitReport, job_lock, settings_payload, submit
from .task import WorkerConfig, WorkerState
from .worker import run_worker

__all__ = [
    "DEFAULT_ATTEMPTS", "NEEDS_POSTGRES", "QUEUE", "SCHEMA", "STATUSES", "TASK_NAME",
    "QueueError", "SubmitReport", "WorkerConfig", "WorkerState",
    "cancel_jobs", "conninfo", "job_lock", "list_jobs", "make_app", "require_queue", "retry_jobs",
    "run_worker", "settings_payload", "submit", "upgrade_queue_schema",
]
