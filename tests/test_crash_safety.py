"""``kill -9`` of the real CLI at random moments: ``archopt ingest`` of large files (the kill lands while a
file is parsed or mid-transaction) and ``archopt evaluate`` of a tiny saved model on local data.

Afterwards the archive opens, ``archopt db check`` passes, each ingested file is in the archive with
all of its rows or none of them, and a rerun completes the work without duplicates.
``benchmarks/reliability.py`` runs more kills with the same functions.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from archopt.archdb import Archive
from archopt.archdb import models as m

from conftest import _run_cli  # noqa: E402
from test_archdb_concurrency import arch_of, archopt_command, metrics_of, write_files  # noqa: E402

pytestmark = pytest.mark.slow

ROWS_PER_FILE = int(os.environ.get("ARCHOPT_CRASH_ROWS", "2500"))


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "ARCHOPT_DB": "", "ARCHOPT_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}


def kill_at(cmd: list[str], delay: float, env: dict[str, str], after_first_line: bool = False) -> tuple[bool, float]:
    """Start ``cmd``, ``kill -9`` it ``delay`` seconds after its start (or after it printed its first line,
    for ingest: the first file's report, so the kill lands in a later file whatever the machine's
    speed); (killed before it finished, seconds it ran)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        if after_first_line:
            assert proc.stdout is not None
            proc.stdout.readline()
        proc.wait(timeout=delay)
        assert proc.returncode == 0, proc.returncode
        return False, time.monotonic() - start
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True, time.monotonic() - start
    finally:
        if proc.stdout:
            proc.stdout.close()


def db_check(url: str) -> None:
    res = _run_cli("--db", url, "db", "check")
    assert res.code == 0, res.out + res.err


def stored_encodings(url: str) -> tuple[list[str], int, int]:
    """(encodings of every architecture, evaluation count, duplicate evaluation keys)."""
    archive = Archive(url)
    try:
        with archive.read() as session:
            encodings = list(session.scalars(sa.select(m.Architecture.encoding)))
            evals = session.scalar(sa.select(sa.func.count()).select_from(m.Evaluation))
            dups = len(session.execute(
                sa.select(m.Evaluation.architecture_id, m.Evaluation.metric, m.Evaluation.protocol_id)
                .group_by(m.Evaluation.architecture_id, m.Evaluation.metric, m.Evaluation.protocol_id)
                .having(sa.func.count() > 1)).all())
            return encodings, evals, dups
    finally:
        archive.close()


def file_sets(n_files: int, rows: int) -> list[set[str]]:
    return [{json.dumps(arch_of(j), separators=(",", ":")) for j in range(k * rows, (k + 1) * rows)}
            for k in range(n_files)]


def check_all_or_none(url: str, sets: list[set[str]]) -> list[bool]:
    """Every file is in the archive completely or not at all; returns which files are in."""
    encodings, evals, dups = stored_encodings(url)
    stored = set(encodings)
    assert len(encodings) == len(stored) and dups == 0
    present = []
    for s in sets:
        inside = len(s & stored)
        assert inside in (0, len(s)), f"partial file: {inside} of {len(s)} rows"
        present.append(inside == len(s))
    expected_evals = sum(len(metrics_of(j)) for k, p in enumerate(present) if p
                         for j in range(k * len(sets[0]), (k + 1) * len(sets[0])))
    assert evals == expected_evals
    return present


def ingest_kill_round(url: str, folder: Path, delay: float, rows: int = ROWS_PER_FILE, n_files: int = 3) -> dict:
    """One round: write ``n_files`` files, kill ``archopt ingest`` after ``delay`` s, check, rerun, check."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_files):
        (path,) = write_files(folder, f"f{k}", list(range(k * rows, (k + 1) * rows)), parts=1)
        paths.append(path)
    env = _env(folder)
    cmd = [*archopt_command(), "--db", url, "ingest", *map(str, paths)]
    killed, ran = kill_at(cmd, delay, env, after_first_line=True)
    db_check(url)
    sets = file_sets(n_files, rows)
    present = check_all_or_none(url, sets)
    # the rerun completes the work and adds nothing twice
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    assert check_all_or_none(url, sets) == [True] * n_files
    db_check(url)
    return {"killed": killed, "after_s": round(ran, 3), "files_in_before_rerun": sum(present)}


def test_kill_ingest_sqlite(tmp_path: Path) -> None:
    rng = random.Random(1)
    # killed 0-0.2 s after the first file's report: in the second file (parsing or its transaction)
    out = ingest_kill_round(f"sqlite:///{tmp_path / 'a1.db'}", tmp_path / "r1", rng.uniform(0.0, 0.2))
    assert out["killed"], out


# (kill -9 of ingest on PostgreSQL: benchmarks/reliability.py, with the same ingest_kill_round)


# --- evaluate ---------------------------------------------------------------------------------------
def tiny_setup(root: Path) -> tuple[Path, Path]:
    """A tiny saved model and a local data folder (as tests/test_campaign_cli.py builds them)."""
    import tiny_models as tm
    model_dir = tm.save_tiny("llama_gqa_odd", root / "tiny-gqa")
    data = tm.write_local_data(root / "data")
    return model_dir, data


EVAL_ARGS = ["--metrics", "ppl_wikitext2,ppl_ptb", "--seq-len", "16", "--device", "cpu", "--samples", "1",
             "--uniform", "0.3", "--seed", "1"]


def evaluate_kill_round(url: str, model_dir: Path, data: Path, delay: float, tmp: Path) -> dict:
    env = _env(tmp)
    cmd = [*archopt_command(), "--db", url, "evaluate", "--model", str(model_dir), "--data-dir", str(data), *EVAL_ARGS]
    killed, ran = kill_at(cmd, delay, env)
    # the archive may still be empty (killed before the first write): it must open and check fine
    db_check(url)
    encodings, evals, dups = stored_encodings(url)
    assert dups == 0 and len(encodings) == len(set(encodings))
    # each architecture's measurements are written together: every stored one has both metrics
    assert evals == 2 * len(encodings)
    before = len(encodings)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    encodings, evals, dups = stored_encodings(url)
    assert (len(encodings), evals, dups) == (3, 6, 0)  # base + uniform + 1 random, two metrics each
    db_check(url)
    return {"killed": killed, "after_s": round(ran, 3), "archs_before_rerun": before}


def test_kill_evaluate(tmp_path: Path) -> None:
    model_dir, data = tiny_setup(tmp_path)
    url = f"sqlite:///{tmp_path / 'e.db'}"
    out = evaluate_kill_round(url, model_dir, data, random.Random(5).uniform(4.0, 7.0), tmp_path)
    assert out["archs_before_rerun"] <= 3
