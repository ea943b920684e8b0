"""Measuring architectures for real and writing each result to the archive as soon as it is known.

Used by ``archopt evaluate`` and by ``archopt query --verify``. The base model is loaded once, its
importance computed once (and cached on disk), and every architecture is pruned from it, measured,
and stored in its own transaction: a crash loses at most the architecture in flight, and a rerun
skips what the archive already holds under the same protocols.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from archopt.archdb.arch import Architecture
from archopt.archdb.archive import Archive
from archopt.archdb.errors import ArchoptError
from archopt.archdb.protocol import Measurement
from archopt.archdb.records import BaseModelInfo
from archopt.archdb.store import NewArch, record_measurements, register_base_model
from archopt.archdb import reads
from archopt.evaluators.hub import SourceError


class CampaignError(ArchoptError, RuntimeError):
    """The evaluation run cannot proceed (one line)."""


@dataclass(frozen=True)
class EvalSettings:
    """What to measure and how: the protocol-defining options of ``archopt evaluate``."""

    metrics: tuple[str, ...] = ("ppl_wikitext2", "ppl_ptb")
    data_dir: str | None = None
    seq_len: int = 128
    max_tokens: int | None = None
    max_questions: int | None = None
    shots: int = 5
    ptb_split: str = "validation"
    metric_tokens: tuple[tuple[str, int], ...] = ()   # (metric, tokens): a perplexity reading its own count
    importance: str = "taylor"
    calibration_samples: int = 10
    calibration_seq_len: int = 64
    device: str = "cpu"
    dtype: str | None = None
    seed: int = 0
    max_memory: int | None = None   # bytes the run may use (batches, pruned copies); None: automatic
    kl_text: str = "ptb-train"     # kl_base's calibration text (``evaluators.kl.KL_TEXTS``)
    kl_top_k: int | None = 256     # kl_base's reference keeps the base's top k tokens; None: all of them


@dataclass
class ArchResult:
    """One architecture of a run: its storable measurements, or ``skipped`` when the archive held
    them; ``failed`` maps metrics without a value (a diverged model) to the reason, whether the run
    just failed or had failed before (a failed run counts as done: it is not measured again)."""

    arch_id: str
    arch: Architecture
    measurements: list[Measurement]
    skipped: bool
    seconds: float
    failed: dict[str, str] = field(default_factory=dict)
    tokens: int = 0          # tokens put through the pruned model to measure it (0 when skipped), and through
    #                          the base for a kl_base reference computed on the way (once per text)


@dataclass
class CampaignReport:
    model: str
    results: list[ArchResult] = field(default_factory=list)

    @property
    def evaluated(self) -> int:
        return sum(not r.skipped for r in self.results)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.results)

    @property
    def failed(self) -> int:
        """Architectures with a failed run (new or from before) under this run's protocols."""
        return sum(bool(r.failed) for r in self.results)

    @property
    def tokens(self) -> int:
        """Tokens forwarded through pruned models by this run (and through the base for a ``kl_base``
        reference it computed)."""
        return sum(r.tokens for r in self.results)


def cache_dir() -> Path:
    """Where importance scores, tokenized texts (``tokens/``) and the base models' KL references
    (``kl/``) are cached (``ARCHOPT_CACHE`` or ~/.cache/archopt)."""
    return Path(os.environ.get("ARCHOPT_CACHE") or Path.home() / ".cache" / "archopt")


