"""``archopt predictors``: list, train and show versioned accuracy predictors."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape

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
@click.option("--model", "-m", default=None, help="Only this base model.")
@click.option("--json", "as_json", is_flag=True, help="Print the archopt.predictors/1 JSON document.")
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
                       ("kendall_tau", "Kendall τ"), ("spearman", "Spearman"), ("mae", "MAE"),
                       ("coverage", "± band held"), ("stale", "stale")],
         as_json, {"schema": "archopt.predictors/1", "predictors": slim})


@predictors.command("train")
@click.option("--model", "-m", required=True, help="Base model (name, path or hub id).")
@click.option("--metric", "metric_names", default=None, help="Comma-separated (default: every measured metric).")
@click.option("--protocol", type=int, default=None, help="Protocol id (default: the most used).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the training and its cross-validation.")
@pass_state
def predictors_train(state: State, model: str, metric_names: str | None, protocol: int | None, seed: int) -> None:
    """Train new predictor versions now (a query also retrains stale ones itself).

    \b
    Example:
      archopt predictors train --model ptb-llama-8l --metric ppl_wikitext2,ppl_ptb
    """
    from archopt.archdb.reads import get_base_model, metrics_of, protocol_dict
    from archopt.optimizer.training import ensure_predictors
    with state.archive.read() as session:
        base = get_base_model(session, model)
        names = [x.strip() for x in metric_names.split(",")] if metric_names else [
            mm for mm in metrics_of(session, base) if ":" not in mm]
        name, location = base.name, base.location
    protocols = {n: protocol for n in names} if protocol is not None else None
    trained = ensure_predictors(state.archive, name, names, force=True, protocols=protocols, seed=seed)
    from archopt.optimizer.quality import evaluate_command, predictor_quality, predictor_warnings
    for metric, t in trained.items():
        cv = t.predictor.cv
        coverage = cv.get("coverage")
        state.out.print(f"{name} {metric}: v{t.version} {t.predictor.algorithm} on {t.predictor.n_train} pairs, "
                        f"CV R²={cell(cv.get('r2'))} Kendall τ={cell(cv.get('kendall_tau'))} "
                        f"Spearman={cell(cv.get('spearman'))} MAE={cell(cv.get('mae'))}"
                        + (f"; ± band held {100 * coverage:.0f}% of held-out values (nominal 68%)"
                           if coverage is not None else ""))
        with state.archive.read() as session:
            tokens = protocol_dict(session, t.protocol_id).get("tokens")
        fix = evaluate_command(location or name, None, metric, tokens)
        for warning in predictor_warnings(metric, predictor_quality(t.predictor), fix):
            state.out.print(f"[bold yellow]warning:[/] {escape(warning)}")


@predictors.command("show")
@click.argument("predictor_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
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
    from rich.table import Table
    table = Table(title=f"predictor {info['id']}: {info['model']} {info['metric']} v{info['version']}",
                  show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for field, value in _show_rows(info):
        table.add_row(field, value)
    state.out.print(table)


def _show_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, text) rows of ``predictors show`` for people; ``--json`` prints everything as it is."""
    cv = info.get("cv") or {}
    trained = info.get("trained_on") or {}
    names = (info.get("features") or {}).get("names") or []
    candidates = cv.get("candidates") or {}

    def pairs(mapping: dict[str, Any]) -> str:
        return ", ".join(f"{k}={cell(v)}" for k, v in mapping.items()) or "-"

    return [
        ("protocol", cell(info.get("protocol"))),
        ("algorithm", cell(info.get("algorithm"))),
        ("trained on", f"{cell(info.get('n_train'))} evaluations (last evaluation id "
                       f"{cell(trained.get('last_evaluation_id'))})"),
        ("stale", cell(info.get("stale"))),
        ("cross-validation", f"R²={cell(cv.get('r2'))} Kendall τ={cell(cv.get('kendall_tau'))} "
                             f"Spearman={cell(cv.get('spearman'))} MAE={cell(cv.get('mae'))} "
                             f"({cell(cv.get('scheme'))})"),
        ("uncertainty", f"± band held {cell(cv.get('coverage'))} of held-out values in cross-validation (nominal "
                        f"{cell((cv.get('calibration') or {}).get('level'))}; calibration scale "
                        f"{cell((cv.get('calibration') or {}).get('scale'))})"),
        ("candidates (τ)", ", ".join(f"{k} {cell(v.get('kendall_tau'))}" for k, v in candidates.items()) or "-"),
        ("hyperparameters", pairs(info.get("hyperparams") or {})),
        ("features", f"{len(names)}: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"),
        ("library versions", pairs(info.get("library_versions") or {})),
        ("created", cell(info.get("created_at"))),
        ("artifact sha256", cell(info.get("artifact_sha256"))),
    ]

