"""Ingest: JSONL, CSV and lm-eval files; one row per architecture; idempotence; export round trips;
bad inputs refused with one line naming file, line and field, leaving the archive unchanged; retraction."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from archopt.archdb import Archive, BaseSpec, FormatError, ingest_file, parse_architecture
from archopt.archdb import models as m
from archopt.archdb.formats import CSV_COLUMNS
from archopt.archdb.reads import model_rows
from archopt.archdb.store import spec_of

from conftest import MMLU, PTB, TINY_BASE, WIKI, Examples  # noqa: E402  (shared test data)


@pytest.fixture
def archive(archive_url):
    archive = Archive(archive_url)
    yield archive
    archive.close()


def counts(archive: Archive) -> dict[str, int]:
    with archive.read() as session:
        return {name: session.scalar(sa.select(sa.func.count()).select_from(model))
                for name, model in (("models", m.BaseModel), ("archs", m.Architecture),
                                    ("protocols", m.Protocol), ("evaluations", m.Evaluation))}


def export_text(url: str, run_cli, fmt: str = "jsonl") -> str:
    res = run_cli("--db", url, "export", "--format", fmt)
    assert res.code == 0, res.err
    return res.out


# --- good files -----------------------------------------------------------------------------------
def test_jsonl(archive, examples):
    report = ingest_file(archive, examples.jsonl("a.jsonl", examples.standard(6)))
    assert (report.models_added, report.archs_added, report.evaluations_added) == (1, 6, 11)
    assert (report.archs_existing, report.evaluations_existing) == (0, 0)
    assert counts(archive) == {"models": 1, "archs": 6, "protocols": 3, "evaluations": 11}
    with archive.read() as session:
        (row,) = model_rows(session)
        assert (row["name"], row["archs"], row["evaluations"], row["layers"]) == ("tiny", 6, 11, 4)
        base = session.scalar(sa.select(m.BaseModel))
        assert spec_of(base).total_params == row["params"]
        for arch in session.scalars(sa.select(m.Architecture)):
            parsed = parse_architecture(spec_of(base), json.loads(arch.encoding))
            assert parsed.canonical_json() == arch.encoding
            assert arch.arch_hash == parsed.arch_id("tiny") and arch.params == parsed.params
            assert arch.origin in ("random", "search")
        wiki = session.scalar(sa.select(m.Protocol).where(m.Protocol.dataset == "wikitext2"))
        assert (wiki.seq_len, wiki.tokens, wiki.joining, wiki.tokenizer_hash) == (128, 4096, "\n\n", "abc123")
        ev = session.scalar(sa.select(m.Evaluation).where(m.Evaluation.metric == "ppl_wikitext2")
                            .order_by(m.Evaluation.id))
        assert (ev.value, ev.device, ev.duration_s) == (10.0, "cpu", 1.5)
        assert ev.source.endswith("a.jsonl")


def test_csv(archive, examples):
    base = json.dumps(TINY_BASE)
    full_rows = "8/4/128,8/4/128,8/4/128,8/4/128"
    rows = [
        {"model": "tiny", "base_model": base},
        {"model": "tiny", "architecture": full_rows, "origin": "base", "metric": "ppl_wikitext2", "value": "12.5",
         "dataset": "wikitext2", "split": "test", "seq_len": "128", "tokens": "4096", "device": "cuda:0",
         "duration_s": "3.25", "protocol_extra": json.dumps({"stride": 128})},
        {"model": "tiny", "architecture": "full", "metric": "mmlu", "value": "0.31", "dataset": "mmlu",
         "shots": "5", "questions": "570"},
        {"model": "tiny", "architecture": json.dumps({"uniform": 0.5, "layers": "1-2"}), "metric": "ppl_ptb",
         "value": "40", "dataset": "ptb_text_only", "split": "validation", "seq_len": "128",
         "created_at": "2025-03-01T12:00:00+01:00"},
        {"model": "tiny", "architecture": "8/4/128,4/2/64,4/2/64,8/4/128", "metric": "ppl_wikitext2",
         "value": "30.5", "dataset": "wikitext2", "split": "test", "seq_len": "128", "tokens": "4096",
         "protocol_extra": json.dumps({"stride": 128})},
    ]
    path = examples.csv("a.csv", rows)
    report = ingest_file(archive, path)
    # rows 2-3 are one architecture (compact form and "full"), rows 4-5 another (ratios and sizes)
    assert (report.models_added, report.archs_added, report.evaluations_added) == (1, 2, 4)
    assert counts(archive)["protocols"] == 3  # rows 2 and 5 share their protocol
    with archive.read() as session:
        ev = session.scalar(sa.select(m.Evaluation).where(m.Evaluation.metric == "ppl_ptb"))
        assert ev.created_at.isoformat() == "2025-03-01T11:00:00"  # stored in UTC
        ev = session.scalar(sa.select(m.Evaluation).where(m.Evaluation.device == "cuda:0"))
        assert (ev.value, ev.duration_s, ev.protocol.extra, ev.protocol.seq_len) == (12.5, 3.25, {"stride": 128}, 128)
        mmlu = session.scalar(sa.select(m.Protocol).where(m.Protocol.dataset == "mmlu"))
        assert (mmlu.shots, mmlu.questions, mmlu.seq_len) == (5, 570, None)
    assert ingest_file(archive, path).evaluations_existing == 4


def test_byte_order_marks_are_accepted(archive, examples):
    """Excel saves CSV as UTF-8 with a BOM; some editors do the same to JSONL."""
    jsonl = examples.jsonl("bom.jsonl", examples.standard(2))
    jsonl.write_bytes(b"\xef\xbb\xbf" + jsonl.read_bytes())
    assert ingest_file(archive, jsonl).archs_added == 2
    csv_path = examples.csv("bom.csv", [{"model": "tiny", "architecture": "full", "metric": "ppl_ptb",
                                         "value": "3.5", "dataset": "ptb_text_only"}])
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    assert ingest_file(archive, csv_path).evaluations_added == 1


def _lmeval_values(archive: Archive, model: str) -> dict[str, float]:
    with archive.read() as session:
        q = (sa.select(m.Evaluation.metric, m.Evaluation.value).join(m.Architecture)
             .join(m.BaseModel).where(m.BaseModel.name == model, m.Evaluation.metric.contains("/")))
        return dict(session.execute(q).all())


def test_lmeval_results(archive, examples, run_cli):
    model_dir = examples.hf_model_dir("tiny-hf")
    path = examples.lmeval("results.json", str(model_dir))
    report = ingest_file(archive, path)
    assert (report.models_added, report.archs_added, report.evaluations_added) == (1, 1, 5)
    assert _lmeval_values(archive, "tiny-hf") == {  # stderrs, aliases and "N/A" are skipped
        "wikitext/word_perplexity": 31.5, "wikitext/byte_perplexity": 1.8, "wikitext/bits_per_byte": 0.85,
        "hellaswag/acc": 0.41, "hellaswag/acc_norm": 0.52}
    with archive.read() as session:
        base = session.scalar(sa.select(m.BaseModel).where(m.BaseModel.name == "tiny-hf"))
        assert base.location == str(model_dir.resolve()) and base.num_layers == 4
        (arch,) = session.scalars(sa.select(m.Architecture))
        assert arch.origin == "base" and arch.params == base.total_params
        proto = session.scalar(sa.select(m.Protocol).where(m.Protocol.dataset == "hellaswag"))
        assert (proto.tool, proto.tool_version, proto.shots) == ("lm-eval", "0.4.8", 0)
        assert proto.extra == {"task_version": 1.0, "filter": "none", "limit": None}
    # the same model named by its registered name (model_name, no model_args) lands on the same row
    again = examples.lmeval("again.json", None, results={"arc_easy": {"acc,none": 0.6}}, model_name="tiny-hf")
    assert ingest_file(archive, again).archs_existing == 1
    assert counts(archive)["archs"] == 1
    # and by a hub-style id that is registered as the location
    res = run_cli("--db", archive.url, "ingest", path)
    assert res.code == 0 and "0 evaluations added, 5 already there" in res.out


def test_lmeval_of_a_pruned_directory(archive, examples):
    ingest_file(archive, examples.jsonl("base.jsonl", [examples.base_line()]))
    layers = parse_architecture(
        BaseSpec(**TINY_BASE), {"uniform": 0.5}).layer_dicts()
    pruned = examples.folder / "pruned"
    pruned.mkdir()
    # the layout evaluators/saving.py writes
    (pruned / "archopt.json").write_text(json.dumps({
        "schema": "archopt.pruned/1", "base": {"name": "tiny", "location": None, "config_hash": "x"},
        "architecture": layers, "importance": {"criterion": "l2"}}))
    report = ingest_file(archive, examples.lmeval("pruned.json", str(pruned)))
    assert (report.models_added, report.archs_added, report.evaluations_added) == (0, 1, 5)
    with archive.read() as session:
        (arch,) = session.scalars(sa.select(m.Architecture))
        assert arch.importance == "l2" and json.loads(arch.encoding)[0] == [4, 2, 64]
    # a pruned directory of an unknown base model is refused
    (pruned / "archopt.json").write_text(json.dumps({"base": {"name": "ghost"}, "architecture": layers}))
    with pytest.raises(FormatError, match="base model 'ghost' .* is not in the archive"):
        ingest_file(archive, examples.lmeval("ghost.json", str(pruned)))


def test_lmeval_limit_needs_allow_limit(archive, examples, run_cli):
    model_dir = examples.hf_model_dir("tiny-hf")
    path = examples.lmeval("limited.json", str(model_dir), limit=100)
    res = run_cli("--db", archive.url, "ingest", path)
    assert res.code == 1 and len(res.err_lines) == 1
    assert f"{path}: field 'config.limit'" in res.err and "--allow-limit" in res.err
    assert counts(archive)["evaluations"] == 0
    res = run_cli("--db", archive.url, "ingest", "--allow-limit", path)
    assert res.code == 0, res.err
    # partial results get a protocol of their own: never mixed with full runs
    full = examples.lmeval("full.json", str(model_dir))
    assert ingest_file(archive, full).evaluations_added == 5
    with archive.read() as session:
        limits = {p.extra.get("limit") for p in session.scalars(sa.select(m.Protocol))}
    assert limits == {100, None}


def test_lmeval_nan_stderr_is_skipped_but_nan_value_refused(archive, examples):
    model_dir = examples.hf_model_dir("tiny-hf")
    path = examples.folder / "nan.json"
    doc = json.loads(examples.lmeval("tmp.json", str(model_dir)).read_text())
    doc["results"]["hellaswag"]["acc_stderr,none"] = float("nan")
    path.write_text(json.dumps(doc))  # json.dumps writes NaN, as lm-eval itself does
    assert ingest_file(archive, path).evaluations_added == 5
    doc["results"]["hellaswag"]["acc,none"] = float("nan")
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"field 'results.hellaswag.acc,none'.*finite"):
        ingest_file(archive, path)


def test_ratios_and_explicit_sizes_are_one_row(archive, examples):
    explicit = [[8, 4, 128], [4, 2, 64], [4, 2, 64], [8, 4, 128]]
    lines = [
        examples.base_line(),
        examples.arch_line({"attn": 0.5, "mlp": 0.5, "layers": "1-2"}, examples.evaluation("ppl_wikitext2", 20.0)),
        examples.arch_line(explicit, examples.evaluation("ppl_ptb", 30.0)),
        examples.arch_line("8/4/128,4/2/64,4/2/64,8/4/128", examples.evaluation("mmlu", 0.3)),
        examples.arch_line([{"layer": i, "kv_heads": r[1], "intermediate": r[2]} for i, r in enumerate(explicit)]),
        examples.arch_line({"uniform": 0.5, "layers": "1-2"}, examples.evaluation("ppl_wikitext2", 20.0)),
        examples.arch_line({"attn": [0.45, 0.5], "mlp": [0.5, 0.5], "layers": "1-2"}),  # rounds to the same
    ]
    arch_id = parse_architecture(BaseSpec(**TINY_BASE), explicit).arch_id("tiny")
    lines.append(examples.arch_line(explicit, arch_id=arch_id))
    report = ingest_file(archive, examples.jsonl("forms.jsonl", lines))
    assert report.archs_added == 1 and report.archs_existing == 0
    assert set(report.arch_ids) == {arch_id}
    assert (report.evaluations_added, report.evaluations_existing) == (3, 1)  # line 6 repeats line 2
    assert counts(archive)["archs"] == 1
    with archive.read() as session:
        assert session.scalar(sa.select(m.Architecture.arch_hash)) == arch_id


def test_reingest_adds_nothing_and_says_so(archive_url, examples, run_cli):
    path = examples.jsonl("a.jsonl", examples.standard(6))
    res = run_cli("--db", archive_url, "ingest", path)
    assert res.code == 0, res.err
    assert f"{path}: 11 evaluations added, 0 already there; 6 new architectures, 1 new base models" in res.out
    before = export_text(archive_url, run_cli)
    res = run_cli("--db", archive_url, "ingest", path, path)
    assert res.code == 0, res.err
    assert res.out.count(f"{path}: 0 evaluations added, 11 already there; 0 new architectures, 0 new base models") == 2
    assert export_text(archive_url, run_cli) == before
    # a file that overlaps: only the new rows are added
    more = examples.jsonl("b.jsonl", examples.standard(8))
    res = run_cli("--db", archive_url, "ingest", more)
    assert "4 evaluations added, 11 already there; 2 new architectures, 0 new base models" in res.out


# --- export -> ingest round trips -----------------------------------------------------------------
def rich_archive(url: str, examples: Examples, run_cli) -> None:
    """Two base models, every protocol field, a dropped layer, a retracted value, lm-eval values."""
    other = {**TINY_BASE, "family": "qwen2", "qkv_bias": True, "tie_embeddings": True, "num_layers": 3,
             "location": "/models/qwen-tiny", "revision": "abc123", "config_hash": "f" * 64}
    lines = examples.standard(5) + [
        {"model": "qwen-tiny", "base_model": other},
        {"model": "qwen-tiny", "architecture": [[8, 4, 128], None, [2, 1, 8]], "origin": "search",
         "importance": "taylor", "calibration": "c4 10x64", "evaluations": [
             examples.evaluation("ppl_wikitext2", 55.25, {**WIKI, "extra": {"note": "a,b \"quoted\"", "n": [1, 2]}},
                                 created_at="2025-01-02T03:04:05.123456+02:00", source="gpu-box:run7"),
             examples.evaluation("mmlu:stem", 0.125, MMLU, retracted_at="2025-02-01T00:00:00",
                                 retract_reason="wrong split"),
             examples.evaluation("kl_dense", 0.0, {"dataset": "wikitext2", "tokens": 2048, "tool": ""})]},
        examples.arch_line("full", model="qwen-tiny", origin="base"),  # no evaluations
    ]
    assert run_cli("--db", url, "ingest", examples.jsonl("rich.jsonl", lines)).code == 0
    model_dir = examples.hf_model_dir("tiny-hf")
    assert run_cli("--db", url, "ingest", examples.lmeval("lm.json", str(model_dir))).code == 0


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_then_ingest_gives_the_same_export(archive_url, fmt, examples, run_cli, tmp_path):
    rich_archive(archive_url, examples, run_cli)
    first = export_text(archive_url, run_cli, fmt)
    first_jsonl = export_text(archive_url, run_cli, "jsonl")
    if fmt == "csv":
        assert first.splitlines()[0].split(",") == list(CSV_COLUMNS)
    assert "retracted_at" in first and "wrong split" in first
    path = tmp_path / f"export.{fmt}"
    path.write_text(first, encoding="utf-8")
    copy = f"sqlite:///{tmp_path / 'copy.db'}"  # into an empty archive (SQLite: also across backends)
    res = run_cli("--db", copy, "ingest", path)
    assert res.code == 0, res.err
    assert export_text(copy, run_cli, fmt) == first
    # and the same records whichever format carried them (CSV writes protocol extras with sorted keys)
    assert [json.loads(x) for x in export_text(copy, run_cli, "jsonl").splitlines()] == \
        [json.loads(x) for x in first_jsonl.splitlines()]
    res = run_cli("--db", copy, "ingest", path)  # and the export is idempotent too
    assert " 0 evaluations added" in res.out


def test_export_of_one_model_and_to_a_file(archive_url, examples, run_cli, tmp_path):
    rich_archive(archive_url, examples, run_cli)
    out = tmp_path / "q.jsonl"
    res = run_cli("--db", archive_url, "export", "--model", "qwen-tiny", "-o", out)
    assert res.code == 0 and res.out == ""
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {x["model"] for x in lines} == {"qwen-tiny"} and len(lines) == 3
    assert lines[0]["base_model"]["location"] == "/models/qwen-tiny"
    assert not list(tmp_path.glob("*.tmp"))
    res = run_cli("--db", archive_url, "export", "--model", "qwen-tiy")
    assert res.code == 1 and "did you mean 'qwen-tiny'" in res.err


# --- bad inputs -----------------------------------------------------------------------------------
E = Examples.evaluation
NEW_BASE = {"model": "newbase", "base_model": {**TINY_BASE, "num_layers": 2}}
NEW_ARCH = {"model": "newbase", "architecture": [[8, 4, 128], [2, 1, 8]],
            "evaluations": [E("ppl_wikitext2", 12.0)]}
FULL = [[8, 4, 128]] * 4


def _eval_line(value_json: str, metric: str = "ppl_wikitext2") -> str:
    return ('{"model": "tiny", "architecture": "full", "evaluations": [{"metric": "%s", "value": %s, '
            '"protocol": {"dataset": "wikitext2"}}]}' % (metric, value_json))


def _line(**kw):
    return json.dumps({"model": "tiny", "architecture": FULL, **kw})


# (id, lines after two good lines that would add a base model and an architecture, line, field, message)
BAD_JSONL = [
    ("malformed-json-in-the-middle", ['{"model": "tiny", "architecture": [', json.dumps(NEW_ARCH)], 3, None,
     "invalid JSON"),
    ("nan", [_eval_line("NaN")], 3, "evaluations[0].value", "finite"),
    ("infinity", [_eval_line("-Infinity")], 3, "evaluations[0].value", "finite"),
    ("overflow", [_eval_line("1e400")], 3, "evaluations[0].value", "finite"),
    ("negative", [_eval_line("-0.5")], 3, "evaluations[0].value", "must not be negative"),
    ("mmlu-above-one", [_eval_line("1.2", "mmlu")], 3, "evaluations[0].value", "accuracy in [0, 1]"),
    ("string-value", [_eval_line('"12"')], 3, "evaluations[0].value", "must be a number"),
    ("more-heads-than-base", [_line(architecture=[[10, 5, 128]] + FULL[1:])], 3, "architecture",
     "kv_heads=5 outside 1..4"),
    ("more-channels-than-base", [_line(architecture=[[8, 4, 136]] + FULL[1:])], 3, "architecture",
     "intermediate=136 outside"),
    ("q-not-whole-kv-group", [_line(architecture=[[3, 2, 128]] + FULL[1:])], 3, "architecture",
     "whole KV groups"),
    ("wrong-layer-count", [_line(architecture=FULL[:3])], 3, "architecture", "3 layers but the base model has 4"),
    ("ratio-out-of-range", [_line(architecture={"uniform": 1.5})], 3, "architecture", "ratio must lie in [0, 1)"),
    ("unknown-base-model", [json.dumps({"model": "ghost", "architecture": "full"})], 3, "model",
     "unknown base model 'ghost' and no base_model description"),
    ("conflicting-shape-with-archive", [json.dumps({"model": "tiny", "base_model": {**TINY_BASE, "hidden_size": 32}})],
     3, "base_model", "registered with another shape"),
    ("conflicting-shape-in-file", [json.dumps({"model": "newbase", "base_model": {**TINY_BASE, "num_layers": 3}})],
     3, "base_model", "registered with another shape"),
    ("incomplete-base-model", [json.dumps({"model": "nb2", "base_model": {"family": "llama", "num_layers": 2}})],
     3, "base_model", "lacks"),
    ("unknown-field", [_line(colour="red")], 3, "colour", "unknown field"),
    ("unknown-evaluation-field", [_line(evaluations=[{**E("ppl_ptb", 3.0), "unit": "nats"}])], 3,
     "evaluations[0].unit", "unknown field"),
    ("unknown-protocol-field", [_line(evaluations=[E("ppl_ptb", 3.0, {**PTB, "window": 3})])], 3,
     "evaluations[0].protocol", "unknown protocol field 'window'"),
    ("protocol-without-dataset", [_line(evaluations=[E("ppl_ptb", 3.0, {"split": "test"})])], 3,
     "evaluations[0].protocol", "lacks 'dataset'"),
    ("duplicate-keys", ['{"model": "tiny", "architecture": "full", "model": "other"}'], 3, None,
     "duplicate key 'model'"),
    ("arch-id-mismatch", [_line(arch_id="0" * 64)], 3, "arch_id", "does not match"),
    ("bad-origin", [_line(origin="magic")], 3, "origin", "must be one of"),
    ("missing-value", [_line(evaluations=[{"metric": "ppl_ptb", "protocol": PTB}])], 3, "evaluations[0].value",
     "is missing"),
    ("metric-with-space", [_line(evaluations=[E("ppl ptb", 3.0, PTB)])], 3, "evaluations[0].metric", "spaces"),
    ("not-an-object", ["[1, 2, 3]"], 3, "(line)", "must be a JSON object"),
    ("bad-time", [_line(evaluations=[E("ppl_ptb", 3.0, created_at="yesterday")])], 3,
     "evaluations[0].created_at", "ISO time"),
    ("late-bad-line", [json.dumps(NEW_ARCH)] * 3 + [_eval_line("NaN")], 6, "evaluations[0].value", "finite"),
]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def populated(request, tmp_path_factory):
    """One archive per backend holding a good file; every bad-input test checks it stays unchanged."""
    folder = tmp_path_factory.mktemp("populated")
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'archive.db'}"
    else:
        url = request.getfixturevalue("pg_server").new_database("bad")
    examples = Examples(folder)
    archive = Archive(url)
    ingest_file(archive, examples.jsonl("good.jsonl", examples.standard(4)))
    archive.close()
    from conftest import _run_cli
    snapshot = export_text(url, _run_cli)
    yield url, folder, snapshot
    if request.param != "sqlite":
        with contextlib.suppress(Exception):
            request.getfixturevalue("pg_server").drop_database(url)


def _assert_refused(populated, run_cli, path: Path, line: int | None, field: str | None, message: str,
                    *options: str) -> None:
    url, _, before = populated
    res = run_cli("--db", url, "ingest", *options, path)
    assert res.code != 0
    assert len(res.err_lines) == 1, res.err
    (err,) = res.err_lines
    assert "Traceback" not in res.err and res.out == ""
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert err.startswith(f"error: {where}"), err
    if field is not None:
        assert f"field {field!r}" in err, err
    assert message in err, err
    assert export_text(url, run_cli) == before  # nothing of the file was stored


@pytest.mark.parametrize("case", BAD_JSONL, ids=[c[0] for c in BAD_JSONL])
def test_bad_jsonl_is_refused_whole(populated, case, run_cli):
    folder = populated[1]
    name, tail, line, field, message = case
    path = Examples(folder).jsonl(f"bad-{name}-{uuid.uuid4().hex[:6]}.jsonl", [NEW_BASE, NEW_ARCH, *tail])
    _assert_refused(populated, run_cli, path, line, field, message)


CSV_BASE = {"model": "newbase", "base_model": json.dumps(NEW_BASE["base_model"])}
CSV_ROW = {"model": "newbase", "architecture": "8/4/128,2/1/8", "metric": "ppl_wikitext2", "value": "12",
           "dataset": "wikitext2"}
BAD_CSV = [
    ("unknown-column", [{**CSV_ROW, "colour": "red"}], 1, "colour", "unknown column"),
    ("text-value", [CSV_ROW, {**CSV_ROW, "value": "abc"}], 4, "value", "must be a number"),
    ("nan-value", [CSV_ROW, {**CSV_ROW, "value": "nan"}], 4, "evaluations[0].value", "finite"),
    ("negative-value", [{**CSV_ROW, "value": "-3"}], 3, "evaluations[0].value", "must not be negative"),
    ("mmlu-above-one", [{**CSV_ROW, "metric": "mmlu", "value": "7"}], 3, "evaluations[0].value", "[0, 1]"),
    ("bad-integer", [{**CSV_ROW, "seq_len": "12.5"}], 3, "seq_len", "must be an integer"),
    ("wrong-layers", [{**CSV_ROW, "architecture": "8/4/128"}], 3, "architecture", "1 layers"),
    ("unknown-model", [{**CSV_ROW, "model": "ghost"}], 3, "model", "unknown base model"),
    ("bad-base-json", [{**CSV_BASE, "base_model": "{\"family\": "}], 3, "base_model", "invalid JSON"),
]


@pytest.mark.parametrize("case", BAD_CSV, ids=[c[0] for c in BAD_CSV])
def test_bad_csv_is_refused_whole(populated, case, run_cli):
    folder = populated[1]
    name, rows, line, field, message = case
    path = Examples(folder).csv(f"bad-{name}-{uuid.uuid4().hex[:6]}.csv", [CSV_BASE, *rows])
    _assert_refused(populated, run_cli, path, line, field, message)


def test_bad_lmeval_is_refused(populated, run_cli):
    folder = populated[1]
    examples = Examples(folder)
    model_dir = examples.hf_model_dir(f"hf-{uuid.uuid4().hex[:6]}")
    _assert_refused(populated, run_cli, examples.lmeval("limit.json", str(model_dir), limit=0.1), None, "config.limit",
                    "--allow-limit")
    _assert_refused(populated, run_cli, examples.lmeval("nomodel.json", None), None, "config.model_args", "no pretrained")
    _assert_refused(populated, run_cli, examples.lmeval("unknown.json", "/no/such/model"), None, "model_args",
                    "unknown base model")
    bad = examples.lmeval("neg.json", str(model_dir), results={"wikitext": {"word_perplexity,none": -2.0}})
    _assert_refused(populated, run_cli, bad, None, "results.wikitext.word_perplexity,none", "must not be negative")
    path = folder / "broken.json"
    path.write_text('{"results": {"wikitext": ')
    _assert_refused(populated, run_cli, path, None, None, "invalid JSON")


def test_other_file_problems(populated, run_cli):
    folder = populated[1]
    _assert_refused(populated, run_cli, folder / "missing.jsonl", None, None, "cannot read")
    empty = folder / "empty.jsonl"
    empty.write_text("\n\n")
    _assert_refused(populated, run_cli, empty, None, None, "holds no records")
    latin = folder / "latin1.jsonl"
    latin.write_bytes(json.dumps(NEW_BASE).encode() + b"\n" + '{"model": "t\xe9"}\n'.encode("latin-1"))
    _assert_refused(populated, run_cli, latin, 2, None, "not valid UTF-8")
    deep = folder / "deep.jsonl"
    deep.write_text(json.dumps(NEW_BASE) + "\n" + "[" * 5000 + "]" * 5000 + "\n")
    _assert_refused(populated, run_cli, deep, 2, None, "nested deeper")


def test_files_before_a_bad_one_are_kept(archive_url, examples, run_cli):
    """Each file is its own transaction: a bad second file keeps the first, and the error names the second."""
    good = examples.jsonl("good.jsonl", examples.standard(2))
    bad = examples.jsonl("bad.jsonl", [NEW_BASE, _eval_line("NaN")])
    res = run_cli("--db", archive_url, "ingest", good, bad)
    assert res.code == 1 and res.err_lines[0].startswith(f"error: {bad}:2: ")
    archive = Archive(archive_url)
    try:
        assert counts(archive)["archs"] == 2 and counts(archive)["models"] == 1
    finally:
        archive.close()


# --- retraction -----------------------------------------------------------------------------------
def test_retract_hides_but_never_deletes(archive_url, examples, run_cli):
    path = examples.jsonl("a.jsonl", examples.standard(4))
    assert run_cli("--db", archive_url, "ingest", path).code == 0
    listing = json.loads(run_cli("--db", archive_url, "archs", "--model", "tiny", "--json").out)
    target = next(a for a in listing["archs"] if "mmlu" in a["metrics"])
    shown = json.loads(run_cli("--db", archive_url, "show", target["arch_id"][:10], "--json").out)
    (mmlu,) = [v for v in shown["all_values"] if v["metric"] == "mmlu"]
    models_before = json.loads(run_cli("--db", archive_url, "models", "--json").out)["models"][0]

    res = run_cli("--db", archive_url, "evaluations", "retract", mmlu["evaluation"], "--why", "wrong tokenizer")
    assert res.code == 0 and "retracted 1" in res.out

    listing = json.loads(run_cli("--db", archive_url, "archs", "--model", "tiny", "--json").out)
    after = next(a for a in listing["archs"] if a["arch_id"] == target["arch_id"])
    assert "mmlu" not in after["metrics"] and set(after["metrics"]) == set(target["metrics"]) - {"mmlu"}
    shown = json.loads(run_cli("--db", archive_url, "show", target["arch_id"], "--json").out)
    assert "mmlu" not in {v["metric"] for v in shown["all_values"]}
    models_after = json.loads(run_cli("--db", archive_url, "models", "--json").out)["models"][0]
    assert models_after["evaluations"] == models_before["evaluations"] - 1

    exported = [json.loads(x) for x in export_text(archive_url, run_cli).splitlines()]
    rec = next(r for r in exported if r.get("arch_id") == target["arch_id"])
    (kept,) = [e for e in rec["evaluations"] if e["metric"] == "mmlu"]
    assert kept["value"] == target["metrics"]["mmlu"]["value"]
    assert kept["retract_reason"] == "wrong tokenizer" and kept["retracted_at"]

    archive = Archive(archive_url)
    try:
        total = counts(archive)["evaluations"]
        ingest_file(archive, path)  # re-ingesting the original file does not bring it back
        assert counts(archive)["evaluations"] == total
        with archive.read() as session:
            row = session.get(m.Evaluation, mmlu["evaluation"])
            assert row is not None and row.retracted_at is not None and row.retract_reason == "wrong tokenizer"
    finally:
        archive.close()
    # retracting again keeps the first reason; unknown ids and a missing reason are one-line errors
    assert run_cli("--db", archive_url, "evaluations", "retract", mmlu["evaluation"], "--why", "again").code == 0
    assert "wrong tokenizer" in export_text(archive_url, run_cli)
    res = run_cli("--db", archive_url, "evaluations", "retract", "999999", "--why", "x")
    assert res.code == 1 and res.err_lines == ["error: no evaluation with id 999999"]
    res = run_cli("--db", archive_url, "evaluations", "retract", "1")
    assert res.code != 0 and "--why" in res.err and "Traceback" not in res.err


def test_retract_is_all_or_nothing(sqlite_url, examples, run_cli):
    assert run_cli("--db", sqlite_url, "ingest", examples.jsonl("a.jsonl", examples.standard(2))).code == 0
    res = run_cli("--db", sqlite_url, "evaluations", "retract", "1", "424242", "--why", "x")
    assert res.code == 1
    assert "retracted_at" not in export_text(sqlite_url, run_cli)
