"""``archopt query``: the Pareto front for a size target, verified for real on request."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import click

from archopt.cli import EvalOptions, State, UserError, bundled_options, eval_options, pass_state, server_options

from .output import print_json, print_query, print_verified, progress_runner


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    """``--verify K`` and what goes with it: rounds, exploration, screening, queueing, weights."""

    verify: int
    to_queue: bool
    rounds: int
    explore: float
    screen: int
    screen_tokens: int | None
    weights: str | None
    starts: bool
    refine: int = 0

    def check(self, server: str | None) -> None:
        """Refuse combinations that cannot run, before any work starts."""
        if self.to_queue and (not self.verify or self.rounds > 1 or server):
            raise UserError("--queue goes with --verify K (one round, without --server)")
        if self.screen_tokens and not self.screen:
            raise UserError("--screen-tokens goes with --screen N")
        if self.screen and not self.verify:
            raise UserError("--screen goes with --verify K (and --rounds R)")
        if self.refine and (not self.verify or server):
            raise UserError("--refine goes with --verify K (and runs on this machine, without --server)")
        if (self.rounds > 1 or self.screen) and (not self.verify or server):
            raise UserError("--rounds and --screen need --verify K (and run on this machine, without --server)")
        if self.verify and server and not self.to_queue:
            raise UserError("--verify measures on this machine: run it without --server")


VERIFY_OPTIONS = (
    click.option("--verify", type=click.IntRange(min=0), default=0, help="Prune and measure K for real (K >= 2: the sensitivity profile's least-damage "
                      "architecture, the best-ranked rules of thumb and global allocations first, then the "
                      "top results; --no-starts: the top K)."),
    click.option("--queue", "to_queue", is_flag=True,
                 help="With --verify K: enqueue the top K for `archopt worker`s instead (PostgreSQL archive)."),
    click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
                 help="With --verify: rounds of query -> verify K new architectures -> retrain."),
    click.option("--explore", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
                 help="With --rounds > 1: verify by predicted - EXPLORE x uncertainty (active learning)."),
    click.option("--screen", type=click.IntRange(min=0), default=0, show_default=True,
                 help="With --rounds: measure N candidates per round on a cheap fidelity (an eighth of the "
                      "tokens) and verify the K best of those."),
    click.option("--screen-tokens", type=click.IntRange(min=2), default=None,
                 help="Tokens of the cheap fidelity (default: an eighth of the full protocol's)."),
    click.option("--refine", type=click.IntRange(min=0), default=0, show_default=True,
                 help="With --verify: after the rounds, N channel-exchange steps around the best measured "
                      "architecture (MLP channels moved between layers at an equal size, priced on the cheap "
                      "fidelity, each step verifying one in full). They tune to the objective's own text: "
                      "see the README before relying on them."),
    click.option("--weights", default=None, help="Base weights for --verify (default: the archive's location)."),
    click.option("--starts/--no-starts", default=True, show_default=True,
                 help="With --verify: first measure the search-free starts at the target (rules of thumb such "
                      "as MLP-only on LLM-Pruner's layer range, global allocations of the importance, the "
                      "least-damage architectures of the sensitivity profile, measured once per base model). "
                      "One round (--verify K >= 2) measures the profile's best and those ranked best, within "
                      "K; its profile, if new, costs about K/2 full evaluations' worth."),
)
verify_options = bundled_options(VERIFY_OPTIONS, VerifyOptions, "verification")


@click.command()
@click.option("--model", "-m", required=True, help="Base model (name, path or hub id).")
@click.option("--params", "params_text", required=True, help="Size target: 5B, 550M, 5.2e9 or 80% of the base.")
@click.option("--tolerance", default="2%", show_default=True, help="Results lie in [target*(1-tol), target].")
@click.option("--objectives", default="ppl_wikitext2", show_default=True,
              help="Comma-separated metrics to optimise (ppl_* minimised, mmlu maximised).")
@click.option("--top", type=click.IntRange(min=1, max=200), default=10, show_default=True,
              help="Show at most K architectures of the Pareto front.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the search (same seed, same answer).")
@click.option("--allow-drop", is_flag=True,
              help="Let the search drop whole decoder layers (needed below the smallest all-layers architecture).")
@click.option("--explain", is_flag=True, help="Show the refined search space (which layers matter).")
@click.option("--no-retrain", is_flag=True, help="Use the current predictors even if the archive has newer data.")
@verify_options
@click.option("--json", "as_json", is_flag=True, help="Print the archopt.query/1 JSON document.")
@eval_options
@server_options
@pass_state
def query(state: State, model: str, params_text: str, tolerance: str, objectives: str, top: int, seed: int,
          allow_drop: bool, explain: bool, no_retrain: bool, verification: VerifyOptions, as_json: bool, evaluation: EvalOptions,
          server: str | None, token: str | None) -> None:
    """Pareto-optimal pruned architectures of MODEL for a size target.

    Trains stale predictors first, searches over them, stores the answer; --verify K measures the
    top K for real and ingests them (the next query learns from them). With --server the service
    answers with its current predictors (it retrains stale ones in the background).

    \b
    Example:
      archopt query --model ptb-llama-8l --params 80% --top 5
      archopt query --model ptb-llama-8l --params 30% --allow-drop
      archopt query --model ptb-llama-8l --params 80% --verify 2 --data-dir ../shared/data
      archopt query --model ptb-llama-8l --params 80% --verify 4 --rounds 5 --data-dir ../shared/data
      archopt query --model ptb-llama-8l --params 80% --verify 4 --rounds 5 --screen 24 --data-dir ../shared/data
      archopt query --model ptb-llama-8l --params 80% --server http://127.0.0.1:8000
    """
    from archopt.optimizer.query import QueryRequest, run_query
    v = verification
    v.check(server)
    if v.to_queue:
        from .queue import queue_url
        queue_url(state)
    request = QueryRequest(model=model, params=params_text, tolerance=tolerance,
                           objectives=tuple(x.strip() for x in objectives.split(",") if x.strip()),
                           top=top, seed=seed, explain=explain, retrain=not no_retrain, allow_drop=allow_drop)
    if v.rounds > 1 or v.screen or v.refine or (one_round_starts(v) and not server):
        _query_rounds(state, request, v, evaluation, as_json)
        return
    if server:
        from archopt.service.client import Client
        body = {"model": model, "params": params_text, "tolerance": tolerance, "objectives": list(request.objectives),
                "top": top, "seed": seed, "explain": explain, **({"allow_drop": True} if allow_drop else {})}
        doc = Client(server, token).query(body, on_wait=lambda message: state.err.print(message))
    else:
        doc = run_query(state.archive, request)
    if not as_json:
        print_query(state, doc)
    if v.verify and v.to_queue:
        doc["queued"] = _queue_verify(state, doc, v, evaluation, seed)
    elif v.verify:
        from archopt.optimizer.verify import VerifyError
        try:
            verifier = _verifier(state, doc["model"], v, evaluation, seed, doc["objectives"])
        except VerifyError as exc:
            state.err.print(str(exc), markup=False, soft_wrap=True)  # one line, however long
            doc["verified"] = []
        else:
            doc["verified"] = _verify(state, verifier, doc, v.verify, show=not as_json)
            doc["verification"] = _verification(state, verifier, doc, as_json)
    if as_json:
        print_json(doc)


def _verification(state: State, verifier: Any, doc: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """What verification spent (forwarded tokens) and where the best measured architecture of the
    query's window stands against the best rule of thumb measured there; printed unless JSON."""
    from archopt.optimizer.verify import standing
    out = {"forwarded_tokens": verifier.cache.forwarded_tokens(), "standing": standing(state.archive, doc)}
    if not as_json:
        state.out.print(standing_line(out))
    return out


