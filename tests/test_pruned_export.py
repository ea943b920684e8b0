"""`archopt prune` directories load without archopt (trust_remote_code), and their lm-eval results ingest.

Each tiny base (MHA, GQA 9/3, tied embeddings + biases, Qwen2 biases, Mistral) is pruned with a
dropped layer and saved; a fresh Python process in which ``import archopt`` fails loads every
directory with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``. Its logits
and greedy generations (KV cache on and off) equal the in-memory pruned model's, and its parameter
count equals ``archopt.json`` and the archive. lm-evaluation-harness then runs for real, offline,
on one directory (a local YAML task over a JSON file) and ``archopt ingest`` puts its values on
that architecture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

import tiny_models as tm
from archopt.archdb import Archive
from archopt.archdb import models as m
from archopt.archdb.arch import DROPPED, Architecture, from_ratios
from archopt.evaluators import load_base_model, load_pruned, prune_model, read_pruned_info, save_pruned

NAMES = ["llama_mha", "llama_gqa_odd", "llama_tied_bias", "qwen2_bias", "mistral_gqa"]
FAMILY_CLASS = {"llama": "ArchoptLlamaForCausalLM", "mistral": "ArchoptMistralForCausalLM",
                "qwen2": "ArchoptQwen2ForCausalLM"}
NEW_TOKENS = 6

# Runs in a fresh interpreter (-I: no PYTHONPATH, no user site, no script directory) after taking
# the editable install's finder and path hook out: archopt cannot be imported there.
CHILD = textwrap.dedent(r'''
    import json, sys
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "__editable__" not in (getattr(f, "__module__", None) or type(f).__module__)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in (getattr(h, "__module__", None) or "")]
    sys.path[:] = [p for p in sys.path if p and p != REPO]
    try:
        import archopt  # noqa: F401
        importable = True
    except ImportError:
        importable = False
    import torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(open(sys.argv[1]).read())
    inputs = torch.load(sys.argv[2])
    ids, mask = inputs["ids"], inputs["mask"]
    out = {"archopt_importable": importable, "models": {}}
    for name, directory in jobs.items():
        res = {}
        try:
            AutoModelForCausalLM.from_pretrained(directory)
            res["plain_load"] = "loaded"
        except Exception as exc:  # noqa: BLE001
            res["plain_load"] = f"{type(exc).__name__}: {exc}"
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, attn_implementation="eager")
        res["class"] = type(model).__name__
        res["bases"] = [c.__module__ + "." + c.__name__ for c in type(model).__mro__]
        res["params"] = sum(p.numel() for p in model.parameters())
        res["dtype"] = str(model.dtype)
        res["layer_idx"] = [layer.self_attn.layer_idx for layer in model.model.layers]
        with torch.no_grad():
            res["logits"] = model(input_ids=ids, attention_mask=mask).logits
            res["gen"] = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                        pad_token_id=2)
            res["gen_nocache"] = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                                do_sample=False, pad_token_id=2, use_cache=False)
            sdpa = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, attn_implementation="sdpa")
            res["logits_sdpa"] = sdpa(input_ids=ids, attention_mask=mask).logits
        out["models"][name] = res
    out["archopt_loaded"] = any(k == "archopt" or k.startswith("archopt.") for k in sys.modules)
    torch.save(out, sys.argv[3])
''')


def isolated_env(tmp: Path) -> dict[str, str]:
    """Offline, with Hugging Face caches (remote-code modules, datasets) under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf"),
               HF_MODULES_CACHE=str(tmp / "hf" / "modules"), HF_DATASETS_CACHE=str(tmp / "hf" / "datasets"),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    return env


