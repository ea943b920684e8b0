"""Issue 16, bug 4: the protocol records the numeric precision a model was evaluated in; a campaign
compares the importance calibration of an architecture the archive already holds."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_models as tm
from archopt.archdb import Archive, ingest_file
from archopt.archdb.protocol import Protocol, ProtocolError
from archopt.evaluators import PerplexityTask

# keys computed by archopt before precision was part of the protocol: every stored archive holds them
WIKI = dict(dataset="wikitext", split="test", joining="\n\n", tokenizer="tiny", tokenizer_hash="abc", seq_len=128,
            tokens=8192, tool="archopt", tool_version="0.1.0")
WIKI_KEY = "accc87da8ce7b5c376455c887591a81c9d85beb626710a8b44068b019ecf61ef"
MMLU = dict(dataset="cais/mmlu", split="test", questions=100, shots=5)
MMLU_KEY = "d1579bc3b8196fef8f34db4656fc8039d5eda35c13a9e95212711b327d87b47f"


def test_float32_keeps_the_old_keys_and_other_precisions_get_their_own():
    assert Protocol(**WIKI).key() == WIKI_KEY and Protocol(**MMLU).key() == MMLU_KEY
    assert Protocol(**WIKI, precision="float32").key() == WIKI_KEY
    assert "precision" not in Protocol(**WIKI).to_dict()
    bf16 = Protocol(**WIKI, precision="bfloat16")
    fp16 = Protocol(**WIKI, precision="float16")
    assert len({WIKI_KEY, bf16.key(), fp16.key()}) == 3
    assert bf16.to_dict()["precision"] == "bfloat16"
    assert Protocol.from_dict(bf16.to_dict()) == bf16 and Protocol.from_dict(bf16.to_dict()).key() == bf16.key()
    assert not bf16.is_cheaper_fidelity_of(Protocol(**{**WIKI, "tokens": 2 ** 20}))
    assert "bfloat16" in bf16.describe()
    with pytest.raises(ProtocolError, match="precision"):
        Protocol(**WIKI, precision="fp8")


def _task() -> PerplexityTask:
    ids = torch.tensor(tm.make_tokenizer()(tm.CORPUS)["input_ids"])
    return PerplexityTask(ids, metric="ppl_wikitext2", dataset="wikitext", split="test", tokenizer_name="tiny",
                          tokenizer_hash="x", seq_len=16)


def test_perplexity_protocol_says_the_precision_the_model_ran_in():
    task = _task()
    model = tm.make_model("llama_gqa_odd").eval()
    fp32 = task.evaluate(model)
    assert fp32.protocol.precision == "float32" and fp32.protocol == task.protocol
    bf16 = task.evaluate(model.to(torch.bfloat16))
    assert bf16.protocol.precision == "bfloat16"
    assert bf16.protocol.key() != fp32.protocol.key()
    # a task prepared for bfloat16 announces that key up front (what a campaign compares with the archive)
    ids = torch.tensor(tm.make_tokenizer()(tm.CORPUS)["input_ids"])
    prepared = PerplexityTask(ids, metric="ppl_wikitext2", dataset="wikitext", split="test", tokenizer_name="tiny",
                              tokenizer_hash="x", seq_len=16, precision="bfloat16")
    assert prepared.protocol.key() == bf16.protocol.key()


def test_mmlu_protocol_says_the_precision(tmp_path):
    from archopt.evaluators import MmluTask
    from archopt.evaluators.data import MmluQuestion, MmluSubject
    rows = tuple(MmluQuestion(f"What is {i}?", (str(i), str(i + 1), str(i + 2), str(i + 3)), i % 4)
                 for i in range(6))
    subjects = {"toy": MmluSubject("toy", dev=rows[:2], test=rows[2:])}
    task = MmluTask(tm.make_tokenizer(), subjects, shots=1)
    model = tm.make_model("llama_gqa_odd").eval()
    fp32 = task.evaluate(model)
    bf16 = task.evaluate(model.to(torch.bfloat16))
    assert {m.protocol.precision for m in fp32} == {"float32"}
    assert {m.protocol.precision for m in bf16} == {"bfloat16"}
    assert fp32[0].protocol.key() != bf16[0].protocol.key()


def test_ingest_and_export_carry_the_precision(sqlite_url, examples, run_cli, tmp_path):
    bf16 = {"dataset": "wikitext", "split": "test", "seq_len": 128, "precision": "bfloat16"}
    fp32 = {"dataset": "wikitext", "split": "test", "seq_len": 128}
    lines = [examples.base_line(),
             examples.arch_line(examples.kv_arch([3, 2, 1, 4]), examples.evaluation("ppl_wikitext2", 12.0, bf16),
                                examples.evaluation("ppl_wikitext2", 11.0, fp32))]
    archive = Archive(sqlite_url)
    try:
        report = ingest_file(archive, examples.jsonl("p.jsonl", lines))
        assert report.evaluations_added == 2   # two protocols, not one value overwriting the other
    finally:
        archive.close()
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"export.{fmt}"
        assert run_cli("--db", sqlite_url, "export", "--format", fmt, "-o", out).code == 0
        again = f"sqlite:///{tmp_path / f'again-{fmt}.db'}"
        r = run_cli("--db", again, "ingest", out)
        assert r.code == 0, r.err
        r = run_cli("--db", again, "export", "--format", "jsonl")
        evals = [e for line in r.out.splitlines() for e in json.loads(line).get("evaluations", [])]
        assert sorted(e["protocol"].get("precision", "float32") for e in evals) == ["bfloat16", "float32"]
    bad = [examples.base_line(), examples.arch_line(examples.kv_arch([3, 2, 1, 4]), examples.evaluation(
        "ppl_wikitext2", 12.0, {**fp32, "precision": "int3"}))]
    r = run_cli("--db", sqlite_url, "ingest", examples.jsonl("bad.jsonl", bad))
    assert r.code == 1 and "precision" in r.err


@pytest.mark.slow
def test_campaign_refuses_an_architecture_pruned_with_another_calibration(sqlite_url, model_dir, data_dir, env):
    from archopt.archdb.arch import uniform
    from archopt.optimizer.campaign import Campaign, CampaignError, EvalSettings
    archive = Archive(sqlite_url)
    try:
        common = dict(data_dir=str(data_dir), seq_len=16, importance="taylor", calibration_samples=2,
                      calibration_seq_len=16)
        first = Campaign(archive, str(model_dir), EvalSettings(metrics=("ppl_wikitext2",), seed=0, **common))
        arch = uniform(first.base.spec, 0.3)
        assert first.run([(arch, "uniform")]).evaluated == 1
        other = Campaign(archive, str(model_dir), EvalSettings(metrics=("ppl_wikitext2", "ppl_ptb"), seed=1,
                                                               **common))
        assert other.importance.calibration_label() != first.importance.calibration_label()
        with pytest.raises(CampaignError) as info:
            other.run([(arch, "uniform")])
        message = str(info.value)
        assert "\n" not in message and "calibrat" in message and "--name" in message
        assert first.importance.calibration_label() in message
        # the same calibration measures the missing metric
        same = Campaign(archive, str(model_dir), EvalSettings(metrics=("ppl_wikitext2", "ppl_ptb"), seed=0, **common))
        assert same.run([(arch, "uniform")]).evaluated == 1
    finally:
        archive.close()


@pytest.mark.slow
@pytest.mark.parametrize("device, dtype", [
    ("cpu", "bfloat16"),
    pytest.param("cuda", None, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_campaign_protocols_carry_the_run_precision(sqlite_url, model_dir, data_dir, env, device, dtype):
    """A bfloat16 run (CUDA's autocast, or --dtype bfloat16) is stored under bfloat16 protocols, which a
    rerun recognises (nothing measured twice), and a float32 run on CPU measures under its own."""
    import sqlalchemy as sa
    from archopt.archdb.arch import uniform
    from archopt.optimizer.campaign import Campaign, EvalSettings
    archive = Archive(sqlite_url)
    try:
        common = dict(metrics=("ppl_wikitext2",), data_dir=str(data_dir), seq_len=16, importance="l2")
        half = Campaign(archive, str(model_dir), EvalSettings(device=device, dtype=dtype, **common))
        archs = [(uniform(half.base.spec, r), "uniform") for r in (0.2, 0.5)]
        report = half.run(archs)
        assert report.evaluated == 2
        assert {m.protocol.precision for r in report.results for m in r.measurements} == {"bfloat16"}
        assert half.run(archs).skipped == 2
        full = Campaign(archive, str(model_dir), EvalSettings(device="cpu", **common))
        assert full.protocol_keys() != half.protocol_keys()
        assert full.run(archs).evaluated == 2
        with archive.read() as session:
            rows = session.execute(sa.text("SELECT p.precision, count(*) FROM evaluations e JOIN protocols p "
                                           "ON p.id = e.protocol_id GROUP BY p.precision")).all()
        assert dict(rows) == {"bfloat16": 2, "float32": 2}
    finally:
        archive.close()
