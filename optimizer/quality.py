"""What an answer is worth: its predictors' cross-validated quality and the warnings it carries.

Every ``archopt.query/1`` document carries ``predictor_quality`` (per objective: training
``rows``, out-of-fold ``kendall_tau`` and ``r2``, and ``coverage``, the cross-validated share of
held-out measurements inside ``predicted ± uncertainty``; nominal 68.3%) and ``warnings``, one
line each, naming the command that would fix what they warn about. An answer is warned about when
one of its predictors

- learnt from fewer than ``MIN_ROWS`` measured architectures,
- ranks held-out architectures with a cross-validated Kendall tau below ``MIN_TAU``, predicts
  them worse than their mean (R² below 0), or its band held fewer than ``MIN_COVERAGE`` of them,
- is borrowed from other base models of the family (its values are on their scale),
- is asked about a size outside the sizes it learnt from (it extrapolates),

or when results are predicted better than the unpruned base model measured (a predictor that
extrapolates there). The base model's measured values are in ``base_measured``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from sqlalchemy import select

from archopt.archdb import models as m
from archopt.archdb import reads
from archopt.archdb.arch import full
from archopt.archdb.metrics import metric_info
from archopt.archdb.sizes import format_size
from archopt.archdb.store import spec_of

__all__ = ["MIN_COVERAGE", "MIN_ROWS", "MIN_TAU", "answer_quality", "base_measured", "evaluate_command",
           "predictor_quality", "predictor_warnings"]

MIN_ROWS = 20        # measured architectures below which a predictor's answers are warned about
MIN_TAU = 0.5        # cross-validated Kendall tau below which its ranking is warned about
MIN_COVERAGE = 0.5   # cross-validated coverage of the one-sigma band (nominal 0.683) below which too
SUGGESTED_SAMPLES = 20


def predictor_quality(predictor: Any) -> dict[str, Any]:
    """``{"rows", "kendall_tau", "r2", "coverage", "algorithm"}`` of a trained ``Predictor`` (its
    out-of-fold scores; ``coverage`` is None for an artifact trained before calibration)."""
    cv = predictor.cv or {}
    return {"rows": int(predictor.n_train), "kendall_tau": cv.get("kendall_tau"), "r2": cv.get("r2"),
            "coverage": cv.get("coverage"), "algorithm": predictor.algorithm}


def evaluate_command(model: str, fraction: float | None, metric: str, tokens: int | None = None,
                     samples: int = SUGGESTED_SAMPLES) -> str:
    """The ``archopt evaluate`` line that measures more architectures of ``metric`` near ``fraction``
    of the base model (under the predictor's token count)."""
    where = f" --params {100 * fraction:.3g}%" if fraction is not None else ""
    limit = f" --max-tokens {tokens}" if tokens else ""
    return f"archopt evaluate --model {model}{where} --samples {samples} --metrics {metric}{limit}"


def predictor_warnings(metric: str, quality: Mapping[str, Any], fix: str) -> list[str]:
    """The warnings about one predictor's quality (few rows, weak ranking, a band that does not hold)."""
    reasons = []
    rows, tau, r2, cov = (quality.get(k) for k in ("rows", "kendall_tau", "r2", "coverage"))
    if rows is not None and rows < MIN_ROWS:
        reasons.append(f"{rows} measured architectures, fewer than {MIN_ROWS}")
    if tau is None or tau < MIN_TAU:
        reasons.append("cross-validated Kendall tau " + (f"{tau:.2f}, below {MIN_TAU}" if tau is not None
                                                         else "undefined"))
    if r2 is not None and r2 < 0:
        reasons.append(f"R² {r2:.2f}, worse than predicting the mean")
    if cov is not None and cov < MIN_COVERAGE:
        reasons.append(f"its band held {100 * cov:.0f}% of held-out values, not 68%")
    if not reasons:
        return []
    return [f"{metric}: weak predictor ({'; '.join(reasons)}): its ranking and bands are unreliable; "
            f"measure more: {fix}"]


def base_measured(session: Any, base: m.BaseModel, protocols: Mapping[str, int | None]) -> dict[str, float | None]:
    """Metric -> the unpruned base model's live measured value under that protocol (None: unmeasured)."""
    arch_hash = full(spec_of(base)).arch_id(base.name)
    row = session.scalar(select(m.Architecture).where(m.Architecture.base_model_id == base.id,
                                                      m.Architecture.arch_hash == arch_hash))
    values = reads.live_metrics(session, [row.id]).get(row.id, {}) if row is not None else {}
    out: dict[str, float | None] = {}
    for metric, pid in protocols.items():
        hit = [v.value for v in values.get(metric, []) if v.protocol_id == pid]
        out[metric] = hit[-1] if hit else None
    return out


def answer_quality(session: Any, base: m.BaseModel, target: int, window: Sequence[int],
                   trained: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``predictor_quality``, ``base_measured`` and ``warnings`` of a query answer: ``trained`` is
    metric -> ``training.Trained``, ``results`` the answer's result rows."""
    total = base.total_params
    fraction = target / total if total else None
    quality = {k: predictor_quality(t.predictor) for k, t in trained.items()}
    reference = base_measured(session, base, {k: t.protocol_id for k, t in trained.items()})
    warnings: list[str] = []
    for metric, t in trained.items():
        tokens = reads.protocol_dict(session, t.protocol_id).get("tokens") if t.protocol_id is not None else None
        fix = evaluate_command(base.location or base.name, fraction, metric, tokens)
        if t.borrowed_from:
            warnings.append(f"{metric}: borrowed predictor (learnt on {', '.join(t.borrowed_from)}; {base.name} has "
                            f"too few {metric} evaluations of its own): its values rank architectures on those "
                            f"models' scale; measure this model: {fix}")
        warnings += predictor_warnings(metric, quality[metric], fix)
        lo, hi = t.predictor.training_range().get("param_frac", (None, None))
        if lo is not None and total and (window[1] < lo * total * 0.99 or window[0] > hi * total * 1.01):
            warnings.append(f"{metric}: the target {format_size(target)} lies outside the sizes the predictor "
                            f"learnt from ({format_size(int(lo * total))}-{format_size(int(hi * total))}): it "
                            f"extrapolates; measure at the target: {fix}")
        ref = reference.get(metric)
        if ref is not None and not t.borrowed_from:
            sign = -1.0 if metric_info(metric, strict=False).higher_is_better else 1.0
            better = [r for r in results if sign * (r["predicted"][metric] - ref) < 0]
            if better:
                warnings.append(f"{metric}: {len(better)} of {len(results)} results are predicted better than the "
                                f"unpruned base model's measured {ref:.4g}: the predictor extrapolates there; "
                                f"measure them (archopt query ... --verify {len(better)})")
    return {"predictor_quality": quality, "base_measured": reference, "warnings": warnings}
