"""``archopt predictors``: list, train and show versioned accuracy predictors."""

from __future__ import annotations

import json

import click

from archopt.cli import State, pass_state

from .output import cell, emit, print_json


@click.group()
def predictors() -> None:
    """Versioned accuracy predictors: list, train, show.

    \b
    Example:
      archopt predictors train --model ptb-llama-8l --metric ppl_wikitext2
    """


@predictors.command("list")
@click.option("--model", "-m", default=None)
@click.option("--json", "as_json", is_flag=True)
@pass_state
def predictors_list(state: State, model: str | None, as_json: bool) -> None:
    """List predictor versions with their cross-validation scores.

    \b
    Example:
      archopt predictors list --model ptb-llama-8l
    """
    from archopt.optimizer.training import predictor_rows
    with state.archive.read() as session:
        rows = predictor_rows(session, model)
    slim = [{k: v for k, v in r.items() if k not in ("hyperparams", "cv", "library_versions")} for r in rows]
    emit(state, slim, [("id", "id"), ("model", "model"), ("metric", "metric"), ("protocol", "protocol"),
                       ("version", "v"), ("algorithm", "algorithm"), ("n_train", "n"), ("r2", "R²"),
                       ("kendall_tau", "Kendall τ"), ("spearman", "Spearman"), ("mae", "MAE"), ("stale", "stale")],
         as_json, {"schema": "archopt.predictors/1", "predictors": slim})


@predictors.command("train")
@click.option("--model", "-m", required=True)
@click.option("--metric", "metric_names", default=None, help="Comma-separated (default: every measured metric).")
@click.option("--protocol", type=int, default=None, help="Protocol id (default: the most used).")
@click.option("--seed", type=int, default=0, show_default=True)
@pass_state
def predictors_train(state: State, model: str, metric_names: str | None, protocol: int | None, seed: int) -> None:
    """Train new predictor versions now (a query also retrains stale ones itself).

    \b
    Example:
      archopt predictors train --model ptb-llama-8l --metric ppl_wikitext2,ppl_ptb
    """
    from archopt.archdb.reads import get_base_model, metrics_of
    from archopt.optimizer.training import ensure_predictors
    with state.archive.read() as session:
        base = get_base_model(session, model)
        names = [x.strip() for x in metric_names.split(",")] if metric_names else [
            mm for mm in metrics_of(session, base) if ":" not in mm]
        name = base.name
    protocols = {n: protocol for n in names} if protocol is not None else None
    trained = ensure_predictors(state.archive, name, names, force=True, protocols=protocols, seed=seed)
    for metric, t in trained.items():
        cv = t.predictor.cv
        state.out.print(f"{name} {metric}: v{t.version} {t.predictor.algorithm} on {t.predictor.n_train} pairs, "
                        f"CV R²={cell(cv.get('r2'))} Kendall τ={cell(cv.get('kendall_tau'))} "
                        f"Spearman={cell(cv.get('spearman'))} MAE={cell(cv.get('mae'))}")


@predictors.command("show")
@click.argument("predictor_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_state
def predictors_show(state: State, predictor_id: int, as_json: bool) -> None:
    """Show one predictor version: algorithm, hyperparameters, CV scores, data, library versions.

    \b
    Example:
      archopt predictors show 3
    """
    from archopt.optimizer.training import predictor_by_id
    with state.archive.read() as session:
        info = predictor_by_id(session, predictor_id)
    if as_json:
        print_json(info)
        return
    state.out.print_json(json.dumps(info))

