"""Versioned predictors in the archive: train from measured pairs, store, verify, load, retrain.

A predictor version is trained on every live evaluation of one (base model, metric, protocol). Its
joblib artifact lives in the archive with its sha256 and the library versions that made it.
Loading checks the hash (a mismatch is refused) and the scikit-learn version (a mismatch means
retrain); nothing is ever unpickled from outside the archive. A version is stale when the archive
holds live evaluations it has not seen (or retracted one it learned from).

Cheap fidelities. When the archive also holds values of the metric under a cheap fidelity of the
protocol (the same text on fewer tokens: ``archopt query --screen``), a version learns from them
too: a line fitted on architectures measured both ways (on the predictor's scale, log for
perplexities) maps each cheap-only value onto the full protocol's scale, and those rows join the
training set. The line, its correlation and the rows used are recorded in ``trained_on``; new
cheap values make a version stale like new full ones.

Sensitivity profile. When the archive holds a perplexity's or kl_base's profile (the single-layer variants of
``optimizer.profile``, measured on the protocol or a cheap fidelity of it), a version also gets
the profile's summed damages as features (``damage_*``) and the ``profile_trees`` candidate; the
profile's protocol is recorded in ``trained_on["profile"]``.
"""

from __future__ import annotations

import hashlib
import io
import platform
from dataclasses import dataclass
from typing import Any, Sequence

import joblib
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from archopt.archdb import models as m
from archopt.archdb import reads
from archopt.archdb.archive import Archive
from archopt.archdb.store import spec_of

from .encoding import encode
from .features import Featurizer
from .plan import (MIN_TRAIN, PredictorError, evaluation_signature, family_sources, is_stale, latest_row,
                   nothing_to_borrow, plan_predictors)
from .predictors import Predictor, train_predictor

MIN_FIDELITY_PAIRS = 8      # architectures measured both ways before cheap values are mapped
MIN_FIDELITY_CORR = 0.6     # and the two must agree at least this well (Pearson, model scale)


class StalePredictor(PredictorError):
    """The artifact was made by other library versions: retrain rather than trust it."""


def library_versions() -> dict[str, str]:
    import sklearn
    return {"scikit-learn": sklearn.__version__, "numpy": np.__version__, "joblib": joblib.__version__,
            "python": platform.python_version()}


def dumps(predictor: Predictor) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    joblib.dump(predictor, buffer, compress=3)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def loads(row: m.PredictorVersion) -> Predictor:
    """Unpickle a stored artifact after checking its hash and the scikit-learn version; an artifact
    whose classes no longer exist (an older archopt's) is stale: retrain it."""
    if hashlib.sha256(row.artifact).hexdigest() != row.artifact_sha256:
        raise PredictorError(f"predictor {row.metric} v{row.version}: artifact hash mismatch (tampered or "
                             "corrupted); retrain with `archopt predictors train`")
    stored = (row.library_versions or {}).get("scikit-learn")
    if stored != library_versions()["scikit-learn"]:
        raise StalePredictor(f"predictor {row.metric} v{row.version} was made by scikit-learn {stored}")
    try:
        predictor = joblib.load(io.BytesIO(row.artifact))
    except (AttributeError, ImportError) as exc:  # pickled with classes this archopt no longer has
        raise StalePredictor(f"predictor {row.metric} v{row.version} was made by another archopt "
                             f"({str(exc).splitlines()[0][:120]}); retrain it") from None
    if not isinstance(predictor, Predictor):
        raise PredictorError(f"predictor {row.metric} v{row.version}: artifact is not an archopt predictor")
    return predictor


@dataclass
class Trained:
    """A usable predictor with its archive row facts."""

    predictor: Predictor
    version: int
    row_id: int
    protocol_id: int
    stale: bool
    retrained: bool
    borrowed_from: tuple[str, ...] = ()


def fidelity_rows(session: Session, base: m.BaseModel, metric: str, protocol_id: int,
                  pairs: Sequence[tuple[m.Architecture, float, int]]) -> tuple[list[tuple[m.Architecture, float, int]], dict[str, Any]]:
    """Cheap-fidelity values of architectures without a full value, mapped onto the full scale.

    Uses the cheap protocol with the most tokens that has at least ``MIN_FIDELITY_PAIRS``
    architectures measured both ways and a correlation of at least ``MIN_FIDELITY_CORR``. Returns
    the mapped rows and a JSON-ready record for ``trained_on``: the cheap protocols' evaluation
    signature (for staleness) and, when one qualified, ``fidelity`` (its line, correlation, rows).
    """
    from .predictors import _forward, _inverse, metric_transform
    cheap_ids = reads.cheaper_fidelities(session, base, metric, protocol_id)
    record: dict[str, Any] = {"fidelity_signature": evaluation_signature(session, base.id, metric, cheap_ids)}
    full = {a.id: v for a, v, _ in pairs}
    kind = metric_transform(metric)
    for pid in cheap_ids:
        cheap = reads.training_pairs(session, base, metric, pid)
        both = [(v, full[a.id]) for a, v, _ in cheap if a.id in full]
        if len(both) < MIN_FIDELITY_PAIRS:
            continue
        x = _forward(np.array([c for c, _ in both]), kind)
        y = _forward(np.array([f for _, f in both]), kind)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        corr = float(np.corrcoef(x, y)[0, 1])
        slope, intercept = np.polyfit(x, y, 1)
        if not (corr >= MIN_FIDELITY_CORR and slope > 0):
            continue
        only = [(a, v, e) for a, v, e in cheap if a.id not in full]
        mapped = _inverse(intercept + slope * _forward(np.array([v for _, v, _ in only]), kind), kind) if only else []
        rows = [(a, float(v), e) for (a, _, e), v in zip(only, mapped)]
        record["fidelity"] = {"protocol_id": pid, "pairs": len(both), "rows": len(rows),
                              "slope": float(slope), "intercept": float(intercept), "corr": corr,
                              "evaluation_ids": [e for _, _, e in rows]}
        return rows, record
    return [], record