def standing_line(verification: dict[str, Any]) -> str:
    """``spent 1,234,567 forwarded tokens; best ppl_wikitext2 in the window 248.5 (verify), 0.98x the
    best rule of thumb (253.1, rule)``."""
    line = f"spent {verification['forwarded_tokens']:,} forwarded tokens"
    st = verification.get("standing")
    if st is None:
        return line
    best, rule = st["best"], st["best_rule"]
    line += f"; best {st['objective']} in the window {best['value']:.4g} ({best['origin']} {best['arch_id'][:12]})"
    if rule is None:
        return line + "; no rule of thumb measured there (archopt evaluate --params SIZE --starts)"
    return line + f", {st['ratio']:.3g}x the best rule of thumb ({rule['value']:.4g}, {rule['origin']})"


def _verifier(state: State, model: str, v: VerifyOptions, evaluation: EvalOptions, seed: int,
              objectives: Sequence[str] = ()) -> Any:
    """The ``optimizer.verify.Verifier`` of the command line's evaluation options. Texts or weights
    this machine cannot get (a missing --data-dir or path, a hub offline or unreachable) are a
    ``VerifyError`` at once, before torch is loaded, never minutes of download retries."""
    from archopt.cli import metric_list
    from archopt.evaluators.hub import SourceError, check_model_source, check_text_sources
    from archopt.optimizer.verify import Verifier, VerifyError
    try:
        check_text_sources(evaluation.data_dir, [*objectives, *metric_list(evaluation.metrics)])
    except SourceError as exc:
        raise VerifyError(f"cannot verify: {exc}") from None
    defaults = evaluation.settings(seed)
    verifier = Verifier(state.archive, model, defaults, weights=v.weights, extra_metrics=defaults.metrics)
    try:
        check_model_source(verifier.location, f"--weights {verifier.location}" if v.weights else
                           f"the weights of {verifier.model} ({verifier.location}; --weights PATH overrides)")
    except SourceError as exc:
        raise VerifyError(f"cannot verify: {exc}") from None
    verifier.screen_tokens = v.screen_tokens
    return verifier


