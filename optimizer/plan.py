"""Which predictor version answers for a metric: the one decision ``query``, training and the service share.

For each metric of a base model the plan names the version to use and whether it can be used as it
is, from the database alone (nothing is unpickled):

- a base model with fewer than ``MIN_TRAIN`` live evaluations of the metric under its default
  protocol (and no protocol asked for) *borrows*: it uses its newest family predictor (trained on
  the other base models of its family through depth-normalised features), or needs one trained;
- otherwise it uses the newest version of its own (metric, protocol), which is *stale* when the
  archive holds live evaluations that version has not seen;
- a version is *loadable* when it was made by the scikit-learn installed here (else it is retrained
  before use); one whose artifact's sha256 differs from the stored one is *tampered*, and refused
  with ``PredictorError`` (``check``) rather than silently replaced.

``PredictorChoice.needs_training(retrain)`` is the rule: no loadable version, or a stale own
version while retraining is allowed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from archopt.archdb import models as m
from archopt.archdb import reads
from archopt.archdb.errors import ArchoptError

MIN_TRAIN = 5

__all__ = ["MIN_TRAIN", "PredictorChoice", "PredictorError", "is_stale", "latest_row", "plan_predictors",
           "protocol_for", "sklearn_version"]


class PredictorError(ArchoptError, RuntimeError):
    """No usable predictor (too few evaluations, tampered artifact, unknown metric)."""


def sklearn_version() -> str:
    """The installed scikit-learn's version, without importing scikit-learn."""
    from importlib.metadata import version
    return version("scikit-learn")


@dataclass(frozen=True)
class PredictorChoice:
    """The predictor version a metric would be answered with, and what it lacks."""

    metric: str
    protocol_id: int | None   # the protocol it predicts (None: borrowed and nothing trained yet)
    row_id: int | None        # the version to use (None: none stored)
    version: int | None
    borrowed: bool            # a family predictor (the model has too few evaluations of its own)
    borrowed_from: tuple[str, ...]
    stale: bool               # the archive holds live evaluations it has not learned from
    loadable: bool            # made by the scikit-learn installed here
    tampered: bool = False    # the artifact's sha256 differs from the stored one

    def needs_training(self, retrain: bool = True) -> bool:
        """True when the metric cannot be answered without training a new version first."""
        return self.row_id is None or not self.loadable or (retrain and self.stale)

    def check(self) -> "PredictorChoice":
        """Itself; ``PredictorError`` when its artifact was tampered with."""
        if self.tampered:
            raise PredictorError(f"predictor {self.metric} v{self.version}: artifact hash mismatch (tampered or "
                                 "corrupted); retrain with `archopt predictors train`")
        return self


def plan_predictors(session: Session, base: m.BaseModel, metrics: Sequence[str], *,
                    protocols: dict[str, int] | None = None) -> dict[str, PredictorChoice]:
    """Metric -> ``PredictorChoice`` for ``base`` (``protocols`` pins a metric's protocol id)."""
    return {metric: _choice(session, base, metric, (protocols or {}).get(metric)) for metric in metrics}


def _choice(session: Session, base: m.BaseModel, metric: str, explicit: int | None) -> PredictorChoice:
    if explicit is None and own_pairs(session, base, metric) < MIN_TRAIN:
        row = family_row(session, base, metric)
        if row is None:
            if not family_sources(session, base, metric):
                raise nothing_to_borrow(session, base, metric)
            return PredictorChoice(metric, None, None, None, True, (), False, False)
        return PredictorChoice(metric, row.protocol_id, row.id, row.version, True,
                               tuple((row.trained_on or {}).get("borrowed_from", [])), False, *_integrity(row))
    pid = protocol_for(session, base, metric, explicit)
    row = latest_row(session, base, metric, pid)
    if row is None:
        return PredictorChoice(metric, pid, None, None, False, (), True, False)
    return PredictorChoice(metric, pid, row.id, row.version, False, (), is_stale(session, row), *_integrity(row))


def _integrity(row: m.PredictorVersion) -> tuple[bool, bool]:
    """(loadable, tampered) of a stored version."""
    loadable = (row.library_versions or {}).get("scikit-learn") == sklearn_version()
    return loadable, hashlib.sha256(row.artifact).hexdigest() != row.artifact_sha256


