"""archopt's own tables beside procrastinate's: one row per finished attempt, and worker names."""

from __future__ import annotations

import logging

from .connection import SCHEMA, connect

log = logging.getLogger("archopt.jobs")

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


def record_attempt(archive_url: str, worker: str, job_id: int, attempt: int, outcome: str,
                   seconds: float | None, error: str | None = None) -> None:
    """One row of ``archopt_job_log`` for a finished attempt (``attempt`` is procrastinate's, from 0;
    stored from 1). Never raises: the job's own outcome is what matters."""
    try:
        with connect(archive_url) as conn:
            conn.execute("INSERT INTO archopt_job_log (job_id, attempt, worker, outcome, seconds, error) "
                         "VALUES (%s, %s, %s, %s, %s, %s)", (job_id, attempt + 1, worker, outcome, seconds, error))
    except Exception:  # noqa: BLE001 - procrastinate logs the job's outcome too
        log.exception("cannot log the outcome of job %s", job_id)