def _verify(state: State, verifier: Any, doc: dict[str, Any], k: int, *, show: bool) -> list[dict[str, Any]]:
    """Measure the top ``k`` of a query with a progress bar; prints predicted against measured. When
    it measures fewer than ``k``, it says why (stderr, and ``verify_note`` in the document)."""
    from archopt.optimizer.verify import shortfall
    note = shortfall(doc, k)
    if note:
        state.err.print(note, markup=False)
        doc["verify_note"] = note
    progress, on_result = progress_runner(state, "verifying", min(k, len(doc["results"])) * len(verifier.settings(doc)))
    with progress:
        verified = verifier.verify(doc, k, on_result)
    if show:
        print_verified(state, doc, verified)
    return verified


def _queue_verify(state: State, doc: dict[str, Any], v: VerifyOptions, evaluation: EvalOptions,
                  seed: int) -> dict[str, Any]:
    """``query --verify K --queue``: enqueue the top K under the predictors' protocols (one submission
    per settings group); returns the job ids."""
    from archopt.archdb import reads
    from archopt.archdb.arch import from_layer_dicts
    from archopt.archdb.store import spec_of
    from archopt.optimizer.verify import measurement_settings, metric_protocols

    from .queue import submit_jobs
    defaults = evaluation.settings(seed, device="cpu")
    with state.archive.read() as session:
        spec = spec_of(reads.get_base_model(session, doc["model"]))
    archs = [(from_layer_dicts(spec, r["layers"]), "verify") for r in doc["results"][:v.verify]]
    metrics = [*doc["objectives"], *defaults.metrics]
    out: dict[str, Any] = {"jobs": [], "in_archive": 0, "in_queue": 0}
    for settings in measurement_settings(metric_protocols(state.archive, doc, metrics), metrics, defaults):
        report = submit_jobs(state, doc["model"], archs, settings, v.weights, 0, console=state.err)
        out["jobs"] += report.enqueued
        out["in_archive"] += report.in_archive
        out["in_queue"] += report.in_queue
    return out


