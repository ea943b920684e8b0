"""``archopt`` as a new process, the way a user types it, timed: for the fail-fast checks of issue 18.

``archopt_env`` gives empty Hugging Face caches and a hub that is offline (``HF_HUB_OFFLINE=1``) or
unreachable (``HF_ENDPOINT`` on a closed local port, no proxy); no test uses the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

FAIL_FAST_S = 3.0
CLOSED_PORT = "http://127.0.0.1:9"


def archopt_env(tmp_path: Path, *, offline: bool, cache: Path | None = None) -> dict[str, str]:
    """A user's environment with empty Hugging Face caches (``cache``: ``ARCHOPT_CACHE``)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(ARCHOPT_DB="", ARCHOPT_CACHE=str(cache or tmp_path / "archopt-cache"), HF_HOME=str(tmp_path / "hf"),
               NO_PROXY="*")
    for name in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(name, None)
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        env.pop("HF_ENDPOINT", None)
    else:
        env.update(HF_HUB_OFFLINE="", HF_DATASETS_OFFLINE="", HF_ENDPOINT=CLOSED_PORT)
    return env


def timed_cli(env: dict[str, str], *args: str) -> tuple[int, list[str], float]:
    """(exit code, non-empty stderr lines, wall seconds) of ``archopt ARGS`` in a new process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from archopt.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()], time.perf_counter() - start


def assert_fails_fast(result: tuple[int, list[str], float], *needles: str) -> None:
    """One ``error:`` line holding every needle, a non-zero exit, within ``FAIL_FAST_S``."""
    code, lines, seconds = result
    assert code != 0, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert seconds < FAIL_FAST_S, f"took {seconds:.2f} s: {lines[0]}"
