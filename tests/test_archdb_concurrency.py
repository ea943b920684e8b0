"""Several writers at once: real ``archopt ingest`` processes (and threads sharing one Archive) on the same
SQLite file or PostgreSQL database, starting from an empty, not yet migrated archive."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from archopt.archdb import Archive, ingest_file
from archopt.archdb import models as m

from conftest import MMLU, PTB, TINY_BASE, WIKI  # noqa: E402  (shared test data)


def arch_of(j: int) -> list:
    """A distinct architecture of the tiny base model for every j < 65536 (MLP widths spell j in base 16)."""
    kv = 1 + j % 4
    return [[2 * kv, kv, 8 * (1 + ((j >> (4 * i)) & 15))] for i in range(4)]


def metrics_of(j: int) -> dict[str, tuple[float, dict]]:
    out = {"ppl_wikitext2": (10.0 + j / 7, WIKI), "ppl_ptb": (20.0 + j / 11, PTB)}
    if j % 3 == 0:
        out["mmlu"] = (0.25 + (j % 100) / 1000, MMLU)
    return out


def line_of(j: int) -> dict:
    return {"model": "tiny", "architecture": arch_of(j), "origin": "random",
            "evaluations": [{"metric": k, "value": v, "protocol": p} for k, (v, p) in metrics_of(j).items()]}


def write_files(folder: Path, name: str, js: list[int], parts: int) -> list[Path]:
    """Split ``js`` over ``parts`` files (each its own transaction), each starting with the base model."""
    paths = []
    for k in range(parts):
        path = folder / f"{name}-{k}.jsonl"
        with open(path, "w") as handle:
            handle.write(json.dumps({"model": "tiny", "base_model": TINY_BASE}) + "\n")
            for j in js[k::parts]:
                handle.write(json.dumps(line_of(j)) + "\n")
        paths.append(path)
    return paths


def workloads(folder: Path) -> tuple[list[list[Path]], set[int]]:
    """Four writers: two disjoint ranges, one overlapping both in reverse order, one shuffled over all."""
    rng = random.Random(7)
    everything = list(range(0, 480, 2))
    rng.shuffle(everything)
    sets = {
        "a": list(range(0, 160)),
        "b": list(range(160, 320)),
        "c": list(reversed(range(80, 400))),
        "d": everything,
    }
    files = [write_files(folder, name, js, parts=4) for name, js in sets.items()]
    return files, set().union(*map(set, sets.values()))


def archopt_command() -> list[str]:
    script = Path(sys.executable).with_name("archopt")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from archopt.cli import main; main()"]


def check_archive(url: str, union: set[int]) -> None:
    archive = Archive(url)
    try:
        with archive.read() as session:
            count = lambda model: session.scalar(sa.select(sa.func.count()).select_from(model))  # noqa: E731
            assert count(m.BaseModel) == 1
            assert count(m.Architecture) == len(union)
            assert count(m.Protocol) == 3
            assert count(m.Evaluation) == sum(len(metrics_of(j)) for j in union)
            dup_archs = session.execute(sa.select(m.Architecture.arch_hash).group_by(m.Architecture.arch_hash)
                                        .having(sa.func.count() > 1)).all()
            dup_evals = session.execute(
                sa.select(m.Evaluation.architecture_id, m.Evaluation.metric, m.Evaluation.protocol_id)
                .group_by(m.Evaluation.architecture_id, m.Evaluation.metric, m.Evaluation.protocol_id)
                .having(sa.func.count() > 1)).all()
            assert dup_archs == [] and dup_evals == []
            values = dict(session.execute(
                sa.select(m.Architecture.encoding, m.Evaluation.value)
                .join(m.Evaluation).where(m.Evaluation.metric == "ppl_wikitext2")).all())
            for j in union:
                assert values[json.dumps(arch_of(j), separators=(",", ":"))] == metrics_of(j)["ppl_wikitext2"][0]
    finally:
        archive.close()


@pytest.mark.slow
def test_four_ingest_processes_at_once(archive_url, tmp_path):
    files, union = workloads(tmp_path)
    env = {**os.environ, "ARCHOPT_DB": ""}
    procs = [subprocess.Popen([*archopt_command(), "--db", archive_url, "ingest", *map(str, paths)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for paths in files]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        outputs.append((proc.returncode, out, err))
    for code, out, err in outputs:
        assert code == 0, err
        assert "locked" not in err.lower() and "deadlock" not in err.lower() and err.strip() == "", err
    # every row was added exactly once, by one of the writers, and the others counted it as already there
    added = sum(int(x) for _, out, _ in outputs for x in re.findall(r"(\d+) evaluations added", out))
    there = sum(int(x) for _, out, _ in outputs for x in re.findall(r"(\d+) already there", out))
    total = sum(len(metrics_of(j)) for j in union)
    assert added == total
    written = sum(len(line["evaluations"]) for paths in files for path in paths
                  for line in map(json.loads, path.read_text().splitlines()[1:]))
    assert added + there == written
    assert sum(int(x) for _, out, _ in outputs for x in re.findall(r"(\d+) new base models", out)) == 1
    check_archive(archive_url, union)


def test_threads_sharing_one_archive(archive_url, tmp_path):
    """``Archive`` is shared between threads: each write block has its own session and transaction."""
    files, union = workloads(tmp_path)
    archive = Archive(archive_url)
    errors: list[BaseException] = []

    def work(paths: list[Path]) -> None:
        try:
            for path in paths:
                ingest_file(archive, path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(paths,)) for paths in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    archive.close()
    assert not errors, errors
    check_archive(archive_url, union)