def one_round_starts(v: VerifyOptions) -> int:
    """How many strong starts a one-round ``--verify K`` (K >= 2, on this machine) measures within
    its K: all but a quarter of K (at least one is the search's own pick); 0 otherwise."""
    if v.rounds > 1 or v.screen or v.refine or v.to_queue or not v.starts or v.verify < 2:
        return 0
    return v.verify - max(1, v.verify // 4)


def _query_rounds(state: State, request: Any, v: VerifyOptions, evaluation: EvalOptions, as_json: bool) -> None:
    """``query --verify K --rounds R [--screen N]``: ``optimizer.loop.verify_loop`` measuring through
    one ``Verifier`` (one loaded model). A one-round ``--verify K`` (K >= 2) comes here too: the
    least-damage architecture of the sensitivity profile (measured, when the archive has none, on
    a fidelity that costs about K/2 full evaluations), the rules of thumb and global allocations
    the predictors rank best, then the search's picks, K in all."""
    from archopt.optimizer.loop import verify_loop
    from archopt.optimizer.query import run_query
    from archopt.optimizer.verify import VerifyError
    try:
        verifier = _verifier(state, request.model, v, evaluation, request.seed, request.objectives)
    except VerifyError as exc:
        raise UserError(str(exc)) from None
    verified: list[dict[str, Any]] = []

    def profiled(i: int, n: int, result: Any) -> None:
        if not as_json and i in (0, n - 1):
            state.err.print(f"sensitivity profile: {i + 1}/{n} single-layer variants on a cheap fidelity"
                            + (" (measured once per base model; later queries reuse it)" if i == 0 else ""))

    verifier.on_profile = profiled
    verifier.allow_drop = request.allow_drop
    one_round = one_round_starts(v)
    if one_round:   # a profile measured now costs at most about K/2 full evaluations' worth
        verifier.profile_budget = v.verify / 2
        verifier.profile_start_count = 1        # its next-best solutions differ little: rules take the other slots

    def measure(archs: list[Any], picks: list[dict[str, Any]], doc: dict[str, Any]) -> None:
        if not as_json:
            state.err.print(f"round: verifying {len(picks)} of query #{doc['query_id']} "
                            f"(predictors {', '.join(f'{k} v{n}' for k, n in doc['predictor_versions'].items())})")
        got = _verify(state, verifier, {**doc, "results": picks}, len(picks), show=not as_json)
        if not got:
            raise UserError("verification measured nothing (see above); stopping the rounds")
        verified.extend(got)

    def told(key: str, tokens: int, paired: int) -> None:
        if not as_json:
            state.err.print(f"screening {request.objectives[0]} on {tokens:,} tokens (protocol {key[:12]}); "
                            f"{paired} archived architectures measured on it for pairing")

    def measure_cheap(archs: list[Any], picks: list[dict[str, Any]], doc: dict[str, Any]) -> list[float | None]:
        try:
            values = verifier.measure_cheap(archs, doc, told)
        except VerifyError as exc:
            raise UserError(str(exc)) from None
        if not as_json:
            state.err.print(f"round: screening {len(archs)} candidates of query #{doc['query_id']}")
        return values

    def exchanged(step: Any) -> None:
        if not as_json:
            state.err.print(f"exchange step {step.step}: {step.delta} channels per layer, {step.screened} screened"
                            + (f"; verified {step.verified[:12]} = {step.value:.4g}"
                               f" ({'the new best' if step.accepted else 'not better'})"
                               if step.verified and step.value is not None else "; nothing screened better"))

    report = verify_loop(state.archive, request, verify=v.verify, rounds=v.rounds, measure=measure,
                         explore=v.explore, screen=v.screen,
                         measure_cheap=measure_cheap if v.screen or v.refine else None,
                         refine=v.refine, on_exchange=exchanged,
                         starts=verifier.strong_starts if v.starts else (),
                         proposals=verifier.proposals if v.starts and not one_round else (),
                         budget=v.verify if one_round else None, max_starts=one_round or None,
                         lead_starts=("profile-1",) if one_round else ())
    # the final answer, from predictors that learned from every round
    doc = run_query(state.archive, dataclasses.replace(request, seed=request.seed + len(report.rounds)))
    doc["verified"] = verified
    doc["rounds"] = report.to_dict()
    doc["verification"] = _verification(state, verifier, doc, as_json=True)
    if as_json:
        print_json(doc)
        return
    print_query(state, doc)
    obj = request.objectives[0]
    from archopt.archdb.metrics import metric_info
    sign = -1 if metric_info(obj, strict=False).higher_is_better else 1
    best = min((x for x in verified if x["measured"].get(obj) is not None),
               key=lambda x: sign * x["measured"][obj], default=None)
    state.out.print(f"{len(report.rounds)} rounds, {len(verified)} architectures verified ({report.stopped})"
                    + (f", {report.screened} screened" if v.screen else "")
                    + (f", {len(report.exchange)} exchange steps ({sum(s.accepted for s in report.exchange)} improved)"
                       if v.refine else "")
                    + (f"; best measured {obj} = {best['measured'][obj]:.4g} ({best['arch_id'][:12]}"
                       + "".join(f"; {m} {v:.4g}" for m, v in best.get("also_measured", {}).items() if v is not None)
                       + ")" if best else ""))
    state.out.print(standing_line(doc["verification"]))
