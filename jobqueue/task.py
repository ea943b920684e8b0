"""The task a worker runs: measure one architecture with a base model kept loaded between jobs.

A worker's state (its settings, open archive, loaded campaigns and counters) is a
:class:`WorkerState` that ``run_worker`` creates for its run and hands to procrastinate as
additional context; the task reaches it through its job context (``context.additional_context``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from archopt.archdb.archive import Archive

from .connection import QueueError
from .joblog import record_attempt

log = logging.getLogger("archopt.jobs")

CONTEXT_KEY = "archopt_worker"


@dataclass(frozen=True)
class WorkerConfig:
    """A worker's own settings: where it writes, on what it measures, when it stops."""

    archive_url: str
    device: str = "cpu"
    dtype: str | None = None
    data_dir: str | None = None
    max_jobs: int | None = None
    name: str = ""


@dataclass
class WorkerState:
    """What one worker run keeps between jobs. Thread safe: with ``--concurrency`` > 1, jobs run in
    threads at once. ``stop`` asks the worker to take no new job (called once ``max_jobs`` are done)."""

    config: WorkerConfig
    archive: Archive
    stop: Callable[[], None] = lambda: None
    campaigns: Any = None   # optimizer.verify.CampaignCache of this run
    running: int = 0
    finished: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _load_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        from archopt.optimizer.verify import CampaignCache
        self.campaigns = CampaignCache(self.archive)

    def job_started(self) -> None:
        with self._lock:
            self.running += 1

    def job_ended(self) -> None:
        """Count a finished job; call ``stop`` once ``max_jobs`` are done."""
        with self._lock:
            self.running -= 1
            self.finished += 1
            self.last_activity = time.monotonic()
            limit = self.config.max_jobs
            if limit is not None and self.finished >= limit:
                self.stop()

    def idle_for(self) -> float:
        """Seconds since the last job ended (0 while one runs)."""
        with self._lock:
            return 0.0 if self.running else time.monotonic() - self.last_activity

    def campaign(self, location: str, settings: Any, model: str) -> Any:
        """The campaign measuring ``settings`` on ``model``: a base model is loaded once per run and
        shared by every settings of it (``optimizer.verify.CampaignCache``)."""
        with self._load_lock:
            if not self.campaigns.has(location, settings, model):
                log.info("loading %s (%s) on %s", model, location, self.config.device)
            return self.campaigns.get(location, settings, model)


def evaluate_task(context: Any, model: str, location: str, arch_id: str, layers: list[dict[str, Any]],
                  origin: str, settings: dict[str, Any]) -> dict[str, Any]:
    """procrastinate's task: measure one architecture, log the attempt in ``archopt_job_log``."""
    state: WorkerState = context.additional_context[CONTEXT_KEY]
    config = state.config
    state.job_started()
    start = time.perf_counter()
    try:
        result = _evaluate(state, context.job.id, model, location, arch_id, layers, origin, settings)
        record_attempt(config.archive_url, config.name, context.job.id, context.job.attempts, "succeeded",
                       time.perf_counter() - start)
        return result
    except BaseException as exc:
        first = str(exc).splitlines()[0][:500] if str(exc) else ""
        record_attempt(config.archive_url, config.name, context.job.id, context.job.attempts, "failed",
                       time.perf_counter() - start, f"{type(exc).__name__}: {first}")
        raise
    finally:
        state.job_ended()


def _evaluate(state: WorkerState, job_id: int, model: str, location: str, arch_id: str,
              layers: list[dict[str, Any]], origin: str, settings: dict[str, Any]) -> dict[str, Any]:
    from archopt.archdb.arch import from_layer_dicts
    from archopt.optimizer.campaign import EvalSettings
    config = state.config
    values = dict(settings)
    values["metrics"] = tuple(values["metrics"])
    values["metric_tokens"] = tuple((m, int(t)) for m, t in values.get("metric_tokens", ()))
    values["device"] = config.device
    values["dtype"] = config.dtype if config.dtype is not None else values.get("dtype")
    values["data_dir"] = config.data_dir
    eval_settings = EvalSettings(**values)

    campaign = state.campaign(location, eval_settings, model)
    arch = from_layer_dicts(campaign.base.spec, layers)
    if arch.arch_id(campaign.name) != arch_id:
        raise QueueError(f"job architecture {arch_id[:12]} does not match the loaded model {campaign.name}")
    result = campaign.run([(arch, origin)]).results[0]
    log.info("job %s: %s %s in %.1fs", job_id, arch_id[:12], "skipped (in archive)" if result.skipped
             else " ".join(f"{m.metric}={m.value:.4g}" for m in result.measurements if ":" not in m.metric),
             result.seconds)
    return {"arch_id": arch_id, "skipped": result.skipped, "seconds": result.seconds, "worker": config.name}
