"""Searches in worker processes, so that a cold query never holds the web process's GIL.

A search is seconds of Python and NumPy; run in a thread of the web process it would stall every
other request (the event loop waits for the GIL at each switch interval). ``SearchPool`` runs
``run_query`` in ``processes`` spawned processes, each with its own ``Archive`` on the same URL;
the answer (a plain ``archopt.query/1`` dict) or the error comes back pickled.
"""

from __future__ import annotations

import functools
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from archopt.archdb.archive import Archive, ArchiveError

from .documents import RequestError

@functools.cache
def _archive_of(url: str) -> Archive:
    """This worker process's archive on ``url`` (opened by the pool's initializer, then reused)."""
    return Archive(url)


def _start(url: str) -> None:
    _archive_of(url)


def _ready() -> bool:
    """Import the search's modules (scikit-learn, Optuna) before the first query reaches this process:
    ``optimizer.query`` itself imports them only when a query must search."""
    import importlib
    for name in ("query", "search", "training"):
        importlib.import_module(f"archopt.optimizer.{name}")
    return True


def compute_query(archive: Archive, request: Any) -> dict[str, Any]:
    """``run_query`` with the service's error mapping (in a worker process or a thread)."""
    from archopt.optimizer.query import run_query
    try:
        try:
            return run_query(archive, request)
        except ArchiveError:
            # another process stored the same query between our lookup and our insert
            return run_query(archive, request)
    except ValueError as exc:
        if type(exc) is ValueError:  # the search's own checks (e.g. a size below the smallest architecture)
            raise RequestError(str(exc).splitlines()[0]) from None
        raise


def _compute(url: str, request: Any) -> dict[str, Any]:
    return compute_query(_archive_of(url), request)


class SearchPool:
    """``processes`` spawned worker processes answering cold queries (started at once, in the background)."""

    def __init__(self, url: str, processes: int) -> None:
        self.url, self.processes = url, processes
        self._executor = self._new()

    def _new(self) -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start, initargs=(self.url,))
        for _ in range(self.processes):
            executor.submit(_ready)  # imports happen now, not in the first query
        return executor

    def submit(self, request: Any) -> Future:
        try:
            return self._executor.submit(_compute, self.url, request)
        except BrokenProcessPool:  # a worker died (killed, out of memory): start new ones
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new()
            return self._executor.submit(_compute, self.url, request)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