def weights_location(ref: str) -> str:
    """A local directory as an absolute path, a hub id as written."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.is_dir() else ref


def run_precision(settings: EvalSettings) -> str:
    """The precision models loaded with ``settings``' device and dtype compute in (bfloat16 on CUDA,
    float32 on CPU unless ``--dtype`` says otherwise): part of every protocol of the run."""
    from archopt.evaluators.loading import resolve_dtype
    from archopt.evaluators.perplexity import precision_for
    return precision_for(settings.device, resolve_dtype(settings.device, settings.dtype))


def make_evaluator(tokenizer: Any, settings: EvalSettings) -> Any:
    """The ``Evaluator`` of ``settings``' metrics and protocol options (precision included)."""
    from archopt import evaluators as ev
    return ev.Evaluator(tokenizer, list(settings.metrics), data_dir=settings.data_dir, seq_len=settings.seq_len,
                        max_tokens=settings.max_tokens, max_questions=settings.max_questions, shots=settings.shots,
                        ptb_split=settings.ptb_split, cache_dir=cache_dir() / "tokens",
                        precision=run_precision(settings), metric_tokens=dict(settings.metric_tokens),
                        max_memory=settings.max_memory, kl_text=settings.kl_text, kl_top_k=settings.kl_top_k,
                        reference_dir=cache_dir() / "kl")