def train_version(session: Session, base: m.BaseModel, metric: str, protocol_id: int, *, seed: int = 0,
                  candidates: Sequence[str] | None = None) -> tuple[m.PredictorVersion, Predictor]:
    """Train on every live pair, store the next version (caller's transaction)."""
    pairs = reads.training_pairs(session, base, metric, protocol_id)
    if len(pairs) < MIN_TRAIN:
        raise PredictorError(f"{base.name}: only {len(pairs)} live {metric} evaluations under protocol "
                             f"#{protocol_id}; a predictor needs at least {MIN_TRAIN} (run archopt evaluate)")
    spec = spec_of(base)
    cheap, record = fidelity_rows(session, base, metric, protocol_id, pairs)
    rows = list(pairs) + cheap
    archs = [reads.architecture_of(a, base) for a, _, _ in rows]
    profile = stored_profile(session, base, metric, protocol_id)
    featurizer = Featurizer.for_spec(spec, "model", profile=profile[0] if profile else None)
    if profile:
        record["profile"] = {"protocol_id": profile[1], "variants": profile[2]}
    X = featurizer.transform(encode(archs, spec))
    y = np.array([v for _, v, _ in rows])
    kwargs: dict[str, Any] = {"seed": seed, "featurizer": featurizer}
    if candidates:
        kwargs["candidates"] = tuple(candidates)
    predictor = train_predictor(X, y, metric, **kwargs)
    row = _store_version(session, base, metric, protocol_id, predictor, "model", [e for _, _, e in pairs],
                         **record)
    return row, predictor


def stored_profile(session: Session, base: m.BaseModel, metric: str, protocol_id: int,
                   min_share: float = 0.9) -> tuple[Any, int, int] | None:
    """``(Profile, protocol id, variants measured)`` of ``base``'s sensitivity profile for a
    perplexity or ``kl_base`` ``metric``, read from the archive under ``protocol_id`` or its cheaper
    fidelities (most tokens first) (the first with the base and at least ``min_share`` of
    the variants measured); None when there is none."""
    from archopt.archdb.arch import full
    from .profile import Profile, damage_scale, profile_variants
    scale = damage_scale(metric)
    if scale is None:
        return None
    spec = spec_of(base)
    variants = profile_variants(spec)
    ids = [full(spec).arch_id(base.name)] + [v.architecture.arch_id(base.name) for v in variants]
    for pid in [protocol_id, *reads.cheaper_fidelities(session, base, metric, protocol_id)]:
        values = reads.values_under(session, base, ids, metric, session.get(m.Protocol, pid).key)
        measured = [values.get(i) for i in ids[1:]]
        count = sum(v is not None for v in measured)
        if ids[0] in values and count >= min_share * len(variants):
            return (Profile.from_values(spec, variants, measured, values[ids[0]], log_scale=scale == "log"),
                    pid, count)
    return None


