"""Shared fixtures: archive URLs on SQLite and PostgreSQL, example ingest files, an in-process CLI runner.

- ``archive_url``: a fresh, empty archive URL, parametrised over ``sqlite`` and ``postgresql`` (a new
  database on one throwaway PostgreSQL server per session; tests on it carry the ``postgres`` marker;
  if pgserver cannot start they fail under CI (``CI`` set) and are skipped elsewhere).
- ``sqlite_url``: a fresh SQLite archive URL only.
- ``pg_server``: the session's PostgreSQL server (``.new_database()`` gives a fresh database URL).
- ``examples``: writes JSONL / CSV / lm-eval files describing a tiny base model and its architectures.
- ``run_cli``: runs ``archopt`` in-process through ``archopt.cli.main`` and returns (exit code, stdout, stderr).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("ARCHOPT_DB", None)  # tests always name their archive


# --- PostgreSQL -----------------------------------------------------------------------------------
@dataclass
class PgServer:
    """A running PostgreSQL server: ``uri`` of its ``postgres`` database and a database factory."""

    uri: str

    def url_for(self, database: str) -> str:
        from sqlalchemy.engine import make_url
        return make_url(self.uri).set(database=database).render_as_string(hide_password=False)

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database and return its ``postgresql://`` URL (what ``--db`` takes)."""
        import sqlalchemy as sa
        from archopt.archdb.archive import resolve_url
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        engine = sa.create_engine(resolve_url(self.uri), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url_for(name)

    def drop_database(self, url: str) -> None:
        import sqlalchemy as sa
        from sqlalchemy.engine import make_url
        from archopt.archdb.archive import resolve_url
        name = make_url(url).database
        engine = sa.create_engine(resolve_url(self.uri), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            engine.dispose()


@pytest.fixture(scope="session")
def pg_server() -> Iterable[PgServer]:
    """One throwaway PostgreSQL 16 for the whole session (pgserver; ~1-2 s to start)."""
    import pgserver  # a test dependency: PostgreSQL must be real, never silently skipped
    # A short path of its own: the Unix socket lives there and the server may run as another user.
    folder = tempfile.mkdtemp(prefix="archopt-pg-")
    try:
        server = pgserver.get_server(folder, cleanup_mode="delete")
        uri = server.get_uri()
    except Exception as exc:  # noqa: BLE001 - say why in one line; CI must not skip PostgreSQL
        shutil.rmtree(folder, ignore_errors=True)
        if os.environ.get("CI") or os.environ.get("ARCHOPT_REQUIRE_POSTGRES"):
            pytest.fail(f"pgserver could not start PostgreSQL: {exc}")
        pytest.skip(f"pgserver could not start PostgreSQL: {exc}")
    yield PgServer(uri)
    with contextlib.suppress(Exception):
        server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'archive.db'}"


@pytest.fixture
def archive(sqlite_url: str) -> Iterable[Any]:
    """An open ``Archive`` on ``sqlite_url``, closed after the test."""
    from archopt.archdb import Archive
    opened = Archive(sqlite_url)
    yield opened
    opened.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def archive_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterable[str]:
    """A fresh, empty (not yet migrated) archive on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'archive.db'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    url = server.new_database()
    yield url
    with contextlib.suppress(Exception):
        server.drop_database(url)


@pytest.fixture
def backend(archive_url: str) -> str:
    return "postgresql" if archive_url.startswith("postgres") else "sqlite"


# --- example files --------------------------------------------------------------------------------
TINY_BASE: dict[str, Any] = {
    "family": "llama", "num_layers": 4, "hidden_size": 64, "num_heads": 8, "num_kv_heads": 4,
    "head_dim": 8, "intermediate_size": 128, "vocab_size": 100,
}
WIKI = {"dataset": "wikitext2", "split": "test", "joining": "\n\n", "tokenizer": "tiny-bpe",
        "tokenizer_hash": "abc123", "seq_len": 128, "tokens": 4096, "tool": "archopt", "tool_version": "0.1.0"}
PTB = {"dataset": "ptb_text_only", "split": "validation", "joining": "\n\n", "tokenizer": "tiny-bpe",
       "seq_len": 128, "tool": "archopt"}
MMLU = {"dataset": "mmlu", "split": "test", "questions": 570, "shots": 5, "tool": "archopt"}


class Examples:
    """Builds ingest records of the tiny base model ``TINY_BASE`` and writes them as files."""

    base = TINY_BASE

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    # records
    def base_line(self, model: str = "tiny", **overrides: Any) -> dict[str, Any]:
        return {"model": model, "base_model": {**TINY_BASE, **overrides}}

    @staticmethod
    def evaluation(metric: str, value: Any, protocol: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        if protocol is None:
            protocol = MMLU if metric.startswith("mmlu") else (PTB if metric == "ppl_ptb" else WIKI)
        return {"metric": metric, "value": value, "protocol": dict(protocol), **extra}

    def arch_line(self, architecture: Any, *evaluations: dict[str, Any], model: str = "tiny",
                  **fields: Any) -> dict[str, Any]:
        return {"model": model, "architecture": architecture, **fields, "evaluations": list(evaluations)}

    def kv_arch(self, kv: Sequence[int], inter: Sequence[int] | None = None) -> list[list[int] | None]:
        """Explicit ``[q, kv, inter]`` rows (kv 0 = dropped layer) for the tiny model (2 query heads per KV head)."""
        inter = inter or [TINY_BASE["intermediate_size"]] * len(kv)
        return [None if k == 0 else [2 * k, k, i] for k, i in zip(kv, inter)]

    def standard(self, n: int = 6, start: int = 0, model: str = "tiny") -> list[dict[str, Any]]:
        """A base-model line, then ``n`` distinct architectures with 1-3 metrics each."""
        lines: list[dict[str, Any]] = [self.base_line(model)]
        for j in range(start, start + n):
            kv = [1 + (j + i) % 4 for i in range(4)]
            inter = [8 * (1 + (j * 3 + i) % 16) for i in range(4)]
            evals = [self.evaluation("ppl_wikitext2", 10.0 + j * 0.5, device="cpu", duration_s=1.5)]
            if j % 2 == 0:
                evals.append(self.evaluation("ppl_ptb", 20.0 + j))
            if j % 3 == 0:
                evals.append(self.evaluation("mmlu", 0.25 + j / 1000))
            lines.append(self.arch_line(self.kv_arch(kv, inter), *evals, model=model,
                                        origin="random" if j % 2 else "search"))
        return lines

    # files
    def jsonl(self, name: str, lines: Iterable[Any]) -> Path:
        path = self.folder / name
        with open(path, "w", encoding="utf-8") as handle:
            for line in lines:
                handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
        return path

    def csv(self, name: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Path:
        columns = list(columns or dict.fromkeys(k for row in rows for k in row))
        path = self.folder / name
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()})
        return path

    def lmeval(self, name: str, pretrained: str | None, results: dict[str, Any] | None = None,
               limit: Any = None, **top: Any) -> Path:
        """An lm-evaluation-harness results file (the layout of lm-eval 0.4)."""
        results = results or {
            "wikitext": {"alias": "wikitext", "word_perplexity,none": 31.5, "word_perplexity_stderr,none": "N/A",
                         "byte_perplexity,none": 1.8, "bits_per_byte,none": 0.85},
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.41, "acc_stderr,none": 0.005,
                          "acc_norm,none": 0.52, "acc_norm_stderr,none": 0.005},
        }
        doc: dict[str, Any] = {
            "results": results,
            "versions": {task: 1.0 for task in results},
            "n-shot": {task: 0 for task in results},
            "config": {"model": "hf", "model_args": f"pretrained={pretrained},dtype=float32" if pretrained else "",
                       "batch_size": 1, "limit": limit},
            "lm_eval_version": "0.4.8",
            **top,
        }
        path = self.folder / name
        path.write_text(json.dumps(doc, indent=2))
        return path

    def hf_model_dir(self, name: str = "tiny-hf", **overrides: Any) -> Path:
        """A model directory with only a config.json (what lm-eval's ``pretrained=`` names)."""
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4,
                  "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
                  "intermediate_size": 128, "vocab_size": 100, "tie_word_embeddings": False, **overrides}
        (folder / "config.json").write_text(json.dumps(config))
        return folder


@pytest.fixture
def examples(tmp_path: Path) -> Examples:
    folder = tmp_path / "files"
    folder.mkdir(exist_ok=True)
    return Examples(folder)


# --- CLI ------------------------------------------------------------------------------------------
@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def _run_cli(*args: Any) -> CliResult:
    """``archopt ARGS`` in-process, through the console entry point (one-line errors, exit codes)."""
    from archopt.cli import main
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def run_cli() -> Callable[..., CliResult]:
    return _run_cli


# -- a tiny real model, local data and a private importance cache (CLI tests of evaluate/queue) --
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny GQA Llama (9 query / 3 KV heads), once per test module."""
    import tiny_models as tm
    return tm.save_tiny("llama_gqa_odd", tmp_path_factory.mktemp("tiny") / "tiny-gqa")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A local data folder in the shared layout (WikiText-2, PTB, MMLU), once per test module."""
    import tiny_models as tm
    return tm.write_local_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def env(monkeypatch, tmp_path):
    """``ARCHOPT_CACHE`` under the test's tmp dir (importance and token caches start empty)."""
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path