class Campaign:
    """A loaded base model with its importance and prepared evaluation tasks."""

    def __init__(self, archive: Archive, model_ref: str, settings: EvalSettings, name: str | None = None) -> None:
        from archopt import evaluators as ev

        self.archive = archive
        self.settings = settings
        try:
            self.base = ev.load_base_model(model_ref, device=settings.device, dtype=settings.dtype)
        except SourceError as exc:  # it names the model and what to pass instead
            raise CampaignError(f"cannot load {exc}") from None
        except (OSError, ValueError) as exc:
            raise CampaignError(f"cannot load model {model_ref!r}: {str(exc).splitlines()[0][:200]}") from None
        self.name = name or self._registered_name(model_ref) or self.base.name
        info = BaseModelInfo(self.name, self.base.spec, self.base.config_hash, weights_location(model_ref),
                             self.base.revision)
        with archive.write() as session:
            row, _ = register_base_model(session, info)
            if row.config_hash != self.base.config_hash:
                raise CampaignError(f"base model {self.name!r} is registered with another config; pick --name")
        self.importance = ev.compute_importance(
            self.base, settings.importance, samples=settings.calibration_samples,
            seq_len=settings.calibration_seq_len, seed=settings.seed, cache_dir=cache_dir() / "importance",
            data_dir=settings.data_dir, memory_budget=self._activation_budget())
        self.evaluator = make_evaluator(self.base.tokenizer, settings)
        self.screener: Any = None
        self.forwarded_tokens = 0   # tokens this campaign put through pruned models (screening and
        #                             kl_base references computed on the way included)

    def _activation_budget(self) -> int:
        """Bytes of activations a pass may hold (``evaluators.loading.activation_budget``)."""
        from archopt.evaluators.loading import activation_budget
        return activation_budget(self.base.model, self.settings.max_memory)

    def enable_screening(self, metric: str, tokens: int | None = None) -> str:
        """Prepare a cheap fidelity of ``metric``: the same text and window on the first ``tokens``
        tokens (default: an eighth of the full protocol's, at least 8 windows). From then on ``run``
        also measures it (so full and cheap values pair up) and ``screen`` measures it alone.
        Returns the cheap protocol's key."""
        self.screener = self.cheap_evaluator(metric, tokens)
        return self.screener.tasks[metric].protocol.key()

    def cheap_evaluator(self, metric: str, tokens: int | None = None) -> Any:
        """The evaluator of a cheap fidelity of ``metric`` (a perplexity or ``kl_base``): the same
        text and window on its first ``tokens`` tokens (default: an eighth of the full protocol's,
        at least 8 windows); a ``kl_base`` fidelity compares with the base's reference on those tokens."""
        import dataclasses
        task = self.evaluator.tasks.get(metric)
        if task is None or not (metric.startswith("ppl") or metric == "kl_base"):
            raise CampaignError(f"a cheap fidelity needs a perplexity or kl_base metric that this run measures, "
                                f"not {metric!r}")
        full_tokens = int(task.protocol.tokens or 0)
        seq = int(task.protocol.seq_len or self.settings.seq_len)
        if tokens is None:
            tokens = max(8 * seq, full_tokens // 8)
        if tokens >= full_tokens:
            raise CampaignError(f"a cheap fidelity reads fewer tokens than the full protocol ({full_tokens:,}); "
                                f"got {tokens:,}")
        cheap = dataclasses.replace(self.settings, metrics=(metric,), seq_len=seq, max_tokens=tokens, metric_tokens=())
        return make_evaluator(self.base.tokenizer, cheap)

    def cheap_values(self, archs: Sequence[Architecture], metric: str, evaluator: Any, origin: str,
                     on_result: Callable[[int, int, ArchResult], Any] | None = None) -> list[float | None]:
        """The value of ``metric`` under ``evaluator``'s (cheap) protocol for each architecture,
        measured where the archive lacks it (stored with ``origin``) and read back from the archive."""
        self._measure([(a, origin) for a in archs], evaluator, on_result)
        key = evaluator.tasks[metric].protocol.key()
        with self.archive.read() as session:
            base_row = reads.get_base_model(session, self.name)
            values = reads.values_under(session, base_row, [a.arch_id(self.name) for a in archs], metric, key)
        return [values.get(a.arch_id(self.name)) for a in archs]

    def measuring(self, settings: EvalSettings) -> "Campaign":
        """The same loaded model and importance, measuring ``settings``' metrics under its protocol
        options (the model-defining fields, such as device, dtype and importance, must agree)."""
        import copy
        other = copy.copy(self)
        other.settings = settings
        other.screener = None
        other.forwarded_tokens = 0
        other.evaluator = make_evaluator(self.base.tokenizer, settings)
        return other

    def bind(self, archive: Archive) -> "Campaign":
        """The same loaded model, importance and tasks, writing to another archive (registered there
        under this campaign's name). Benchmarks use it to give each method an archive of its own."""
        import copy
        other = copy.copy(self)
        other.archive = archive
        info = BaseModelInfo(self.name, self.base.spec, self.base.config_hash,
                             weights_location(self.base.location), self.base.revision)
        with archive.write() as session:
            row, _ = register_base_model(session, info)
            if row.config_hash != self.base.config_hash:
                raise CampaignError(f"base model {self.name!r} is registered with another config in that archive")
        return other

    def _registered_name(self, model_ref: str) -> str | None:
        with self.archive.read() as session:
            row = reads.find_base_model_by_hash(session, model_ref, self.base.config_hash)
            return row.name if row is not None else None

    def protocol_keys(self) -> dict[str, str]:
        return {metric: task.protocol.key() for metric, task in self.evaluator.tasks.items()}

    def run(self, archs: Sequence[tuple[Architecture, str]],
            on_result: Callable[[int, int, ArchResult], Any] | None = None) -> CampaignReport:
        """Measure each (architecture, origin) not yet in the archive under these protocols (and
        under the cheap screening protocol too, once ``enable_screening`` was called)."""
        report = self._measure(archs, self.evaluator, on_result)
        if self.screener is not None:
            self._measure(archs, self.screener, None)
        return report

    def screen(self, archs: Sequence[Architecture],
               on_result: Callable[[int, int, ArchResult], Any] | None = None) -> CampaignReport:
        """Measure only the cheap screening fidelity of each architecture (``enable_screening``)."""
        if self.screener is None:
            raise CampaignError("screening is not enabled for this run")
        return self._measure([(a, "screen") for a in archs], self.screener, on_result)

    def screen_values(self, archs: Sequence[Architecture], metric: str) -> list[float | None]:
        """``screen`` then the cheap value of each architecture (from the archive when it was
        measured before): ``measure_cheap`` for ``optimizer.loop.verify_loop``."""
        if self.screener is None:
            raise CampaignError("screening is not enabled for this run")
        return self.cheap_values(archs, metric, self.screener, "screen")

    def calibrate_screening(self, metric: str, lo: int, hi: int, limit: int = 16) -> int:
        """Screen up to ``limit`` architectures in ``[lo, hi]`` parameters that have a full value of
        ``metric`` but no cheap one, so full and cheap values pair up from the first round (a few
        seconds). Returns how many were measured."""
        full_key = self.evaluator.tasks[metric].protocol.key()
        cheap_key = self.screener.tasks[metric].protocol.key()
        with self.archive.read() as session:
            base_row = reads.get_base_model(session, self.name)
            archs = reads.archs_lacking(session, base_row, metric, full_key, cheap_key, lo, hi, limit)
        return self.screen(archs).evaluated

    def _check_pruning(self, arch_id: str, stored: tuple[str | None, str | None] | None) -> None:
        """Refuse an architecture the archive holds as pruned with another importance criterion or
        calibration: the same encoding would be another model (other heads and channels kept)."""
        if stored is None:
            return
        importance, calibration = stored
        criterion = self.importance.criterion
        if importance is not None and importance != criterion:
            raise CampaignError(
                f"architecture {arch_id[:12]} was pruned with {importance} importance; evaluate it "
                f"with --importance {importance} or register another --name")
        ours = self.importance.calibration_label()
        if calibration and ours and calibration != ours:
            raise CampaignError(
                f"architecture {arch_id[:12]} was pruned with {criterion} importance calibrated on {calibration}, "
                f"this run calibrates on {ours}: evaluate it with that calibration (--seed, --data-dir) "
                f"or register another --name")

    def _measure(self, archs: Sequence[tuple[Architecture, str]], evaluator: Any,
                 on_result: Callable[[int, int, ArchResult], Any] | None) -> CampaignReport:
        """Measure what the archive lacks under ``evaluator``'s protocols. A failed run (a diverged
        model) counts as done: it is reported in ``ArchResult.failed``, never measured again."""
        report = CampaignReport(self.name)
        wanted = {metric: task.protocol.key() for metric, task in evaluator.tasks.items()}
        arch_ids = [arch.arch_id(self.name) for arch, _ in archs]
        with self.archive.read() as session:
            base_row = reads.get_base_model(session, self.name)
            done = reads.measured_keys(session, base_row, list(wanted.values()))
            failed = reads.failed_keys(session, base_row, list(wanted.values()))
            pruning = reads.arch_pruning(session, base_row, arch_ids)
        criterion = self.importance.criterion
        calibration = self.importance.calibration_label()
        for i, ((arch, origin), arch_id) in enumerate(zip(archs, arch_ids)):
            keys = [(arch_id, metric, key) for metric, key in wanted.items()]
            if all(k in done or k in failed for k in keys):
                result = ArchResult(arch_id, arch, [], True, 0.0, {k[1]: failed[k] for k in keys if k in failed})
            else:
                self._check_pruning(arch_id, pruning.get(arch_id))
                start = time.perf_counter()
                references = evaluator.reference_tokens
                measurements = evaluator.evaluate_architecture(self.base, arch, self.importance)
                seconds = time.perf_counter() - start
                with self.archive.write() as session:
                    stored = reads.get_base_model(session, self.name)
                    self._check_pruning(arch_id, reads.arch_pruning(session, stored, [arch_id]).get(arch_id))
                    record_measurements(session, stored, NewArch(arch, origin, criterion, calibration),
                                        measurements, source=f"archopt evaluate ({self.settings.device})")
                pruning[arch_id] = (criterion, calibration)
                good = [x for x in measurements if x.failure is None]
                bad = {x.metric: x.failure for x in measurements if x.failure is not None}
                for metric, key in wanted.items():
                    if metric in bad:
                        failed[(arch_id, metric, key)] = bad[metric]
                    else:
                        done.add((arch_id, metric, key))
                result = ArchResult(arch_id, arch, good, False, seconds, bad,
                                    evaluator.forwarded_tokens + evaluator.reference_tokens - references)
                self.forwarded_tokens += result.tokens
            report.results.append(result)
            if on_result is not None:
                on_result(i, len(archs), result)
        return report
