"""Service load: concurrent clients on loopback against ``archopt serve`` for a fixed time.

    python benchmarks/serve_load.py [--duration 20] [--clients 8] [--workers 1] [--db URL]

Builds an archive (a Llama-2-7B-shaped base model, 300 synthetic evaluated architectures with PPL
and MMLU, predictors trained: "fresh"), starts ``archopt serve`` on 127.0.0.1 in a subprocess, and
runs, for ``--duration`` seconds:

- ``--clients`` threads, each with its own keep-alive connection, asking repeated queries (sizes
  answered once before the clock starts) and, one request in ``--ingest-every``, ingesting a small
  JSONL body (two new architectures of a second base model, so the queried predictors stay fresh);
- one more thread asking cold queries back to back (a new size each time), pausing ``--cold-pause``
  seconds between them.

Prints p50/p95/p99 latency per kind and requests/s, and writes benchmarks/results/serve_load.json.
Goals on the 2-core development machine: repeated query p50 <= 20 ms, >= 200 requests/s, cold
query p99 <= 3 s. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic truths are test helpers

from archopt.archdb import Archive  # noqa: E402
from archopt.archdb.arch import BaseSpec  # noqa: E402
from archopt.archdb.protocol import Protocol  # noqa: E402
from archopt.archdb.records import ArchRecord, BaseModelInfo, ValueRecord  # noqa: E402
from archopt.archdb.store import ingest_records  # noqa: E402
from archopt.optimizer.training import ensure_predictors  # noqa: E402
from helpers.synthetic import SyntheticTruth, random_archive  # noqa: E402  (tests/helpers)

LLAMA2_7B = BaseSpec("llama", 32, 4096, 32, 32, 128, 11008, 32000)
SIDE = BaseSpec("llama", 4, 64, 8, 4, 8, 128, 100)
PPL = Protocol(dataset="wikitext-2-raw-v1", split="test", joining="\n\n", tokenizer="synthetic", seq_len=128,
               tokens=8192)
MMLU = Protocol(dataset="mmlu", split="test", tokenizer="synthetic", shots=5, questions=570)
TOKEN = "serve-load-benchmark-token"
REPEATED = ["5B", "5.5B", "6B", "4.5B"]


def build_archive(url: str, rows: int, seed: int) -> None:
    archive = Archive(url)
    truth = SyntheticTruth(noise=0.01, seed=seed)
    batch = random_archive(LLAMA2_7B, rows, seed=seed, layers=range(3, 30))
    ppl, mmlu = truth.ppl(batch, noisy=True), truth.mmlu(batch, noisy=True)
    info = BaseModelInfo("llama-2-7b-synth", LLAMA2_7B, "hash-llama-2-7b-synth")
    records = [ArchRecord(model=info.name, base=info, architecture=a.layer_dicts(), origin="random",
                          values=(ValueRecord("ppl_wikitext2", float(p), PPL),
                                  ValueRecord("mmlu", float(min(1.0, max(0.0, q))), MMLU)))
               for a, p, q in zip(batch.architectures(), ppl, mmlu)]
    side = BaseModelInfo("side", SIDE, "hash-side")
    records.append(ArchRecord(model="side", base=side, architecture="full", origin="base",
                              values=(ValueRecord("ppl_wikitext2", 30.0, PPL),)))
    with archive.write() as session:
        ingest_records(session, records)
    ensure_predictors(archive, info.name, ["ppl_wikitext2", "mmlu"])
    archive.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Conn:
    """One keep-alive HTTP connection to the service (reconnects when the server closes it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def query_body(size: str, model: str = "llama-2-7b-synth") -> bytes:
    return json.dumps({"model": model, "params": size, "objectives": ["ppl_wikitext2", "mmlu"], "top": 10}).encode()


def side_lines(k: int) -> bytes:
    """Two new architectures of the side model (distinct for every k < 4096)."""
    out = []
    for j in (2 * k, 2 * k + 1):
        kv = 1 + j % 4
        layers = [[2 * kv, kv, 8 * (1 + ((j >> (4 * i)) & 15))] for i in range(3)] + [[8, 4, 128]]
        out.append(json.dumps({"model": "side", "architecture": layers, "origin": "random", "evaluations": [
            {"metric": "ppl_wikitext2", "value": 20.0 + j / 100, "protocol": PPL.to_dict()}]}))
    return ("\n".join(out) + "\n").encode()


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by process ``root`` and its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(pid, 0.0) for pid in tree)


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def summary(ms: list[float]) -> dict[str, Any]:
    return {"count": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99), "max_ms": round(max(ms), 2) if ms else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1, help="archopt serve --workers")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--ingest-every", type=int, default=20, help="one ingest in this many requests of a client")
    ap.add_argument("--cold-pause", type=float, default=1.0, help="seconds between two cold queries")
    ap.add_argument("--db", default=None, help="archive URL (default: a new SQLite file)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = ap.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="archopt-serve-load-"))
    url = args.db or f"sqlite:///{folder / 'archive.db'}"
    t = time.perf_counter()
    build_archive(url, args.rows, args.seed)
    build_s = time.perf_counter() - t
    port = free_port()
    exe = shutil.which("archopt", path=str(Path(sys.executable).parent)) or "archopt"
    env = {**os.environ, "ARCHOPT_TOKEN": TOKEN}
    server = subprocess.Popen([exe, "serve", "--db", url, "--host", "127.0.0.1", "--port", str(port),
                               "--workers", str(args.workers), "--no-access-log", "--log-level", "warning"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if Conn(port).request("GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the server did not start; see {folder / 'server.log'}")
            time.sleep(0.2)
        warm = Conn(port)
        for size in REPEATED:  # answered and stored once, before the clock starts
            status, body = warm.request("POST", "/v1/query", query_body(size))
            assert status == 200, body
        cpu_before = tree_cpu_s(server.pid)
        results = run_load(port, args)
        results["server_cpu_s"] = round(tree_cpu_s(server.pid) - cpu_before, 2)
        results["server_cpu_ms_per_request"] = round(1000 * results["server_cpu_s"] / max(1, results["requests"]), 2)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    results.update(build_seconds=round(build_s, 2), rows=args.rows, clients=args.clients, workers=args.workers,
                   duration_s=args.duration, database=url.split(":")[0],
                   machine={"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()})
    print_summary(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    shutil.rmtree(folder, ignore_errors=True)
    return results


def run_load(port: int, args: argparse.Namespace) -> dict[str, Any]:
    lat: dict[str, list[float]] = {"repeated": [], "cold": [], "ingest": []}
    in_window = 0  # requests answered before the clock stopped (a cold query may end after it)
    failures: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + args.duration
    counter = iter(range(10**9))
    load_before = os.getloadavg()[0]
    cpu_before = time.process_time()

    def record(kind: str, started: float, status: int, body: bytes) -> None:
        nonlocal in_window
        ms = (time.perf_counter() - started) * 1000
        with lock:
            if status == 200:
                lat[kind].append(ms)
                in_window += time.monotonic() <= stop
            else:
                failures.append(f"{kind}: {status} {body[:200]!r}")

    def client(k: int) -> None:
        rng = random.Random(args.seed * 1000 + k)
        conn = Conn(port)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"}
        i = 0
        while time.monotonic() < stop:
            i += 1
            started = time.perf_counter()
            if i % args.ingest_every == 0:
                with lock:
                    n = next(counter)
                status, body = conn.request("POST", "/v1/evaluations", side_lines(n), headers)
                record("ingest", started, status, body)
            else:
                status, body = conn.request("POST", "/v1/query", query_body(rng.choice(REPEATED)))
                record("repeated", started, status, body)

    def cold_client() -> None:
        conn = Conn(port)
        j = 0
        while time.monotonic() < stop:
            j += 1
            size = f"{4.0 + 0.013 * j:.3f}B"  # a new target every time: nothing stored
            started = time.perf_counter()
            status, body = conn.request("POST", "/v1/query", query_body(size))
            record("cold", started, status, body)
            if status == 200 and json.loads(body)["served_from_store"]:
                failures.append(f"cold query {size} was served from the store")
            time.sleep(args.cold_pause)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    threads.append(threading.Thread(target=cold_client))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(len(v) for v in lat.values())
    rate = in_window / args.duration
    return {
        "benchmark": "serve_load",
        "requests": total, "requests_per_s": round(rate, 1),
        "repeated_per_s": round(len(lat["repeated"]) / args.duration, 1), "wall_s": round(wall, 2),
        "repeated": summary(lat["repeated"]), "cold": summary(lat["cold"]), "ingest": summary(lat["ingest"]),
        "failures": failures[:20], "failure_count": len(failures),
        "client_cpu_s": round(time.process_time() - cpu_before, 2), "load_avg_before": round(load_before, 2),
        "goals": {"repeated_p50_ms<=20": (summary(lat["repeated"])["p50_ms"] or 1e9) <= 20,
                  "requests_per_s>=200": rate >= 200,
                  "cold_p99_ms<=3000": (summary(lat["cold"])["p99_ms"] or 1e9) <= 3000},
    }


def print_summary(r: dict[str, Any]) -> None:
    print(f"serve_load: {r['requests']} requests, {r['requests_per_s']} req/s over {r['duration_s']} s "
          f"({r['clients']} clients + 1 cold, {r['workers']} worker(s), {r['database']})")
    for kind in ("repeated", "cold", "ingest"):
        s = r[kind]
        print(f"  {kind:8s} n={s['count']:5d}  p50 {s['p50_ms']} ms  p95 {s['p95_ms']} ms  p99 {s['p99_ms']} ms  "
              f"max {s['max_ms']} ms")
    print(f"  server CPU {r['server_cpu_s']} s ({r['server_cpu_ms_per_request']} ms per request, searches "
          f"included); client CPU {r['client_cpu_s']} s; load average before {r['load_avg_before']}")
    print(f"  failures: {r['failure_count']}; goals met: {r['goals']}")


if __name__ == "__main__":
    main()
