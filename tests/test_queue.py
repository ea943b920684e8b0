"""Distributed evaluation on PostgreSQL: submit -> `archopt worker` processes -> archive, crash recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import func, select

from archopt.archdb import Archive
from archopt.archdb import models as m
from archopt.jobqueue import conninfo, run_worker

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

EVAL = ("--metrics", "ppl_wikitext2,ppl_ptb", "--seq-len", "16", "--importance", "l2")
ARCHOPT = str(Path(sys.executable).with_name("archopt"))
SLOW_WORKER = str(Path(__file__).parent / "helpers" / "slow_worker.py")  # archopt whose measurements then sleep


@pytest.fixture
def queue_db(pg_server, run_cli, model_dir, data_dir, env) -> str:
    """A PostgreSQL archive with the queue schema and the tiny model registered (its base measured)."""
    url = pg_server.new_database("q")
    r = run_cli("--db", url, "db", "upgrade")
    assert r.code == 0, r.err
    assert "job queue (schema procrastinate): created" in r.out
    r = run_cli("--db", url, "db", "upgrade")
    assert r.code == 0 and "job queue (schema procrastinate): up to date" in r.out
    r = run_cli("--db", url, "evaluate", "--model", model_dir, "--data-dir", data_dir, "--device", "cpu", *EVAL)
    assert r.code == 0, r.err
    return url


def worker(url: str, data_dir: Path, *extra: str, delay: float = 0) -> subprocess.Popen:
    """An ``archopt worker`` process; with ``delay``, each job stays in hand that long after its result is written."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, SLOW_WORKER, str(delay)] if delay else [ARCHOPT]
    return subprocess.Popen([*command, "--db", url, "worker", "--device", "cpu", "--data-dir", str(data_dir),
                             "--poll", "0.3", "--heartbeat", "0.5", "--stall-timeout", "3", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 90) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def submit(run_cli, url: str, data_dir: Path, *extra: str):
    return run_cli("--db", url, "submit", "--model", "tiny-gqa", "--data-dir", data_dir, *EVAL, *extra)


def sql(url: str, query: str, *params):
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def eval_counts(url: str) -> tuple[int, int, int]:
    """(architectures, evaluations, (architecture, metric, protocol) duplicates)."""
    archive = Archive(url)
    try:
        with archive.read() as session:
            n_arch = session.scalar(select(func.count()).select_from(m.Architecture))
            n_eval = session.scalar(select(func.count()).select_from(m.Evaluation))
            dups = session.execute(select(m.Evaluation.architecture_id, m.Evaluation.metric, m.Evaluation.protocol_id)
                                   .group_by(m.Evaluation.architecture_id, m.Evaluation.metric,
                                             m.Evaluation.protocol_id).having(func.count() > 1)).all()
            return n_arch, n_eval, len(dups)
    finally:
        archive.close()


def test_two_workers_drain_the_queue_once_even_when_one_is_killed(run_cli, queue_db, data_dir):
    url = queue_db
    r = submit(run_cli, url, data_dir, "--samples", "8", "--seed", "3")
    assert r.code == 0, r.err
    assert "enqueued 8 job(s); 0 already in the archive, 0 already queued" in r.out
    r = submit(run_cli, url, data_dir, "--samples", "8", "--seed", "3")  # same work again: nothing new
    assert r.code == 0 and "enqueued 0 job(s); 0 already in the archive, 8 already queued" in r.out, r.out
    r = run_cli("--db", url, "jobs", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["counts"] == {"todo": 8}
    start = time.monotonic()
    # worker A writes its first result, then is still "in" that job (slow_worker) when it is killed outright
    a = worker(url, data_dir, "--name", "doomed", delay=90)
    deadline = time.monotonic() + 90
    while eval_counts(url)[1] < 4:  # the base's two values, then A's two
        assert time.monotonic() < deadline and a.poll() is None, "worker A never wrote its result"
        time.sleep(0.3)
    b = worker(url, data_dir, "--idle-exit", "4", "--name", "rescuer")
    doing = sql(url, "SELECT id FROM procrastinate.procrastinate_jobs WHERE status = 'doing'")
    assert len(doing) == 1
    os.kill(a.pid, signal.SIGKILL)
    a.communicate(timeout=10)
    out = finish(b)
    elapsed = time.monotonic() - start
    assert "stalled" in out and "worker done: 8 job(s)" in out, out[-3000:]
    rows = dict(sql(url, "SELECT id, attempts FROM procrastinate.procrastinate_jobs WHERE status = 'succeeded'"))
    # every job done; the killed one ran twice (the stall counted as one failed attempt), the others once
    assert len(rows) == 8 and rows.pop(doing[0][0]) == 2 and set(rows.values()) == {1}
    log = sql(url, "SELECT job_id, worker, outcome FROM procrastinate.archopt_job_log ORDER BY id")
    assert [(w, o) for j, w, o in log if j == doing[0][0]] == [("rescuer", "stalled"), ("rescuer", "succeeded")]
    # every architecture evaluated exactly once: base + 8, two metrics each, no duplicated row
    assert eval_counts(url) == (9, 18, 0)
    r = submit(run_cli, url, data_dir, "--samples", "8", "--seed", "3")  # now in the archive: nothing new
    assert r.code == 0 and "enqueued 0 job(s); 8 already in the archive" in r.out, r.out
    r = run_cli("--db", url, "jobs")
    assert r.code == 0 and "8 succeeded" in r.out and "rescuer" in r.out
    print(f"8 jobs in {elapsed:.1f}s (two worker starts, one kill -9 and a 3 s stall timeout included)")
    # query --verify K --queue enqueues the top K instead of measuring them here; twice: nothing new
    q = ("--db", url, "query", "--model", "tiny-gqa", "--params", "85%", "--tolerance", "15%", "--top", "3",
         "--verify", "2", "--queue", "--json", "--data-dir", data_dir, "--importance", "l2", "--seq-len", "16")
    r = run_cli(*q)
    assert r.code == 0, r.err
    assert r.out.strip(), r.err
    queued = json.loads(r.out)["queued"]
    assert len(queued["jobs"]) + queued["in_archive"] == min(2, len(json.loads(r.out)["results"]))
    r = run_cli(*q)
    assert r.code == 0 and json.loads(r.out)["queued"]["jobs"] == [], r.out


def test_bad_model_path_fails_after_its_attempts_and_sigterm_finishes_the_job(run_cli, queue_db, data_dir,
                                                                             tmp_path):
    url = queue_db
    r = submit(run_cli, url, data_dir, "--arch", "uniform:0.3", "--weights", str(tmp_path / "no-such-model"))
    assert r.code == 0 and "enqueued 1 job(s)" in r.out, r.out + r.err
    w = worker(url, data_dir, "--attempts", "2", delay=8)
    deadline = time.monotonic() + 90
    while sql(url, "SELECT status::text FROM procrastinate.procrastinate_jobs") != [("failed",)]:
        assert time.monotonic() < deadline and w.poll() is None, "the bad job never failed"
        time.sleep(0.3)
    rows = sql(url, "SELECT id, status::text, attempts FROM procrastinate.procrastinate_jobs")
    assert [(s, a) for _, s, a in rows] == [("failed", 2)]
    errors = sql(url, "SELECT attempt, error FROM procrastinate.archopt_job_log ORDER BY id")
    assert [e[0] for e in errors] == [1, 2] and all("cannot load model" in e[1] for e in errors)
    r = run_cli("--db", url, "jobs", "--status", "failed", "--json")
    doc = json.loads(r.out)
    assert doc["counts"] == {"failed": 1} and "cannot load model" in doc["jobs"][0]["error"]
    # SIGTERM while a job is in hand: the job finishes, then the worker exits
    r = submit(run_cli, url, data_dir, "--arch", "uniform:0.5")
    assert r.code == 0 and "enqueued 1 job(s)" in r.out, r.out + r.err
    while eval_counts(url)[1] < 4:  # written; the worker now sleeps in that job (slow_worker)
        assert time.monotonic() < deadline and w.poll() is None, "the good job never ran"
        time.sleep(0.3)
    w.send_signal(signal.SIGTERM)
    out = finish(w, timeout=60)
    assert "worker done: 3 job(s)" in out, out[-3000:]
    assert sorted(sql(url, "SELECT status::text FROM procrastinate.procrastinate_jobs")) == [("failed",), ("succeeded",)]
    r = run_cli("--db", url, "jobs", "retry", rows[0][0])
    assert r.code == 0 and "requeued 1 job(s)" in r.out
    r = run_cli("--db", url, "jobs", "cancel", rows[0][0])
    assert r.code == 0 and "cancelled 1 job(s)" in r.out
    assert sql(url, "SELECT status::text FROM procrastinate.procrastinate_jobs WHERE id = %s", rows[0][0]) == [
        ("cancelled",)]


def test_max_jobs_stops_the_worker_and_each_run_owns_its_state(run_cli, queue_db, data_dir):
    url = queue_db
    r = submit(run_cli, url, data_dir, "--samples", "2", "--seed", "5")
    assert r.code == 0 and "enqueued 2 job(s)" in r.out, r.out + r.err
    for left in (1, 0):  # two runs in one process: each counts only its own job, then stops
        assert run_worker(url, data_dir=str(data_dir), max_jobs=1, poll=0.3, heartbeat=0.5, stall_timeout=3,
                          name="batch") == 1
        assert sql(url, "SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE status = 'todo'") == [(left,)]
    assert eval_counts(url) == (3, 6, 0)


@pytest.mark.parametrize("args", [("jobs",), ("jobs", "retry", "1"), ("worker", "--max-jobs", "1"),
                                  ("submit", "--model", "x", "--samples", "1")])
def test_queue_commands_on_sqlite_say_they_need_postgres(run_cli, sqlite_url, args):
    r = run_cli("--db", sqlite_url, *args)
    assert r.code != 0
    assert len(r.err_lines) == 1
    assert "needs a PostgreSQL" in r.err and "archopt evaluate" in r.err
