"""Wall time of ``archopt`` command lines as a user types them, next to ``python -c "import click, rich"``.

Each command runs as a new process (the console script of this environment), in one run on the
same machine, so start-up (interpreter, imports) is counted:

- ``archopt --help`` and ``archopt models`` (no SQL work beyond listing);
- a stored ``archopt query`` (the second identical query: answered from the archive's store);
- a cold ``archopt query`` (a new seed: predictors loaded, a search over 20,000 candidates);
- the baseline: ``python -c "import click, rich"`` (the least any click + rich CLI pays).

The archive is a fresh SQLite file of the bundled ``examples/ptb-llama-8l.jsonl`` with trained
predictors (set-up not timed). The processes run as an installed archopt does, their modules
byte-compiled once (into a private ``PYTHONPYCACHEPREFIX``; ``PYTHONDONTWRITEBYTECODE`` is
dropped). Figures are the median (and min, max) of ``--repeats`` runs, the cases interleaved; the
load average is recorded, and each process's CPU time (user + system) beside its wall time,
because other processes on a shared machine add to every wall time alike.

    python benchmarks/cli_latency.py [--repeats 7] [--label TEXT] [--out FILE]

Goals (issue 18, on the 2-core machine): ``--help`` <= 0.35 s and a stored query <= 0.6 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ptb-llama-8l.jsonl"
GOALS = {"help": 0.35, "stored_query": 0.6}


def archopt_command() -> list[str]:
    """The ``archopt`` console script beside this interpreter (else ``python -m``-style entry)."""
    script = Path(sys.executable).with_name("archopt")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from archopt.cli import main; main()"]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one process; a failure stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def summary(runs: list[tuple[float, float]]) -> dict[str, Any]:
    wall, cpu = [w for w, _ in runs], [c for _, c in runs]
    return {"median_s": round(statistics.median(wall), 4), "min_s": round(min(wall), 4),
            "max_s": round(max(wall), 4), "cpu_median_s": round(statistics.median(cpu), 4),
            "runs": [round(v, 4) for v in wall]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cli_latency.json")
    parser.add_argument("--label", default="", help="What code ran (recorded), e.g. an older commit on PYTHONPATH.")
    args = parser.parse_args()
    archopt = archopt_command()
    folder = tempfile.mkdtemp(prefix="archopt-cli-latency-")
    db = f"sqlite:///{folder}/archive.db"
    env = {**os.environ, "ARCHOPT_DB": db, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           # as an installed archopt runs: modules byte-compiled once and reused (a private cache,
           # so the source tree stays clean even where PYTHONDONTWRITEBYTECODE is set)
           "PYTHONPYCACHEPREFIX": f"{folder}/pycache"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    query = ["query", "--model", "ptb-llama-8l", "--params", "80%", "--top", "5"]
    for step in (["ingest", str(EXAMPLE)], ["predictors", "train", "--model", "ptb-llama-8l"], query, ["--help"]):
        timed([*archopt, *step], env)  # set-up: byte-compiles, and stores the answer the stored query reads
    timed([sys.executable, "-c", "import click, rich"], env)

    cases = {
        "baseline_import_click_rich": [sys.executable, "-c", "import click, rich"],
        "help": [*archopt, "--help"],
        "models": [*archopt, "models"],
        "stored_query": [*archopt, *query],
    }
    load_before = os.getloadavg()[0]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in [*cases, "cold_query"]}
    for i in range(args.repeats):  # interleaved, so a burst of load touches every case alike
        for name, argv in cases.items():
            times[name].append(timed(argv, env))
        times["cold_query"].append(timed([*archopt, *query, "--seed", str(1000 + i)], env))
    results = {name: summary(values) for name, values in times.items()}
    doc = {
        "benchmark": "cli_latency", "label": args.label, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)},
        "goals_s": GOALS, "results": results,
        "met": {name: results[name]["median_s"] <= goal for name, goal in GOALS.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'command':<34}{'median':>9}{'min':>9}{'max':>9}{'CPU':>9}   goal (wall, median)")
    labels = {"baseline_import_click_rich": 'python -c "import click, rich"', "help": "archopt --help",
              "models": "archopt models", "stored_query": "archopt query (stored answer)",
              "cold_query": "archopt query (cold, new seed)"}
    for name, label in labels.items():
        r = results[name]
        goal = f"<= {GOALS[name]} s" if name in GOALS else ""
        figures = "".join(f"{r[key]:>8.3f}s" for key in ("median_s", "min_s", "max_s", "cpu_median_s"))
        print(f"{label:<34}{figures}   {goal}")
    print(f"load average before/after: {load_before:.2f}/{doc['machine']['load_average_after']:.2f}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
