"""Issue 17, readable output: the sketch legend once, rows that look alike say where they differ (or
are merged), distinct tick labels in the terminal scatter, ``--explain`` as a summary, and
``--verify K`` saying why it measures fewer than K."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

from rich.console import Console

from archopt.archdb import Archive
from archopt.optimizer.readable import SKETCH_LEGEND, annotate_lookalikes, group_note, lookalike_groups
from archopt.optimizer.verify import shortfall

from archopt.commands.output import print_query, scatter

from helpers.archives import fill


def layers(*mlp: int, kv: int = 3) -> list[dict]:
    return [{"layer": i, "q_heads": 2 * kv, "kv_heads": kv, "intermediate": w, "dropped": False}
            for i, w in enumerate(mlp)]


def row(rank: int, mlp: tuple[int, ...], pred: float, params: int = 1000, measured: float | None = None) -> dict:
    return {"rank": rank, "arch_id": f"{rank:064x}", "params": params, "fraction": 0.8,
            "predicted": {"ppl_wikitext2": pred}, "uncertainty": {"ppl_wikitext2": 1.5},
            "measured": {"ppl_wikitext2": measured}, "sketch": "A:FF M:55", "layers": layers(*mlp)}


def test_lookalike_rows_say_where_they_differ_and_identical_ones_merge():
    results = annotate_lookalikes([row(1, (344, 352), 10.0), row(2, (352, 344), 10.0), row(3, (360, 344), 10.2)])
    assert results[0]["same_sketch_as"] is None and results[0]["sketch_note"] is None
    assert results[1]["same_sketch_as"] == 1
    assert results[1]["sketch_note"] == "same sketch as #1; differs at L0 MLP 352 (#1: 344), L1 MLP 344 (#1: 352)"
    groups = lookalike_groups(results, ["ppl_wikitext2"])
    assert [[r["rank"] for r in g] for g in groups] == [[1, 2], [3]]   # #3's prediction differs: its own row
    assert group_note(groups[0]) == ("2 architectures alike here, differing only in the MLP widths of layers 0, 1 "
                                     "(by up to 8 channels)")


def capture() -> tuple[SimpleNamespace, io.StringIO]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, color_system=None)
    return SimpleNamespace(out=console, err=console), buffer


def doc_of(results: list[dict], **extra) -> dict:
    return {"model": "m", "target_params": 1000, "window": [980, 1000], "objectives": ["ppl_wikitext2"],
            "results": annotate_lookalikes(results), "predictor_versions": {"ppl_wikitext2": 1},
            "query_id": 1, "elapsed_ms": 5.0, **extra}


def test_table_merges_identical_rows_notes_lookalikes_and_prints_the_legend_once():
    state, buffer = capture()
    print_query(state, doc_of([row(1, (344, 352), 10.0), row(2, (352, 344), 10.0), row(3, (360, 344), 10.2)],
                              warnings=["ppl_wikitext2: weak predictor (...)"]))
    text = buffer.getvalue()
    assert "│ 1,2 " in text and "2 architectures alike here, differing only in the MLP widths of layers 0, 1" in text
    assert "same sketch as #1; differs at L0 MLP 360 (#1: 344), L1 MLP 344 (#1: 352)" in text
    assert text.count(SKETCH_LEGEND) == 1 and "F all" in SKETCH_LEGEND and "x = layer dropped" in SKETCH_LEGEND
    assert "warning: ppl_wikitext2: weak predictor (...)" in text


def axis_labels(plot: str) -> tuple[list[str], list[str]]:
    lines = plot.splitlines()
    y = [line.split("┤")[0].strip() for line in lines if "┤" in line]
    x = lines[lines.index(next(line for line in lines if "└" in line)) + 1].split()
    return x, y


def test_scatter_tick_labels_are_distinct_and_the_base_is_a_line():
    points = [(6_217_984, 221.13, "o"), (6_254_848, 221.14, "o"), (6_260_992, 221.15, "o")]
    x, y = axis_labels(scatter(points))
    assert len(set(x)) == 3 and len(set(y)) == 2, (x, y)      # was "6.2M 6.3M" / "221.1 221.1"
    plot = scatter(points, reference=(217.4, "base model measured 217.4"))
    assert "-" * 60 in plot and plot.rstrip().endswith("--- base model measured 217.4")
    x, y = axis_labels(plot)
    assert y[-1] == "217.4"


def test_explain_is_a_short_summary_and_the_json_keeps_it(sqlite_url, run_cli):
    archive = Archive(sqlite_url)
    fill(archive, 40)
    archive.close()
    r = run_cli("--db", sqlite_url, "query", "--model", "synth", "--params", "80%", "--top", "3", "--explain")
    assert r.code == 0, r.err
    tail = r.out[r.out.index("search space:"):]
    assert "{" not in tail and len(tail.splitlines()) <= 8
    assert "refinement by feature importance of ppl_wikitext2" in tail and "most important: L" in tail
    r = run_cli("--db", sqlite_url, "query", "--model", "synth", "--params", "80%", "--top", "3", "--explain",
                "--json")
    assert json.loads(r.out)["explain"]["refinement"]["dims"]


def test_verify_says_when_and_why_it_measures_fewer():
    doc = doc_of([row(1, (344, 352), 10.0, measured=10.4)])
    assert shortfall(doc, 2) == ("--verify 2 measures 0 architectures: the answer holds only 1 architecture (the "
                                 "Pareto front at this size; a wider --tolerance, or --rounds 2, which fills each "
                                 "round with the next best, gives more); 1 of it (#1) measured in the archive "
                                 "already under the predictors' protocols")
    doc = doc_of([row(1, (344, 352), 10.0), row(2, (352, 344), 10.1, measured=9.0), row(3, (360, 344), 10.2)])
    assert shortfall(doc, 2).startswith("--verify 2 measures 1 architecture: 1 of them (#2) measured")
    assert shortfall(doc, 1) is None
