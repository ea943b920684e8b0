"""The issue's first-row flow end to end on a checkpoint shaped like the held-back model (SmolLM-135M:
30 layers, 9 query / 3 KV heads, head_dim set, tied embeddings, bfloat16 weights), scaled down:
``archopt evaluate --samples 24 --uniform 0.1,...,0.35``, then ``archopt query --params 80% --verify 8``."""

from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import select

import tiny_models as tm
from archopt.archdb import Archive
from archopt.archdb import models as m
from archopt.archdb.arch import BaseSpec
from archopt.optimizer.profile import profile_variants

TOKENS = 512
COMMON = ("--metrics", "ppl_wikitext2", "--seq-len", "16", "--max-tokens", str(TOKENS), "--device", "cpu")


@pytest.mark.slow
def test_first_row_flow_on_a_smollm_shaped_model(run_cli, sqlite_url, tmp_path, env):
    model_dir = tm.save_tiny("llama_smol_shape", tmp_path / "smol-shape", dtype=torch.bfloat16)
    data_dir = tm.write_local_data(tmp_path / "data")
    spec = BaseSpec.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (30, 9, 3, 8)
    r = run_cli("--db", sqlite_url, "evaluate", "--model", str(model_dir), "--data-dir", str(data_dir), *COMMON,
                "--samples", "24", "--uniform", "0.1,0.15,0.2,0.25,0.3,0.35")
    assert r.code == 0, r.err
    r = run_cli("--db", sqlite_url, "query", "--model", "smol-shape", "--params", "80%", "--verify", "8",
                "--weights", str(model_dir), "--data-dir", str(data_dir), *COMMON, "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    first = doc["rounds"]["rounds"][0]
    assert len(doc["verified"]) == 8
    # the sensitivity profile's solution leads; the rules of thumb and allocations ranked best follow
    assert first["start_names"][first["starts"][0]] == "profile-1" and len(first["starts"]) == 6
    lo, hi = doc["window"]
    measured = [v["measured"]["ppl_wikitext2"] for v in doc["verified"]]
    assert all(x is not None and x == x for x in measured)
    # every single-layer variant once, on one 16-token window (K/2 = 4 evaluations' worth is less)
    archive = Archive(sqlite_url)
    try:
        with archive.read() as session:
            profiled = len(session.scalars(select(m.Architecture.id).where(m.Architecture.origin == "profile")).all())
            sizes = session.scalars(select(m.Architecture.params).where(
                m.Architecture.arch_hash.in_([v["arch_id"] for v in doc["verified"]]))).all()
    finally:
        archive.close()
    assert profiled == len(profile_variants(spec)) == 30 * 7
    assert len(sizes) == 8 and all(lo <= p <= hi for p in sizes)
    # within 1.3x the flow's tokens without the profile (31 evaluations, then 8 verified)
    spent = doc["verification"]["forwarded_tokens"]
    assert spent == 8 * TOKENS + 16 * (profiled + 1)
    assert 31 * TOKENS + spent <= 1.3 * (31 + 8) * TOKENS
    # the answer stands against the best rule of thumb measured: never worse
    standing = doc["verification"]["standing"]
    assert standing["best_rule"]["origin"] in ("uniform", "rule") and standing["ratio"] <= 1.0
