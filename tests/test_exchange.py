"""Channel exchange (``optimizer.exchange``, ``archopt query --refine``): size-neutral moves of MLP
channels between layers around the best measured architecture, priced on a cheap fidelity and
verified in full."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from archopt.archdb.arch import DROPPED, Architecture, LayerSpec
from archopt.optimizer.encoding import encode
from archopt.optimizer.exchange import exchange, exchanges, first_delta, incumbent, single_moves
from archopt.optimizer.loop import verify_loop
from archopt.optimizer.query import QueryRequest, run_query

from helpers.archives import PPL, SPEC, fill, record_ppl

CHEAP = dataclasses.replace(PPL, tokens=1024)


def _arch(widths, kv=2, dropped=()) -> Architecture:
    layers = [DROPPED if i in dropped else LayerSpec(kv * SPEC.group_size, kv, w, False) for i, w in enumerate(widths)]
    return Architecture(SPEC, tuple(layers))


def test_single_moves_stay_within_widths_and_skip_dropped_layers():
    widths = [256, 8, 128] + [128] * 9
    moves = single_moves(_arch(widths, dropped=(3,)), 16)
    got = {(layer, sign) for layer, sign, _ in moves}
    assert (0, 1) not in got and (0, -1) in got          # full width: only narrower
    assert (1, -1) not in got and (1, 1) in got          # at the channel multiple: only wider
    assert not any(layer == 3 for layer, _, _ in moves)  # dropped
    assert len(moves) == 2 * 10 + 2 - 2
    base = _arch(widths, dropped=(3,))
    for layer, sign, a in moves:
        assert a.layers[layer].intermediate == base.layers[layer].intermediate + sign * 16
        assert sum(x != y for x, y in zip(a.layers, base.layers)) == 1


def test_exchanges_keep_the_size_and_move_from_cheap_to_valuable_layers():
    arch = _arch([128] * 12)
    down = {i: 0.01 * (i + 1) for i in range(12)}        # layer 0 is cheapest to narrow
    up = {i: 0.01 * (12 - i) + (0.2 if i == 11 else 0.0) for i in range(12)}   # layer 11 gains most
    found = exchanges(arch, down, up, 16)
    assert found and all(a.params == arch.params for _, _, a in found)
    m, gain, first = found[0]
    assert m == 1 and gain == pytest.approx(up[11] - down[0])
    assert first.layers[0].intermediate == 112 and first.layers[11].intermediate == 144
    # a giver never also takes; no exchange without a positive predicted gain
    for m, _, a in found:
        widths = [l.intermediate for l in a.layers]
        assert widths.count(112) == m and widths.count(144) == m
    assert exchanges(arch, {i: 1.0 for i in range(12)}, {i: 0.1 for i in range(12)}, 16) == []


def _truth_log_ppl(archs) -> np.ndarray:
    """A known truth: each layer's MLP channels are worth a different amount (layer i weighs
    ``0.2 + i``), with diminishing returns; attention costs a constant per missing group."""
    batch = encode(archs, SPEC)
    frac = batch.inter / SPEC.intermediate_size
    weight = 0.2 + np.arange(SPEC.num_layers)
    mlp = (weight[None, :] * (1 - frac) ** 2).sum(axis=1) * 0.05
    attn = (SPEC.num_kv_heads - batch.kv).sum(axis=1) * 0.02
    return 2.0 + mlp + attn


def test_exchange_steps_improve_the_incumbent_and_verify_only_what_screens_better(archive):
    fill(archive, 30)
    start = _arch([128] * 12)   # equal widths: wrong for a truth whose later layers are worth more
    record_ppl(archive, [start], np.exp(_truth_log_ppl([start])))
    target = start.params
    doc = run_query(archive, QueryRequest(model="synth", params=target, tolerance=0.02, candidates=500))
    assert incumbent(archive, doc, "ppl_wikitext2")[0] == start
    cheap_calls: list[int] = []
    verified: list[Architecture] = []

    def measure_cheap(archs, picks, doc):
        assert all(p["origin"] == "exchange" for p in picks)
        cheap_calls.append(len(archs))
        values = np.exp(_truth_log_ppl(archs) + 0.001)   # a biased, monotone cheap fidelity
        record_ppl(archive, archs, values, CHEAP, "screen")
        return list(values)

    def measure(archs, picks, doc):
        assert all(a.params == start.params for a in archs)
        verified.extend(archs)
        record_ppl(archive, archs, np.exp(_truth_log_ppl(archs)))

    steps = exchange(archive, doc, steps=4, measure=measure, measure_cheap=measure_cheap)
    assert len(steps) == 4 and steps[0].delta == first_delta(SPEC) == 16
    # the incumbent and 24 single moves; then the exchanges of 1-6 layer pairs (12 layers hold no 8 pairs)
    assert cheap_calls[:2] == [25, 5] and steps[0].screened == 30
    assert all(s.accepted for s in steps) and len(verified) == 4
    values = [s.value for s in steps]
    assert values == sorted(values, reverse=True)
    best = verified[-1]
    assert _truth_log_ppl([best])[0] < _truth_log_ppl([start])[0] - 0.01
    widths = [l.intermediate for l in best.layers]
    assert widths[-1] > 128 > widths[0]             # channels went from layer 0 to the last layers
    assert incumbent(archive, doc, "ppl_wikitext2")[0] == best


def test_exchange_halves_its_step_when_the_full_value_refuses_and_stops_below_the_multiple(archive):
    fill(archive, 20)
    start = _arch([128] * 12)
    record_ppl(archive, [start], [10.0])   # nothing the full protocol measures is better than this
    doc = run_query(archive, QueryRequest(model="synth", params=start.params, tolerance=0.02, candidates=300))

    def measure_cheap(archs, picks, doc):
        return list(np.exp(_truth_log_ppl(archs)))

    def measure(archs, picks, doc):
        record_ppl(archive, archs, [11.0] * len(archs))

    steps = exchange(archive, doc, steps=10, measure=measure, measure_cheap=measure_cheap)
    assert [s.delta for s in steps] == [16, 8]    # 16 -> 8 -> 4 (below the multiple of 8: stop)
    assert not any(s.accepted for s in steps) and all(s.verified for s in steps)


def test_verify_loop_refines_after_its_rounds(archive):
    fill(archive, 30)
    target = int(0.75 * SPEC.total_params)
    calls: list[str] = []
    steps = []

    def measure(archs, picks, doc):
        calls.extend(p.get("origin", "search") for p in picks)
        record_ppl(archive, archs, np.exp(_truth_log_ppl(archs)))

    def measure_cheap(archs, picks, doc):
        return list(np.exp(_truth_log_ppl(archs)))

    report = verify_loop(archive, QueryRequest(model="synth", params=target, candidates=500), verify=2, rounds=2,
                         measure=measure, measure_cheap=measure_cheap, refine=2, on_exchange=steps.append)
    assert len(report.rounds) == 2 and len(report.exchange) == 2 == len(steps)
    assert calls[-1] == "exchange" and "exchange" not in calls[:4]
    assert report.to_dict()["exchange"][0]["step"] == 1
    with pytest.raises(ValueError):
        verify_loop(archive, QueryRequest(model="synth", params=target), verify=1, rounds=1, measure=measure,
                    refine=1)


@pytest.mark.slow
def test_query_refine_cli_on_tiny_model(run_cli, sqlite_url, tmp_path, monkeypatch):
    from helpers.cli_runs import fidelity_pairs, sampled_tiny_archive
    data_dir = sampled_tiny_archive(run_cli, sqlite_url, tmp_path, monkeypatch)
    r = run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "80%", "--tolerance", "5%",
                "--verify", "1", "--refine", "2", "--data-dir", str(data_dir), "--seq-len", "16",
                "--device", "cpu", "--metrics", "ppl_wikitext2", "--seed", "1", "--no-starts")
    assert r.code == 0, r.err
    # 48 MLP channels: the first step moves 8 (the channel multiple), the next would move 4 and stops
    assert "exchange step 1: 8 channels per layer" in r.err and "1 rounds" in r.out and "exchange steps" in r.out
    tokens, _, cheap = fidelity_pairs(sqlite_url)
    assert tokens == 512                                   # the full protocol stays the default
    assert cheap and cheap[0][1] >= 4, r.err               # the exchange's cheap values are stored
    r = run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "80%", "--refine", "2")
    assert r.code != 0 and "--refine goes with --verify" in r.err


def test_verified_exchange_rows_print_without_predictions():
    """An exchange step's rows carry no prediction: the verified table shows ``-`` for it."""
    from rich.console import Console

    from archopt.commands.output import print_verified

    class State:
        out = Console(record=True, width=120)

    arch = _arch([128] * 12)
    rows = [{"arch_id": arch.arch_id("synth"), "rank": None}]
    print_verified(State, {"objectives": ["ppl_wikitext2"], "results": rows},
                   [{"arch_id": rows[0]["arch_id"], "predicted": {}, "measured": {"ppl_wikitext2": 12.5}}])
    text = State.out.export_text()
    assert "12.5" in text and " - " in text