def _store_version(session: Session, base: m.BaseModel, metric: str, protocol_id: int, predictor: Predictor,
                   feature_set: str, eval_ids: list[int], **trained_on: Any) -> m.PredictorVersion:
    """Add the next version of (base, metric, protocol) with its artifact (caller's transaction)."""
    artifact, digest = dumps(predictor)
    previous = latest_row(session, base, metric, protocol_id)
    row = m.PredictorVersion(
        base_model_id=base.id, metric=metric, protocol_id=protocol_id,
        version=(previous.version + 1) if previous else 1, algorithm=predictor.algorithm,
        hyperparams=_jsonable(predictor.hyperparams), feature_set=feature_set,
        features={"names": predictor.feature_names, "bins": predictor.featurizer.bins},
        trained_on={"evaluation_ids": eval_ids, **trained_on,
                    "sha256": hashlib.sha256(",".join(map(str, eval_ids)).encode()).hexdigest()},
        n_train=len(eval_ids), last_evaluation_id=max(eval_ids), cv=_jsonable(predictor.cv),
        library_versions=library_versions(), artifact=artifact, artifact_sha256=digest, created_at=m.utcnow())
    session.add(row)
    session.flush()
    return row


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if np.isfinite(f) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def ensure_predictors(archive: Archive, model: str, metrics: Sequence[str], *, retrain: bool = True,
                      force: bool = False, protocols: dict[str, int] | None = None, seed: int = 0) -> dict[str, Trained]:
    """The predictor of each metric that ``plan_predictors`` chooses, loaded; a new version is
    trained (own or borrowed, as planned) where the plan needs one, or for every metric with ``force``."""
    out: dict[str, Trained] = {}
    for metric in metrics:
        with archive.read() as session:
            base = reads.get_base_model(session, model)
            choice = plan_predictors(session, base, [metric], protocols=protocols)[metric]
            if not force and not choice.check().needs_training(retrain):
                row = session.get(m.PredictorVersion, choice.row_id)
                try:
                    predictor = loads(row)
                except StalePredictor:
                    predictor = None
                if predictor is not None:
                    out[metric] = Trained(predictor, choice.version, choice.row_id, choice.protocol_id,
                                          choice.stale, False, choice.borrowed_from)
                    continue
        with archive.write() as session:
            base = reads.get_base_model(session, model)
            if choice.borrowed:
                new_row, predictor = train_family_version(session, base, metric, seed=seed)
            else:
                new_row, predictor = train_version(session, base, metric, choice.protocol_id, seed=seed)
            out[metric] = Trained(predictor, new_row.version, new_row.id, new_row.protocol_id, False, True,
                                  tuple((new_row.trained_on or {}).get("borrowed_from", [])))
    return out


def usable_rows(archive: Archive, model: str, metrics: Sequence[str], *, retrain: bool = True) -> dict[str, int] | None:
    """Metric -> row id of the versions ``ensure_predictors`` would use without training (from the
    database alone, nothing unpickled); None when any metric needs a new version."""
    with archive.read() as session:
        plan = plan_predictors(session, reads.get_base_model(session, model), metrics)
    if any(c.check().needs_training(retrain) for c in plan.values()):
        return None
    return {metric: c.row_id for metric, c in plan.items()}


def train_family_version(session: Session, base: m.BaseModel, metric: str, *,
                         seed: int = 0) -> tuple[m.PredictorVersion, Predictor]:
    """A predictor for a base model with too few evaluations of its own, learned from the other
    base models of its family through depth-normalised ("family") features only. Its values rank
    architectures; their scale is the source models' (their protocols, their tokenizers)."""
    featurizer = Featurizer(feature_set="family")
    sources = family_sources(session, base, metric)
    if not sources:
        raise nothing_to_borrow(session, base, metric)
    parts, targets, eval_ids, names, sizes = [], [], [], [], {}
    for other, pid in sources:
        pairs = reads.training_pairs(session, other, metric, pid)
        parts.append(featurizer.transform(encode([reads.architecture_of(a, other) for a, _, _ in pairs],
                                                 spec_of(other))))
        targets.extend(v for _, v, _ in pairs)
        eval_ids.extend(e for _, _, e in pairs)
        names.append(other.name)
        sizes[pid] = sizes.get(pid, 0) + len(pairs)
    predictor = train_predictor(np.vstack(parts), np.array(targets), metric, seed=seed, featurizer=featurizer)
    row = _store_version(session, base, metric, max(sizes, key=sizes.get), predictor, "family", eval_ids,
                         borrowed_from=names)
    return row, predictor


def predictor_rows(session: Session, model: str | None = None) -> list[dict[str, Any]]:
    q = select(m.PredictorVersion, m.BaseModel.name).join(m.BaseModel, m.BaseModel.id == m.PredictorVersion.base_model_id)
    if model:
        q = q.where(m.PredictorVersion.base_model_id == reads.get_base_model(session, model).id)
    out = []
    for row, name in session.execute(q.order_by(m.BaseModel.name, m.PredictorVersion.metric,
                                                m.PredictorVersion.version)):
        out.append(row_summary(session, row, name))
    return out


def row_summary(session: Session, row: m.PredictorVersion, model_name: str) -> dict[str, Any]:
    cv = row.cv or {}
    return {"id": row.id, "model": model_name, "metric": row.metric, "protocol": row.protocol_id,
            "version": row.version, "algorithm": row.algorithm, "n_train": row.n_train,
            "r2": cv.get("r2"), "mae": cv.get("mae"), "kendall_tau": cv.get("kendall_tau"),
            "spearman": cv.get("spearman"), "coverage": cv.get("coverage"), "stale": is_stale(session, row),
            "created_at": row.created_at.isoformat(timespec="seconds"), "artifact_sha256": row.artifact_sha256,
            "library_versions": row.library_versions, "hyperparams": row.hyperparams, "cv": cv}


def predictor_by_id(session: Session, predictor_id: int) -> dict[str, Any]:
    row = session.get(m.PredictorVersion, predictor_id)
    if row is None:
        raise reads.NotFound(f"no predictor with id {predictor_id}")
    base = session.get(m.BaseModel, row.base_model_id)
    assert base is not None
    info = row_summary(session, row, base.name)
    info["features"] = row.features
    info["trained_on"] = {"evaluations": row.n_train, "last_evaluation_id": row.last_evaluation_id,
                          "sha256": (row.trained_on or {}).get("sha256")}
    return info
