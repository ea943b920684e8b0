"""The archive's tables (SQLAlchemy 2.0 typed ORM). Alembic migrations in ``migrations/`` create them.

- ``base_models``: one row per registered base model (its shape, config hash and weights location);
- ``architectures``: canonical per-layer encodings, unique per base model by their sha256;
- ``protocols``: how values were measured, unique by the sha256 of their fields;
- ``evaluations``: one value per (architecture, metric, protocol); retracted, never deleted;
- ``failed_runs``: a measurement that gave no value (a diverged model), with its reason: a campaign
  does not run it again, and no value, predictor or export sees it;
- ``predictors`` and ``queries``: trained predictor versions and answered queries.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, LargeBinary,
                        String, Text, UniqueConstraint, BigInteger)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class BaseModel(Base):
    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    family: Mapped[str] = mapped_column(String(40))
    config_hash: Mapped[str] = mapped_column(String(64), index=True)
    location: Mapped[str | None] = mapped_column(Text)
    revision: Mapped[str | None] = mapped_column(String(200))
    num_layers: Mapped[int] = mapped_column(Integer)
    hidden_size: Mapped[int] = mapped_column(Integer)
    num_heads: Mapped[int] = mapped_column(Integer)
    num_kv_heads: Mapped[int] = mapped_column(Integer)
    head_dim: Mapped[int] = mapped_column(Integer)
    intermediate_size: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    tie_embeddings: Mapped[bool] = mapped_column(Boolean)
    qkv_bias: Mapped[bool] = mapped_column(Boolean, default=False)
    o_bias: Mapped[bool] = mapped_column(Boolean, default=False)
    mlp_bias: Mapped[bool] = mapped_column(Boolean, default=False)
    total_params: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    architectures: Mapped[list["Architecture"]] = relationship(back_populates="base_model")


class Protocol(Base):
    __tablename__ = "protocols"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    dataset: Mapped[str] = mapped_column(String(500))
    split: Mapped[str] = mapped_column(String(500), default="")
    joining: Mapped[str] = mapped_column(String(500), default="")
    tokenizer: Mapped[str] = mapped_column(String(500), default="")
    tokenizer_hash: Mapped[str] = mapped_column(String(500), default="")
    seq_len: Mapped[int | None] = mapped_column(Integer)
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    questions: Mapped[int | None] = mapped_column(BigInteger)
    shots: Mapped[int | None] = mapped_column(Integer)
    tool: Mapped[str] = mapped_column(String(500), default="archopt")
    tool_version: Mapped[str] = mapped_column(String(500), default="")
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    precision: Mapped[str] = mapped_column(String(20), default="float32", server_default="float32")
    runtime: Mapped[str] = mapped_column(String(40), default="transformers", server_default="transformers")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Architecture(Base):
    __tablename__ = "architectures"
    __table_args__ = (UniqueConstraint("base_model_id", "arch_hash", name="uq_arch_per_base"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    arch_hash: Mapped[str] = mapped_column(String(64), index=True)
    encoding: Mapped[str] = mapped_column(Text)
    params: Mapped[int] = mapped_column(BigInteger)
    origin: Mapped[str] = mapped_column(String(20))
    importance: Mapped[str | None] = mapped_column(String(40))
    calibration: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    base_model: Mapped[BaseModel] = relationship(back_populates="architectures")
    evaluations: Mapped[list["Evaluation"]] = relationship(back_populates="architecture")


class Evaluation(Base):
    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint("architecture_id", "metric", "protocol_id", name="uq_eval_arch_metric_protocol"),
        Index("ix_eval_metric_protocol", "metric", "protocol_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    architecture_id: Mapped[int] = mapped_column(ForeignKey("architectures.id"), index=True)
    metric: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Float)
    protocol_id: Mapped[int] = mapped_column(ForeignKey("protocols.id"))
    source: Mapped[str | None] = mapped_column(Text)
    device: Mapped[str | None] = mapped_column(String(200))
    duration_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    retracted_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    retract_reason: Mapped[str | None] = mapped_column(Text)

    architecture: Mapped[Architecture] = relationship(back_populates="evaluations")
    protocol: Mapped[Protocol] = relationship()


class FailedRun(Base):
    """A measurement that gave no value (non-finite or impossible: the pruned model diverged)."""

    __tablename__ = "failed_runs"
    __table_args__ = (
        UniqueConstraint("architecture_id", "metric", "protocol_id", name="uq_failed_arch_metric_protocol"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    architecture_id: Mapped[int] = mapped_column(ForeignKey("architectures.id"), index=True)
    metric: Mapped[str] = mapped_column(String(200))
    protocol_id: Mapped[int] = mapped_column(ForeignKey("protocols.id"))
    reason: Mapped[str] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(Text)
    device: Mapped[str | None] = mapped_column(String(200))
    duration_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    protocol: Mapped[Protocol] = relationship()


class PredictorVersion(Base):
    """A trained predictor of one (base model, metric, protocol); versions count up from 1."""

    __tablename__ = "predictors"
    __table_args__ = (UniqueConstraint("base_model_id", "metric", "protocol_id", "version",
                                       name="uq_predictor_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    metric: Mapped[str] = mapped_column(String(200))
    protocol_id: Mapped[int] = mapped_column(ForeignKey("protocols.id"))
    version: Mapped[int] = mapped_column(Integer)
    algorithm: Mapped[str] = mapped_column(String(60))
    hyperparams: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    feature_set: Mapped[str] = mapped_column(String(40))
    features: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    trained_on: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    n_train: Mapped[int] = mapped_column(Integer)
    last_evaluation_id: Mapped[int] = mapped_column(Integer)
    cv: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    library_versions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    artifact: Mapped[bytes] = mapped_column(LargeBinary)
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class StoredQuery(Base):
    """An answered query; an identical later query (same inputs and predictor versions) reuses it."""

    __tablename__ = "queries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    query_key: Mapped[str] = mapped_column(String(64), unique=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    target_params: Mapped[int] = mapped_column(BigInteger)
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    elapsed_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
