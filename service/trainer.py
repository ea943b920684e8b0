"""Background predictor training: the service never trains inside a query.

One daemon thread per process runs jobs one at a time. A job is ``ensure_predictors`` for one
(base model, metric[, protocol]): with ``force`` it always trains a new version (``POST
/v1/predictors/train``), otherwise it trains only when the newest version is missing or stale.
Submitting a job that is already waiting returns the waiting job's future (no duplicate work).
Stale retrains are debounced: a metric trained less than ``min_interval`` seconds ago waits until
that interval has passed, so a stream of small ingests does not retrain after every one.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from archopt.archdb.archive import Archive

log = logging.getLogger("archopt.service")

JobKey = tuple[str, str, "int | None", bool]


@dataclass
class _Job:
    model: str
    metric: str
    protocol: int | None
    force: bool
    seed: int
    not_before: float
    future: Future = field(default_factory=Future)


class Trainer:
    """A queue of predictor trainings, run by one background thread (started on first use)."""

    def __init__(self, archive: Archive, min_interval: float = 30.0) -> None:
        self.archive = archive
        self.min_interval = min_interval
        self._jobs: dict[JobKey, _Job] = {}
        self._running: _Job | None = None
        self._last: dict[tuple[str, str], float] = {}
        self._errors: dict[tuple[str, str], str] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.trained = 0
        self.listeners: list[Any] = []  # called (in the trainer's thread) after a new version is stored

    def submit(self, model: str, metric: str, *, protocol: int | None = None, force: bool = False,
               seed: int = 0, debounce: bool = False) -> Future:
        """Queue a training of (model, metric); returns a future of ``{metric: version}``."""
        key: JobKey = (model, metric, protocol, force)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the trainer is stopping")
            job = self._jobs.get(key)
            if job is not None:
                if not debounce and job.not_before > time.monotonic():
                    job.not_before = time.monotonic()  # wanted now: do not wait for the debounce
                    self._cond.notify_all()
                return job.future
            not_before = time.monotonic()
            if debounce:
                not_before = max(not_before, self._last.get((model, metric), -1e18) + self.min_interval)
            job = _Job(model, metric, protocol, force, seed, not_before)
            self._jobs[key] = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="archopt-trainer", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return job.future

    def status(self) -> list[dict[str, Any]]:
        """Waiting and running jobs, and the last error of each (model, metric)."""
        with self._cond:
            now = time.monotonic()
            out = [{"model": j.model, "metric": j.metric, "state": "waiting",
                    "starts_in_s": round(max(0.0, j.not_before - now), 1)} for j in self._jobs.values()]
            if self._running is not None:
                out.append({"model": self._running.model, "metric": self._running.metric, "state": "running"})
            out += [{"model": mo, "metric": me, "state": "failed", "error": err}
                    for (mo, me), err in self._errors.items()]
            return out

    def pending(self, model: str, metric: str) -> bool:
        with self._cond:
            running = self._running is not None and (self._running.model, self._running.metric) == (model, metric)
            return running or any((j.model, j.metric) == (model, metric) for j in self._jobs.values())

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, cancel waiting ones and wait for a running one to finish."""
        with self._cond:
            self._stopping = True
            for job in self._jobs.values():
                job.future.cancel()
            self._jobs.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _next(self) -> _Job | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._jobs:
                    key, job = min(self._jobs.items(), key=lambda kv: kv[1].not_before)
                    wait = job.not_before - time.monotonic()
                    if wait <= 0:
                        del self._jobs[key]
                        self._running = job
                        return job
                    self._cond.wait(wait)
                else:
                    self._cond.wait()

    def _loop(self) -> None:
        from archopt.optimizer.training import ensure_predictors
        while (job := self._next()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            started = time.perf_counter()
            try:
                protocols = {job.metric: job.protocol} if job.protocol is not None else None
                trained = ensure_predictors(self.archive, job.model, [job.metric], force=job.force,
                                            protocols=protocols, seed=job.seed)
                result = {k: t.version for k, t in trained.items()}
                retrained = any(t.retrained for t in trained.values())
                with self._cond:
                    self._errors.pop((job.model, job.metric), None)
                    if retrained:
                        self.trained += 1
                        log.info("trained %s %s v%s in %.1f s", job.model, job.metric, result.get(job.metric),
                                 time.perf_counter() - started)
                if retrained:
                    for listener in self.listeners:
                        listener()
                job.future.set_result(result)
            except BaseException as exc:  # noqa: BLE001 - reported through the future and status()
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("training %s %s failed: %s", job.model, job.metric, message)
                with self._cond:
                    self._errors[(job.model, job.metric)] = message
                job.future.set_exception(exc)
            finally:
                with self._cond:
                    self._last[(job.model, job.metric)] = time.monotonic()
                    self._running = None
