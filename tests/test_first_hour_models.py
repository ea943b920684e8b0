"""Issue 18 with a real (tiny) model: ``prune`` without network or ``--data-dir`` reuses the cached
importance, fails in one line within seconds when the cache lacks it, shows no third-party
progress bar; the pruned directory loads with the README's snippet without a prompt.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.cli_runs import evaluate
from helpers.first_hour import archopt_env, assert_fails_fast, timed_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, object]:
    """A tiny model evaluated with Taylor importance (calibrated on its --data-dir) into an archive;
    the importance cache that run filled."""
    import tiny_models as tm
    from conftest import _run_cli
    root = tmp_path_factory.mktemp("measured")
    model, data = tm.save_tiny("llama_gqa_odd", root / "tiny-gqa"), tm.write_local_data(root / "data")
    db, cache = f"sqlite:///{root / 'a.db'}", root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARCHOPT_CACHE", str(cache))
        r = evaluate(_run_cli, db, model, data, "--samples", "3", "--no-base", "--metrics", "ppl_wikitext2")
        assert r.code == 0, r.err
    doc = json.loads(_run_cli("--db", db, "archs", "--model", "tiny-gqa", "--json").out)
    arch = next(a["arch_id"] for a in doc["archs"] if a["origin"] == "random")
    return {"root": root, "model": model, "data": data, "db": db, "cache": cache, "arch": arch[:12]}


def test_prune_reuses_the_cached_importance_without_text(measured, run_cli, tmp_path):
    # a new process, offline with empty Hugging Face caches: no calibration text can be had
    env = archopt_env(tmp_path, offline=True, cache=measured["cache"])
    argv = ["--db", measured["db"], "prune", "--model", "tiny-gqa", "--arch", measured["arch"],
            "--out", str(tmp_path / "cached")]
    done = subprocess.run([sys.executable, "-c", "from archopt.cli import main; main()", *argv],
                          capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout + done.stderr
    assert "Loading weights" not in said and "it/s]" not in said, said  # no third-party progress bar
    assert said.startswith("wrote ") and "error" not in said, said
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARCHOPT_CACHE", str(tmp_path / "fresh-cache"))
        r = run_cli("--db", measured["db"], "prune", "--model", "tiny-gqa", "--arch", measured["arch"],
                    "--out", str(tmp_path / "from-text"), "--data-dir", str(measured["data"]))
    assert r.code == 0, r.err
    cached, from_text = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("cached", "from-text"))
    assert cached == from_text, "the cached importance kept other units than the one computed from the text"
    info = json.loads((tmp_path / "cached" / "archopt.json").read_text())
    assert info["importance"]["criterion"] == "taylor" and info["importance"]["calibration_label"]


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "unreachable"])
def test_prune_without_cache_or_data_dir_fails_in_one_line(measured, tmp_path, offline):
    env = archopt_env(tmp_path, offline=offline, cache=tmp_path / "empty-cache")
    result = timed_cli(env, "--db", measured["db"], "prune", "--model", "tiny-gqa", "--arch", measured["arch"],
                       "--out", str(tmp_path / "out"))
    assert_fails_fast(result, "taylor importance of tiny-gqa is not cached here", "--data-dir DIR")
    assert not (tmp_path / "out").exists()


def test_prune_refuses_a_calibration_other_than_the_archive_s(measured, run_cli, monkeypatch, tmp_path):
    other = tmp_path / "other-data"
    (other / "ptb").mkdir(parents=True)
    (other / "ptb" / "ptb.train.txt").write_text("another calibration text entirely\n" * 200)
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path / "cache"))
    r = run_cli("--db", measured["db"], "prune", "--model", "tiny-gqa", "--arch", measured["arch"],
                "--out", str(tmp_path / "out"), "--data-dir", str(other))
    assert r.code == 1 and len(r.err_lines) == 1, r.err
    assert "was measured with taylor importance calibrated on ptb_text_only:train/" in r.err_lines[0]
    assert "pass the --data-dir it was measured with" in r.err_lines[0]


def readme_snippet() -> str:
    """The Python block of the README's "Pruned models for the ecosystem" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Pruned models for the ecosystem", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "the README's pruned-model snippet is missing"
    return found.group(1)


def test_the_readme_snippet_loads_a_pruned_directory_without_a_prompt(measured, run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("ARCHOPT_CACHE", str(measured["cache"]))
    out = tmp_path / "pruned"
    r = run_cli("--db", measured["db"], "prune", "--model", "tiny-gqa", "--arch", measured["arch"], "--out", str(out))
    assert r.code == 0, r.err
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] and "local_files_only" not in config and "is_local" not in config
    code = readme_snippet().replace('"DIR"', repr(str(out)))
    code += "\nprint('tokens', tokenizer('hello world')['input_ids'], type(model).__name__)\n"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-2000:]
    assert "Do you wish to run the custom code" not in said and "You are using a model of type" not in said, said
    assert "tokens [" in done.stdout and "ArchoptLlamaForCausalLM" in done.stdout


def test_campaigns_find_the_cached_importance_without_text(measured, monkeypatch):
    """What ``query --verify`` and workers do (``Campaign`` -> ``compute_importance`` without a data
    folder): the importance cached by the evaluation is found without reading any text; another
    seed is another calibration, so it is not mistaken for it."""
    from archopt.evaluators import data, importance, load_base_model
    from archopt.evaluators.hub import SourceError
    base = load_base_model(str(measured["model"]))
    folder = measured["cache"] / "importance"
    monkeypatch.setattr(data, "calibration_text", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read text")))
    found = importance.compute_importance(base, "taylor", cache_dir=folder)
    assert found.calibration_label().startswith("ptb_text_only:train/10x64/seed0/")
    assert importance.find_cached(base, "taylor", folder, seed=1) is None
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(measured["root"] / "hf-empty"))
    with pytest.raises(SourceError, match="is not cached here .* --data-dir DIR"):
        importance.compute_importance(base, "taylor", cache_dir=folder, seed=1)