def run_isolated(code: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -I -c CODE ARGS`` without archopt importable (``REPO`` is defined for the code)."""
    repo = str(Path(__file__).resolve().parents[1])
    prelude = f"REPO = {repo!r}\nNEW_TOKENS = {NEW_TOKENS}\n"
    return subprocess.run([sys.executable, "-I", "-c", prelude + code, *args], cwd=cwd, env=isolated_env(cwd),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def arch_with_drop(spec) -> Architecture:  # noqa: ANN001
    """Narrow layer 0 (attention and MLP), drop layer 1, narrow layer 2's attention only."""
    layers = list(from_ratios(spec, [0.5, 0.0, 0.4], [0.3, 0.5, 0.0]).layers)
    layers[1] = DROPPED
    return Architecture(spec, tuple(layers))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every tiny base pruned (random importance, a dropped layer) and saved; reference outputs in memory."""
    root = tmp_path_factory.mktemp("export")
    paths = tm.save_all(root / "bases", NAMES)
    ids, mask = tm.padded_batch()
    torch.save({"ids": ids, "mask": mask}, root / "inputs.pt")
    out = {}
    for name, path in paths.items():
        base = load_base_model(str(path), attn_implementation="eager")
        arch = arch_with_drop(base.spec)
        model = prune_model(base, arch, tm.random_importance(base.spec, seed=3))
        directory = save_pruned(model, base, arch, {"criterion": "l2", "calibration": None}, root / f"pruned-{name}")
        # (the kept units come from random scores; archopt.json records "l2" so ingest has a criterion)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
        out[name] = {"base": base, "arch": arch, "dir": directory, "logits": logits, "gen": gen}
    return root, out


@pytest.fixture(scope="module")
def remote(exported):
    """What a fresh process without archopt gets from every saved directory."""
    root, out = exported
    jobs = root / "jobs.json"
    jobs.write_text(json.dumps({name: str(o["dir"]) for name, o in out.items()}))
    res = run_isolated(CHILD, [str(jobs), str(root / "inputs.pt"), str(root / "remote.pt")], root)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(root / "remote.pt")


def test_fresh_process_has_no_archopt(remote):
    assert remote["archopt_importable"] is False
    assert remote["archopt_loaded"] is False


@pytest.mark.parametrize("name", NAMES)
def test_remote_code_load_matches_in_memory_model(exported, remote, name):
    _, out = exported
    ref, got = out[name], remote["models"][name]
    family = ref["base"].spec.family
    assert got["class"] == FAMILY_CLASS[family]
    stock = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    assert f"transformers.models.{family}.modeling_{family}.{stock}" in got["bases"]
    assert got["layer_idx"] == [0, 1]  # layer 1 was dropped: the kept layers are renumbered for the cache
    assert torch.equal(got["logits"], ref["logits"])
    assert torch.equal(got["gen"], ref["gen"]) and got["gen"].shape[1] == ref["logits"].shape[1] + NEW_TOKENS
    assert torch.equal(got["gen_nocache"], got["gen"])  # the KV cache with per-layer KV heads changes nothing
    info = read_pruned_info(ref["dir"])
    assert got["params"] == info["params"] == ref["arch"].params
    # archopt's own loader reads the same directory into the stock class, with identical logits
    ids, mask = tm.padded_batch()
    loaded = load_pruned(ref["dir"], attn_implementation="eager")
    sdpa = load_pruned(ref["dir"], attn_implementation="sdpa")
    assert type(loaded).__name__ == stock
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, ref["logits"])
        torch.testing.assert_close(sdpa(input_ids=ids, attention_mask=mask).logits, got["logits_sdpa"],
                                   rtol=0, atol=1e-6)
    # without trust_remote_code transformers refuses (it does not fall back to the stock class)
    assert "trust_remote_code" in got["plain_load"] and got["plain_load"].startswith("ValueError")


def test_directory_layout(exported):
    _, out = exported
    ref = out["qwen2_bias"]
    directory, arch, base = ref["dir"], ref["arch"], ref["base"]
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "archopt_qwen2" and config["archopt_base_model_type"] == "qwen2"
    assert config["architectures"] == ["ArchoptQwen2ForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_archopt.ArchoptQwen2ForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "modeling_archopt.ArchoptQwen2Config"
    assert config["num_hidden_layers"] == 2 and config["archopt_dropped_layers"] == [1]
    assert [d["base_layer"] for d in config["archopt_layers"]] == [0, 2]
    for entry in config["archopt_layers"]:
        layer = arch.layers[entry["base_layer"]]
        assert (entry["q_heads"], entry["kv_heads"], entry["intermediate"]) == \
            (layer.q_heads, layer.kv_heads, layer.intermediate)
    for name in ("model.safetensors", "modeling_archopt.py", "tokenizer.json", "generation_config.json",
                 "archopt.json"):
        assert (directory / name).is_file(), name
    source = (directory / "modeling_archopt.py").read_text()
    assert "archopt" not in {line.split()[1].split(".")[0] for line in source.splitlines()
                             if line.startswith(("import ", "from "))}
    info = read_pruned_info(directory)
    assert info["arch_id"] == arch.arch_id(base.name) and info["canonical"] == arch.canonical_json()
    assert info["base"]["config_hash"] == base.config_hash and info["importance"]["criterion"] == "l2"


def lmeval_shaped(pretrained: str, tasks: dict[str, dict[str, float]], samples: int = 4) -> dict:
    """A results file laid out like lm-eval 0.4.13's ``results_<date>.json`` (see lm_eval/loggers)."""
    results = {}
    for task, metrics in tasks.items():
        results[task] = {"name": task, "alias": task, "sample_len": samples}
        for metric, value in metrics.items():
            results[task][f"{metric},none"] = value
            results[task][f"{metric}_stderr,none"] = "N/A" if "perplexity" in metric else 0.1
    return {
        "results": results, "group_subtasks": {t: [] for t in tasks}, "configs": {},
        "versions": {t: 1.0 for t in tasks}, "n-shot": {t: 0 for t in tasks},
        "higher_is_better": {t: {k: "perplexity" not in k for k in m} for t, m in tasks.items()},
        "n-samples": {t: {"original": samples, "effective": samples} for t in tasks},
        "config": {"model": "hf", "model_args": {"pretrained": pretrained, "trust_remote_code": True},
                   "model_num_parameters": 0, "batch_size": "2", "device": "cpu", "limit": None,
                   "bootstrap_iters": 100000, "gen_kwargs": {}, "random_seed": 0},
        "git_hash": None, "date": 0.0, "transformers_version": "5.24.0", "lm_eval_version": "0.4.13",
        "max_length": 256, "model_source": "hf", "model_name": pretrained,
        "model_name_sanitized": pretrained.replace("/", "__"),
    }


def register_base(run_cli, db: str, tmp: Path, base, name: str) -> None:  # noqa: ANN001
    line = {"model": name, "base_model": {**base.spec.to_dict(), "config_hash": base.config_hash,
                                          "location": base.location}}
    path = tmp / f"{name}.jsonl"
    path.write_text(json.dumps(line) + "\n")
    res = run_cli("--db", db, "ingest", str(path))
    assert res.code == 0, res.err


def stored(db: str, arch_id: str) -> tuple[int, str, dict[str, tuple[float, str, str, int | None]]]:
    """(params, origin, {metric: (value, tool, tool_version, questions)}) of one architecture."""
    archive = Archive(db)
    try:
        with archive.read() as session:
            row = session.scalar(sa.select(m.Architecture).where(m.Architecture.arch_hash == arch_id))
            assert row is not None, "architecture not in the archive"
            evals = session.execute(sa.select(m.Evaluation, m.Protocol).join(m.Protocol)
                                    .where(m.Evaluation.architecture_id == row.id)).all()
            return row.params, row.origin, {e.metric: (e.value, p.tool, p.tool_version, p.questions) for e, p in evals}
    finally:
        archive.close()


def test_lmeval_shaped_results_land_on_the_architecture(exported, run_cli, sqlite_url, tmp_path):
    _, out = exported
    for name in ("llama_gqa_odd", "mistral_gqa"):
        ref = out[name]
        register_base(run_cli, sqlite_url, tmp_path, ref["base"], name)
        doc = lmeval_shaped(str(ref["dir"]), {"toy_mc": {"acc": 0.5, "acc_norm": 0.75},
                                              "toy_ppl": {"word_perplexity": 123.0, "bits_per_byte": 2.5}})
        path = tmp_path / f"results-{name}.json"
        path.write_text(json.dumps(doc))
        res = run_cli("--db", sqlite_url, "ingest", str(path))
        assert res.code == 0, res.err
        info = read_pruned_info(ref["dir"])
        params, origin, values = stored(sqlite_url, info["arch_id"])
        assert params == info["params"] == ref["arch"].params and origin == "ingest"
        assert {k: v[0] for k, v in values.items()} == {  # "name", "sample_len", stderrs are not metrics
            "toy_mc/acc": 0.5, "toy_mc/acc_norm": 0.75, "toy_ppl/word_perplexity": 123.0,
            "toy_ppl/bits_per_byte": 2.5}
        assert {v[1:] for v in values.values()} == {("lm-eval", "0.4.13", 4)}


MC_ROWS = [
    {"question": "The quick brown fox jumps over the lazy", "choices": [" dog.", " cat.", " model."], "answer": 0},
    {"question": "Numbers 0 1 2 3", "choices": [" 4", " head", " fox"], "answer": 0},
    {"question": "Pruning removes heads and", "choices": [" channels;", " dogs", " numbers"], "answer": 0},
    {"question": "Question: which answer is right? Answer:", "choices": [" A", " B", " C", " D"], "answer": 0},
]
TEXT_ROWS = ["The quick brown fox jumps over the lazy dog.", "A tiny model reads a tiny text."]


def write_tasks(folder: Path) -> Path:
    """Two local lm-eval tasks (multiple choice; rolling loglikelihood) over JSON files: no download."""
    folder.mkdir()
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT_ROWS))
    (folder / "archopt_tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: archopt_tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
          - metric: acc_norm
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 1.0
        """))
    (folder / "archopt_tiny_ppl.yaml").write_text(textwrap.dedent(f"""\
        task: archopt_tiny_ppl
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'text.jsonl'}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
            aggregation: weighted_perplexity
            higher_is_better: false
          - metric: bits_per_byte
            aggregation: bits_per_byte
            higher_is_better: false
        metadata:
          version: 1.0
        """))
    return folder


LM_EVAL = textwrap.dedent(r'''
    import runpy, sys
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "__editable__" not in (getattr(f, "__module__", None) or type(f).__module__)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in (getattr(h, "__module__", None) or "")]
    sys.path[:] = [p for p in sys.path if p and p != REPO]
    try:
        import archopt  # noqa: F401
        raise SystemExit("archopt is importable")
    except ImportError:
        pass
    sys.argv = ["lm_eval", *sys.argv[1:]]
    runpy.run_module("lm_eval", run_name="__main__")
''')


@pytest.mark.slow
def test_real_lmeval_run_is_ingested(exported, run_cli, sqlite_url, tmp_path):
    """lm-eval (CLI, offline, without archopt importable) on a saved directory; its file ingests."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a test extra: pip install -e '.[test]'")
    _, out = exported
    ref = out["llama_gqa_odd"]
    tasks = write_tasks(tmp_path / "tasks")
    res = run_isolated(LM_EVAL, ["--model", "hf", "--model_args", f"pretrained={ref['dir']},trust_remote_code=True",
                                 "--tasks", "archopt_tiny_mc,archopt_tiny_ppl", "--include_path", str(tasks),
                                 "--output_path", str(tmp_path / "lm-out"), "--device", "cpu", "--batch_size", "2"],
                       tmp_path)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    (results,) = (tmp_path / "lm-out").rglob("results_*.json")
    doc = json.loads(results.read_text())
    assert doc["config"]["model_num_parameters"] == ref["arch"].params
    register_base(run_cli, sqlite_url, tmp_path, ref["base"], "llama_gqa_odd")
    res = run_cli("--db", sqlite_url, "ingest", str(results))
    assert res.code == 0, res.err
    info = read_pruned_info(ref["dir"])
    params, origin, values = stored(sqlite_url, info["arch_id"])
    assert params == info["params"] == ref["arch"].params and origin == "ingest"
    assert set(values) == {"archopt_tiny_mc/acc", "archopt_tiny_mc/acc_norm", "archopt_tiny_ppl/word_perplexity",
                           "archopt_tiny_ppl/bits_per_byte"}
    for metric, (value, tool, version, questions) in values.items():
        task, _, name = metric.partition("/")
        assert value == doc["results"][task][f"{name},none"]
        assert (tool, version) == ("lm-eval", doc["lm_eval_version"]) and version == lm_eval.__version__
        assert questions == (len(MC_ROWS) if task == "archopt_tiny_mc" else len(TEXT_ROWS))
    # re-ingesting adds nothing; `archopt show` lists the values under their own names
    again = run_cli("--db", sqlite_url, "ingest", str(results))
    assert again.code == 0 and "0 evaluations added" in again.out
    shown = run_cli("--db", sqlite_url, "show", info["arch_id"][:12], "--json")
    assert shown.code == 0, shown.err
    assert "archopt_tiny_mc/acc" in shown.out and "archopt_tiny_ppl/word_perplexity" in shown.out