def protocol_for(session: Session, base: m.BaseModel, metric: str, protocol_id: int | None = None) -> int:
    """``protocol_id`` if given, else the metric's default protocol on ``base`` (most evaluations)."""
    if protocol_id is not None:
        return protocol_id
    found = reads.default_protocol(session, base, metric)
    if found is None:
        known = reads.metrics_of(session, base)
        raise PredictorError(f"{base.name} has no {metric} evaluations"
                             + (f" (it has: {', '.join(known[:6])})" if known else " (run archopt evaluate)"))
    return found


def latest_row(session: Session, base: m.BaseModel, metric: str, protocol_id: int) -> m.PredictorVersion | None:
    """The newest version of (base, metric, protocol), borrowed or own."""
    return session.scalar(select(m.PredictorVersion).where(
        m.PredictorVersion.base_model_id == base.id, m.PredictorVersion.metric == metric,
        m.PredictorVersion.protocol_id == protocol_id).order_by(m.PredictorVersion.version.desc()).limit(1))


def family_row(session: Session, base: m.BaseModel, metric: str) -> m.PredictorVersion | None:
    """The newest borrowed (family-feature) predictor version of ``base`` for ``metric``."""
    return session.scalar(select(m.PredictorVersion).where(
        m.PredictorVersion.base_model_id == base.id, m.PredictorVersion.metric == metric,
        m.PredictorVersion.feature_set == "family").order_by(m.PredictorVersion.id.desc()).limit(1))


def family_sources(session: Session, base: m.BaseModel, metric: str) -> list[tuple[m.BaseModel, int]]:
    """(base model, default protocol) of the other models of ``base``'s family with at least
    ``MIN_TRAIN`` live ``metric`` evaluations: what a borrowed predictor learns from."""
    out = []
    for other in session.scalars(select(m.BaseModel).where(m.BaseModel.family == base.family,
                                                           m.BaseModel.id != base.id).order_by(m.BaseModel.id)):
        pid = reads.default_protocol(session, other, metric)
        if pid is not None and len(reads.training_pairs(session, other, metric, pid)) >= MIN_TRAIN:
            out.append((other, pid))
    return out


def nothing_to_borrow(session: Session, base: m.BaseModel, metric: str) -> PredictorError:
    """The error for a metric with too few evaluations of its own and no family model to learn from."""
    own = own_pairs(session, base, metric)
    if own:
        have = f"fewer than {MIN_TRAIN} {metric} evaluations ({own})"
    else:
        known = reads.metrics_of(session, base)
        have = f"no {metric} evaluations" + (f" (it has: {', '.join(known[:6])})" if known else "")
    return PredictorError(f"{base.name} has {have} and no other {base.family} model in the archive to borrow a "
                          "predictor from (run archopt evaluate)")


def own_pairs(session: Session, base: m.BaseModel, metric: str) -> int:
    """Live evaluations of ``metric`` on ``base`` under its default protocol."""
    pid = reads.default_protocol(session, base, metric)
    return 0 if pid is None else len(reads.training_pairs(session, base, metric, pid))


def evaluation_signature(session: Session, base_id: int, metric: str, protocol_ids: Sequence[int]) -> list[int]:
    """[count, last id] of the live evaluations of ``metric`` under ``protocol_ids``."""
    if not protocol_ids:
        return [0, 0]
    q = (select(func.count(), func.max(m.Evaluation.id))
         .join(m.Architecture, m.Architecture.id == m.Evaluation.architecture_id)
         .where(m.Architecture.base_model_id == base_id, m.Evaluation.metric == metric,
                m.Evaluation.protocol_id.in_(list(protocol_ids)), m.Evaluation.retracted_at.is_(None)))
    count, last = session.execute(q).one()
    return [int(count), int(last or 0)]


def is_stale(session: Session, row: m.PredictorVersion) -> bool:
    """True when the live evaluations of its (metric, protocol), or of the protocol's cheap
    fidelities, differ from what it learned."""
    count, last = evaluation_signature(session, row.base_model_id, row.metric, [row.protocol_id])
    if count != row.n_train or last != row.last_evaluation_id:
        return True
    if row.feature_set != "model":
        return False
    base = session.get(m.BaseModel, row.base_model_id)
    cheap = reads.cheaper_fidelities(session, base, row.metric, row.protocol_id)
    learned = (row.trained_on or {}).get("fidelity_signature", [0, 0])
    return evaluation_signature(session, base.id, row.metric, cheap) != list(learned)
