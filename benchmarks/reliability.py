"""Reliability under hostile input, crashes and concurrency (the long versions of the tests).

    .venv/bin/python benchmarks/reliability.py                       # >= 10,000 inputs per fuzz path
    .venv/bin/python benchmarks/reliability.py --examples 2000 --kills 5   # a shorter run

What it does and prints:
- fuzzing: every hypothesis check of tests/test_fuzz_inputs.py (ingest of JSONL, CSV, lm-eval JSON and
  files of no telling suffix, on SQLite; a sample on PostgreSQL; sizes, tolerances, architectures,
  CLI arguments) with ``--examples`` inputs per path (``--ingest-examples`` for the paths that go
  through the archive), each path in its own process; inputs tried, accepted and refused per path,
  crashes (a traceback, the CLI's last-resort error line, an exception other than the path's own
  error) and partial writes (a refused input that changed the archive);
- one JSONL file with a single 100 MB line, through ``archopt ingest``: its outcome, time and memory;
- crash safety: ``kill -9`` of ``archopt ingest`` (3 files of 2,500 architectures) at ``--kills``
  random moments on SQLite and on PostgreSQL, and of ``archopt evaluate`` (tiny model): kills that
  landed, archives that passed ``db check``, files found partially written (goal 0), reruns that
  completed without duplicates;
- concurrency: 8 processes (2 ingest, 2 evaluator-style writers, 2 forced trainings, 2 queries) on
  one SQLite archive and one PostgreSQL database: rows lost or duplicated (goal 0).

Results go to benchmarks/results/reliability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAST_PATHS = ["sizes", "tolerances", "parse_architecture"]
ARCHIVE_PATHS = ["ingest_jsonl", "ingest_csv", "ingest_lmeval", "ingest_unknown_suffix", "cli_arguments"]


# --- fuzzing, one path per process ------------------------------------------------------------------
def fuzz_one(name: str) -> dict:
    """Run ``test_fuzz_<name>`` (ARCHOPT_FUZZ_EXAMPLES inputs); in a child process."""
    import test_fuzz_inputs as tf
    folder = Path(tempfile.mkdtemp(prefix="archopt-fuzz-"))
    start = time.monotonic()
    failure = None
    pg = None
    try:
        fn = getattr(tf, f"test_fuzz_{name}")
        if name == "ingest_postgresql":
            pg = _pg_server()
            fn(pg_server=pg, tmp_path=folder)
        elif name in ARCHIVE_PATHS:
            target = tf.make_target(f"sqlite:///{folder / 'fuzz.db'}", folder / "files")
            os.chdir(folder)
            kwargs = {"monkeypatch_cwd": None} if name == "cli_arguments" else {}
            try:
                fn(target=target, **kwargs)
            finally:
                target.close()
        else:
            fn()
    except BaseException as exc:  # noqa: BLE001 - a failing input: recorded
        failure = f"{type(exc).__name__}: {str(exc)[:2000]}"
    finally:
        if pg is not None:
            pg.close()
        os.chdir(ROOT)
        shutil.rmtree(folder, ignore_errors=True)
    stats = {k: v for k, v in tf.STATS.items()}
    total = {"inputs": sum(s["inputs"] for s in stats.values()), "accepted": sum(s["accepted"] for s in stats.values()),
             "refused": sum(s["refused"] for s in stats.values())}
    partial = 1 if failure and "changed the archive" in failure else 0
    return {"path": name, **total, "crashes": 1 if failure and not partial else 0, "partial_writes": partial,
            "failure": failure, "seconds": round(time.monotonic() - start, 1)}


class _Pg:
    def __init__(self) -> None:
        import pgserver
        from conftest import PgServer
        self.folder = tempfile.mkdtemp(prefix="archopt-pg-")
        self.server = pgserver.get_server(self.folder, cleanup_mode="delete")
        self.pg = PgServer(self.server.get_uri())

    def new_database(self, prefix: str = "b") -> str:
        return self.pg.new_database(prefix)

    def drop_database(self, url: str) -> None:
        self.pg.drop_database(url)

    def close(self) -> None:
        try:
            self.server.cleanup()
        except Exception:  # noqa: BLE001
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


def _pg_server() -> _Pg | None:
    try:
        return _Pg()
    except Exception as exc:  # noqa: BLE001
        print(f"(no PostgreSQL: {exc})", file=sys.stderr)
        return None


def fuzz_all(examples: int, ingest_examples: int, jobs: int, only: set[str] | None = None) -> list[dict]:
    plan = [(p, examples) for p in FAST_PATHS] + [(p, ingest_examples) for p in ARCHIVE_PATHS] + \
        [("ingest_postgresql", ingest_examples)]  # that test runs a quarter of ARCHOPT_FUZZ_EXAMPLES
    plan = [(p, n) for p, n in plan if not only or p in only]
    running: list[tuple[str, subprocess.Popen]] = []
    results = []
    env_base = {**os.environ, "OMP_NUM_THREADS": "1"}
    queue = list(plan)
    while queue or running:
        while queue and len(running) < jobs:
            name, n = queue.pop(0)
            env = {**env_base, "ARCHOPT_FUZZ_EXAMPLES": str(n)}
            proc = subprocess.Popen([sys.executable, __file__, "--fuzz-path", name], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((name, proc))
        time.sleep(0.5)
        for name, proc in list(running):
            if proc.poll() is not None:
                out, err = proc.communicate()
                running.remove((name, proc))
                try:
                    row = json.loads(out.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    row = {"path": name, "inputs": 0, "crashes": 1, "partial_writes": 0,
                           "failure": f"worker died: {err[-1500:]}"}
                results.append(row)
                print(f"  fuzz {row['path']:<24} inputs {row['inputs']:>6}  accepted {row.get('accepted', 0):>5}  "
                      f"refused {row.get('refused', 0):>6}  crashes {row['crashes']}  partial writes "
                      f"{row['partial_writes']}  ({row.get('seconds', '?')} s)", flush=True)
                if row.get("failure"):
                    print(f"    FAILURE: {row['failure'][:600]}", flush=True)
    return results


# --- one 100 MB line --------------------------------------------------------------------------------
def huge_line(folder: Path, mb: int = 100) -> dict:
    from test_archdb_concurrency import archopt_command, line_of
    from conftest import TINY_BASE
    url = f"sqlite:///{folder / 'huge.db'}"
    seed = folder / "seed.jsonl"
    seed.write_text(json.dumps({"model": "tiny", "base_model": TINY_BASE}) + "\n" + json.dumps(line_of(1)) + "\n")
    cmd = archopt_command()
    subprocess.run([*cmd, "--db", url, "ingest", str(seed)], check=True, capture_output=True)
    before = subprocess.run([*cmd, "--db", url, "export"], check=True, capture_output=True).stdout
    path = folder / "huge.jsonl"
    line = line_of(2)
    line["origin"] = "x" * (mb * 1024 * 1024)
    with open(path, "w") as handle:
        handle.write(json.dumps(line) + "\n")
    start = time.monotonic()
    proc = subprocess.run([*cmd, "--db", url, "ingest", str(path)], capture_output=True, text=True)
    seconds = time.monotonic() - start
    after = subprocess.run([*cmd, "--db", url, "export"], check=True, capture_output=True).stdout
    err_lines = [x for x in proc.stderr.splitlines() if x.strip()]
    path.unlink()
    return {"mb": mb, "exit": proc.returncode, "error": err_lines[0][:200] if err_lines else None,
            "one_line": len(err_lines) == 1 and "Traceback" not in proc.stderr, "seconds": round(seconds, 2),
            "archive_unchanged": before == after,
            "children_max_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


# --- kills ------------------------------------------------------------------------------------------
def kills(n: int, n_eval: int, pg: _Pg | None, folder: Path) -> dict:
    import test_crash_safety as tc
    rng = random.Random(11)
    out = {"ingest_sqlite": [], "ingest_postgresql": [], "evaluate_sqlite": []}
    summary = {"kills_tried": 0, "kills_landed": 0, "survived": 0, "partial_writes": 0, "failures": []}

    def one(kind: str, fn, *args) -> None:
        summary["kills_tried"] += 1
        try:
            row = fn(*args)
            out[kind].append(row)
            summary["kills_landed"] += int(row["killed"])
            summary["survived"] += 1
        except AssertionError as exc:
            summary["partial_writes"] += int("partial" in str(exc))
            summary["failures"].append(f"{kind}: {str(exc)[:500]}")
        except Exception as exc:  # noqa: BLE001
            summary["failures"].append(f"{kind}: {type(exc).__name__}: {str(exc)[:500]}")

    for i in range(n):
        one("ingest_sqlite", tc.ingest_kill_round, f"sqlite:///{folder / f'k{i}.db'}", folder / f"k{i}",
            rng.uniform(0.0, 0.4))
    if pg is not None:
        for i in range(max(1, n // 3)):
            url = pg.new_database()
            one("ingest_postgresql", tc.ingest_kill_round, url, folder / f"p{i}", rng.uniform(0.0, 0.4))
            pg.drop_database(url)
    if n_eval:
        model_dir, data = tc.tiny_setup(folder / "tiny")
        for i in range(n_eval):
            one("evaluate_sqlite", tc.evaluate_kill_round, f"sqlite:///{folder / f'e{i}.db'}", model_dir, data,
                rng.uniform(3.0, 8.0), folder / f"e{i}")
    for kind, rows in out.items():
        landed = sum(r["killed"] for r in rows)
        print(f"  kill -9 {kind:<18} rounds {len(rows)}, landed {landed}, survived {len(rows)} "
              f"(delays {[r['after_s'] for r in rows]})", flush=True)
    return {**summary, "rounds": out}


# --- concurrency ------------------------------------------------------------------------------------
def concurrency(pg: _Pg | None, folder: Path, scale: int) -> dict:
    import test_concurrency_mixed as tm
    out = {}
    out["sqlite"] = tm.run_mix(f"sqlite:///{folder / 'mix.db'}", folder / "mix-sqlite", scale)
    if pg is not None:
        url = pg.new_database()
        out["postgresql"] = tm.run_mix(url, folder / "mix-pg", scale)
        pg.drop_database(url)
    for backend, fig in out.items():
        print(f"  8 processes on {backend:<10} rows {fig['rows_expected']}, lost {fig['lost']}, duplicated "
              f"{fig['duplicated']}, wrong {fig['wrong']}, predictor versions {fig['predictor_versions']} "
              f"({fig['seconds']} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10000, help="inputs per fast fuzz path")
    ap.add_argument("--ingest-examples", type=int, default=10000, help="inputs per archive fuzz path")
    ap.add_argument("--kills", type=int, default=10, help="kill -9 rounds of ingest on SQLite (a third on PostgreSQL)")
    ap.add_argument("--eval-kills", type=int, default=3)
    ap.add_argument("--scale", type=int, default=2, help="rows of the concurrency mix, x 60 per ingest writer")
    ap.add_argument("--jobs", type=int, default=2, help="fuzz paths run at once")
    ap.add_argument("--skip", default="", help="comma-separated: fuzz,huge,kills,concurrency")
    ap.add_argument("--paths", default="", help="comma-separated fuzz paths to run (default: all)")
    ap.add_argument("--fuzz-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fuzz_path:
        print(json.dumps(fuzz_one(args.fuzz_path)))
        return
    skip = set(filter(None, args.skip.split(",")))
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="archopt-rel-"))
    results: dict = {"benchmark": "reliability", "machine": platform.machine(), "cpus": os.cpu_count(),
                     "python": platform.python_version(), "examples": args.examples,
                     "ingest_examples": args.ingest_examples}
    try:
        import atheris  # noqa: F401
        results["atheris"] = "installed; not used (hypothesis drives every path)"
    except ImportError:
        results["atheris"] = "not installed"
    pg = None
    try:
        if "fuzz" not in skip:
            print("== fuzzing", flush=True)
            results["fuzz"] = fuzz_all(args.examples, args.ingest_examples, args.jobs,
                                       set(filter(None, args.paths.split(","))) or None)
        if "huge" not in skip:
            print("== one 100 MB line", flush=True)
            results["huge_line"] = huge_line(folder)
            print(f"  {results['huge_line']}", flush=True)
        pg = _pg_server() if not {"kills", "concurrency"} <= skip else None
        if "kills" not in skip:
            print("== kill -9", flush=True)
            results["kills"] = kills(args.kills, args.eval_kills, pg, folder)
        if "concurrency" not in skip:
            print("== concurrency", flush=True)
            results["concurrency"] = concurrency(pg, folder, args.scale)
    finally:
        if pg is not None:
            pg.close()
        shutil.rmtree(folder, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / "reliability.json"
    out.parent.mkdir(exist_ok=True)
    if (skip or args.paths) and out.exists():  # a partial run replaces the sections it ran, keeps the others
        previous = json.loads(out.read_text())
        if "fuzz" in results:  # merged by path
            ran = {r["path"] for r in results["fuzz"]}
            results["fuzz"] = [r for r in previous.get("fuzz", []) if r["path"] not in ran] + results["fuzz"]
        previous.update({k: v for k, v in results.items() if k in ("fuzz", "huge_line", "kills", "concurrency")})
        previous.setdefault("reruns", []).append({"skip": sorted(skip), "args": vars(args)})
        results = previous
    fuzz = results.get("fuzz", [])
    conc = results.get("concurrency", {})
    kill = results.get("kills", {})
    results["summary"] = {
        "inputs_per_path": {r["path"]: r["inputs"] for r in fuzz},
        "crashes": sum(r["crashes"] for r in fuzz),
        "partial_writes": sum(r["partial_writes"] for r in fuzz) + kill.get("partial_writes", 0),
        "kills_tried": kill.get("kills_tried"),
        "kills_landed": kill.get("kills_landed"),
        "kills_survived": kill.get("survived"),
        "concurrency_lost": sum(f["lost"] for f in conc.values()),
        "concurrency_duplicated": sum(f["duplicated"] for f in conc.values()),
        "seconds_this_run": round(time.monotonic() - started, 1),
    }
    print("== summary")
    for key, value in results["summary"].items():
        print(f"  {key}: {value}")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
