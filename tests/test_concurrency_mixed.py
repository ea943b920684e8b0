"""Eight processes at once on one archive (SQLite file or PostgreSQL database): ``archopt ingest`` runs,
evaluator-style writes (``record_measurements``, one transaction per architecture), forced predictor
training (``ensure_predictors(force=True)``) and queries (``run_query``, which may retrain a stale
predictor). Nothing is lost, nothing is duplicated, and no "database is locked" reaches anyone.

The workers are this file run as a script (``python tests/test_concurrency_mixed.py KIND URL ...``);
``benchmarks/reliability.py`` runs the same mix with more rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import MMLU, PTB, TINY_BASE, WIKI  # noqa: E402
from test_archdb_concurrency import arch_of, archopt_command, metrics_of, write_files  # noqa: E402

MEASURED_OFFSET = 20000  # evaluator-style writes use j >= this, so their rows are told apart


def measured_of(j: int) -> dict[str, float]:
    return {"ppl_wikitext2": 10.0 + j / 7, "ppl_ptb": 20.0 + j / 11}


# --- workers (run in their own processes) ------------------------------------------------------------
def worker(kind: str, url: str, args: list[str]) -> dict:
    from archopt.archdb import Archive, BaseSpec, parse_architecture
    from archopt.archdb import models as m
    from archopt.archdb.protocol import Measurement, Protocol
    from archopt.archdb.store import NewArch, find_base_model, record_measurements

    archive = Archive(url)
    out: dict = {"kind": kind, "ops": 0}
    try:
        if kind == "measure":
            start, stop = int(args[0]), int(args[1])
            spec = BaseSpec(**TINY_BASE)
            protos = {"ppl_wikitext2": Protocol.from_dict(WIKI), "ppl_ptb": Protocol.from_dict(PTB)}
            added = 0
            for j in range(start, stop):
                arch = parse_architecture(spec, arch_of(j))
                with archive.write() as session:
                    base = find_base_model(session, "tiny")
                    rep = record_measurements(session, base, NewArch(arch, origin="random"),
                                              [Measurement(k, v, protos[k], device="cpu")
                                               for k, v in measured_of(j).items()], source="mixed-test")
                added += rep.evaluations_added
                out["ops"] += 1
            out["added"] = added
        elif kind == "train":
            from archopt.optimizer.training import ensure_predictors
            versions = []
            for _ in range(int(args[0])):
                trained = ensure_predictors(archive, "tiny", ["ppl_wikitext2"], force=True)
                versions.append(trained["ppl_wikitext2"].version)
                out["ops"] += 1
            out["versions"] = versions
        elif kind == "query":
            from archopt.optimizer.query import QueryRequest, run_query
            for i in range(int(args[0])):
                doc = run_query(archive, QueryRequest(model="tiny", params="80%", top=3, seed=i, candidates=500))
                assert doc["results"], doc
                out["ops"] += 1
        else:
            raise SystemExit(f"unknown worker {kind}")
    finally:
        archive.close()
    return out


# --- the test --------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "ARCHOPT_DB": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)
            + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_mix(url: str, folder: Path, scale: int = 1) -> dict:
    """Seed the archive, run 8 processes at once, check every row; returns the figures."""
    import sqlalchemy as sa
    from archopt.archdb import Archive, ingest_file
    from archopt.archdb import models as m

    folder.mkdir(parents=True, exist_ok=True)
    (seed,) = write_files(folder, "seed", list(range(0, 40)), parts=1)
    archive = Archive(url)
    ingest_file(archive, seed)
    archive.close()

    n = 60 * scale
    ingest_a = write_files(folder, "ia", list(range(40, 40 + n)), parts=3)
    ingest_b = write_files(folder, "ib", list(reversed(range(40 + n // 2, 40 + n + n // 2))), parts=3)
    ingested = set(range(0, 40 + n + n // 2))
    m_lo, m_hi = MEASURED_OFFSET, MEASURED_OFFSET + 10 * scale
    env = _env()
    me = [sys.executable, str(Path(__file__).resolve())]
    commands = [
        [*archopt_command(), "--db", url, "ingest", *map(str, ingest_a)],
        [*archopt_command(), "--db", url, "ingest", *map(str, ingest_b)],
        [*me, "measure", url, str(m_lo), str(m_hi)],
        [*me, "measure", url, str(m_lo + 5 * scale), str(m_hi + 5 * scale)],  # overlaps the other one
        [*me, "train", url, str(scale)],
        [*me, "train", url, str(scale)],
        [*me, "query", url, str(scale)],
        [*me, "query", url, str(scale)],
    ]
    start = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in commands]
    results = [(p, *p.communicate(timeout=900)) for p in procs]
    elapsed = time.monotonic() - start
    reports = []
    for proc, stdout, stderr in results:
        assert proc.returncode == 0, stderr[-3000:]
        assert "locked" not in (stdout + stderr).lower() and "deadlock" not in (stdout + stderr).lower(), stderr
        if proc.args[1] == str(Path(__file__).resolve()):
            reports.append(json.loads(stdout.strip().splitlines()[-1]))

    measured = set(range(m_lo, m_hi + 5 * scale))
    archive = Archive(url)
    try:
        with archive.read() as session:
            encodings = list(session.scalars(sa.select(m.Architecture.encoding)))
            rows = session.execute(sa.select(m.Architecture.encoding, m.Evaluation.metric, m.Evaluation.value)
                                   .join(m.Evaluation)).all()
            versions = session.execute(sa.select(m.PredictorVersion.metric, m.PredictorVersion.protocol_id,
                                                 m.PredictorVersion.version)).all()
    finally:
        archive.close()
    expected: dict[tuple[str, str], float] = {}
    for j in ingested:
        for k, (v, _) in metrics_of(j).items():
            expected[(json.dumps(arch_of(j), separators=(",", ":")), k)] = v
    for j in measured:
        for k, v in measured_of(j).items():
            expected[(json.dumps(arch_of(j), separators=(",", ":")), k)] = v
    stored = {}
    duplicated = 0
    for enc, metric, value in rows:
        duplicated += (enc, metric) in stored
        stored[(enc, metric)] = value
    lost = sum(1 for key in expected if key not in stored)
    extra = sum(1 for key in stored if key not in expected)
    wrong = sum(1 for key, v in expected.items() if key in stored and stored[key] != v)
    dup_archs = len(encodings) - len(set(encodings))
    dup_versions = len(versions) - len(set(versions))
    trained = sum(len(r.get("versions", [])) for r in reports)
    measured_added = sum(r.get("added", 0) for r in reports)
    return {"processes": len(commands), "seconds": round(elapsed, 2), "rows_expected": len(expected),
            "lost": lost, "duplicated": duplicated + dup_archs + dup_versions, "unexpected": extra, "wrong": wrong,
            "predictor_versions": len(versions), "forced_trainings": trained,
            "measured_added": measured_added, "measured_expected": 2 * len(measured)}


def check_mix(figures: dict) -> None:
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert figures["unexpected"] == 0 and figures["wrong"] == 0, figures
    assert figures["measured_added"] == figures["measured_expected"], figures  # each added exactly once
    assert figures["predictor_versions"] >= figures["forced_trainings"], figures


try:
    import pytest
except ImportError:  # the worker processes need no pytest
    pytest = None

if pytest is not None and __name__ != "__main__":
    @pytest.mark.slow
    def test_eight_processes_sqlite(tmp_path: Path) -> None:
        check_mix(run_mix(f"sqlite:///{tmp_path / 'mixed.db'}", tmp_path / "files"))

    @pytest.mark.slow
    @pytest.mark.postgres
    def test_eight_processes_postgresql(pg_server, tmp_path: Path) -> None:
        url = pg_server.new_database()
        try:
            check_mix(run_mix(url, tmp_path / "files"))
        finally:
            pg_server.drop_database(url)


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], sys.argv[2], sys.argv[3:])))
