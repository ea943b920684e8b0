"""Issue 16, bug 5: no process-wide state toggled per call. ``single_thread`` used from several threads at
once restores the process' thread limits as they were; a search leaves Optuna's logging as it found it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pytest

from archopt.archdb.arch import BaseSpec
from archopt.optimizer import search

from helpers.synthetic import OraclePredictor, SyntheticTruth


# Run in a fresh process, where only worker threads touch the thread pools: once the main thread has
# set OpenBLAS's limit, this OpenBLAS ignores the calls of other threads (an earlier test in this
# process may have done so), and the service's request and trainer threads are worker threads.
SCENARIOS = r"""
import json, sys, threading
import numpy as np
from threadpoolctl import threadpool_info
from archopt.optimizer.predictors import single_thread

np.dot(np.ones((4, 4)), np.ones((4, 4)))
def limits():
    return sorted({lib["num_threads"] for lib in threadpool_info()})
def in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.update(fn()))
    t.start(); t.join(60)
    return out

def overlap():
    # A enters, B enters, A leaves while B still needs one thread, B leaves
    a_in, a_may_leave, a_left, b_in = (threading.Event() for _ in range(4))
    seen = {}
    def a():
        with single_thread():
            a_in.set(); a_may_leave.wait(120)
        a_left.set()
    def b():
        a_in.wait(120)
        with single_thread():
            b_in.set(); a_left.wait(120)
            seen["b_after_a_left"] = limits()
    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start(); tb.start(); b_in.wait(120); a_may_leave.set(); ta.join(120); tb.join(120)
    seen["after"] = in_thread(lambda: {"v": limits()})["v"]
    return seen

def hammer():
    bad = []
    start = threading.Barrier(6)  # waits below: generous, a loaded 2-core machine is slow
    def worker():
        start.wait(120)
        for _ in range(40):
            with single_thread():
                if limits() != [1]:
                    bad.append(limits())
    ts = [threading.Thread(target=worker) for _ in range(6)]
    for t in ts: t.start()
    for t in ts: t.join(60)
    return {"bad": bad[:3], "after": in_thread(lambda: {"v": limits()})["v"]}

before = in_thread(lambda: {"v": limits()})["v"]
print(json.dumps({"before": before, **{sys.argv[1]: {"overlap": overlap, "hammer": hammer}[sys.argv[1]]()}}))
"""


def scenario(name: str) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", SCENARIOS, name], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out["before"] == [1]:
        pytest.skip("the thread pools start with one thread here: nothing to observe")
    return out


def test_overlapping_users_restore_the_limits_as_they_were():
    """A enters, B enters, A leaves (B still needs one thread), B leaves (the old limits are back)."""
    out = scenario("overlap")
    assert out["overlap"]["b_after_a_left"] == [1], "the first user to leave restored the limits under the second"
    assert out["overlap"]["after"] == out["before"]


def test_many_threads_hammering_leave_the_limits_as_they_were():
    out = scenario("hammer")
    assert out["hammer"]["bad"] == [], "a thread inside single_thread ran with more than one thread"
    assert out["hammer"]["after"] == out["before"]


SMALL = BaseSpec("llama", 8, 256, 8, 4, 32, 688, 1000)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_search_leaves_optuna_logging_alone(monkeypatch):
    import optuna
    truth = SyntheticTruth(noise=0.0, seed=3)
    oracle = {"ppl_x": OraclePredictor(truth, "ppl_x", SMALL)}
    real_set, old = optuna.logging.set_verbosity, optuna.logging.get_verbosity()
    real_set(optuna.logging.INFO)
    calls: list[int] = []
    monkeypatch.setattr(optuna.logging, "set_verbosity", lambda level: calls.append(level))
    capture = Capture()
    root = logging.getLogger("optuna")
    root.addHandler(capture)
    try:
        done = threading.Event()
        result = {}

        def run():
            result["res"] = search(SMALL, oracle, target_params=int(0.7 * SMALL.total_params), objectives=("ppl_x",),
                                   seed=0, n_candidates=600, optuna_trials=4, optuna_batch=2)
            done.set()

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(120)
        assert done.is_set() and result["res"].best is not None
        assert calls == [], "search toggled Optuna's process-wide verbosity"
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
        assert not [r for r in capture.records if "study created" in r.getMessage()], "the search's study was noisy"
        # another study in this thread (not a search) still logs as the user asked
        optuna.create_study()
        assert [r for r in capture.records if "study created" in r.getMessage()]
    finally:
        root.removeHandler(capture)
        real_set(old)
