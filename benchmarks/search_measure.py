"""The search-quality benchmark's measurement plumbing: one loaded model, a shared cache, token accounting.

``Bench`` loads the base model once (``Campaign``: Taylor importance, archopt's pruning) and
measures for every method through three callbacks, each charging the method's ``Ledger``
(budget.py):

- ``measure(run, archs)``: full evaluations (WikiText-2 raw test and PTB validation, seq 128, the
  first ``--max-tokens`` tokens of each);
- ``measure_cheap(run, archs)``: the cheap fidelity of WikiText-2 perplexity (its first
  ``--screen-tokens`` tokens);
- ``measure_kl(run, archs, windows)``: mean KL(base || pruned) per token on calibration windows
  (``evaluators.kl.KLTask`` on the tokenized WikiText-2 *validation* text, never a test window),
  after ``use_reference(run)`` charged the base model's reference pass once.

- ``heldout(arch)``: the perplexity of a method's pick on text no method searched on, never
  charged (it reports, it does not search): WikiText-2 test tokens after the full protocol's
  ``--max-tokens`` and WikiText-2 validation tokens after the KL pool, ``--heldout-tokens`` of
  each in windows of 128. Every method selects its pick by the full protocol's values, so
  ``d_wikitext2`` carries a selection bias that grows with how many architectures a method
  measured on that text; the held-out values do not.

A SQLite cache (``measure-cache.sqlite`` in the work folder) keyed by (base config hash, canonical
architecture, protocol) makes each measurement once per work folder: a method asking for a value
another method (or an earlier run) measured gets the cached value, charged to it all the same; the
seconds the first measurement took are added to the method's ``seconds_uncached``.
This module is what a product ``optimizer/verify.py`` replaces; methods only call the three
callbacks above and ``MethodRun``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import pickle
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from budget import BudgetSpent, Ledger

METRICS = ("ppl_wikitext2", "ppl_ptb")
OBJECTIVE = "ppl_wikitext2"


_PRUNED = [0]


def heldout_tasks(tokenizer: Any, data_dir: str, n: int, *, test_skip: int, valid_skip: int = 0,
                  prefix: str = "") -> dict[str, Any]:
    """Held-out texts as the product's ``PerplexityTask``s, ``n`` tokens each: ``<prefix>test_heldout``,
    WikiText-2 test after its first ``test_skip`` tokens, and ``<prefix>valid_heldout``, WikiText-2
    validation (``wiki.valid.tokens``, rows joined ``"\\n\\n"``) after its first ``valid_skip``."""
    import torch
    from archopt.evaluators import data
    from archopt.evaluators.perplexity import PerplexityTask
    test = data.dataset_text(data.WIKITEXT2, "test", data_dir)
    valid = data.JOINING.join(data.read_wikitext_rows(Path(data_dir) / "wikitext-2" / "wiki.valid.tokens"))
    out = {}
    for name, text, split, skip in (("test_heldout", test, "test", test_skip),
                                    ("valid_heldout", valid, "validation", valid_skip)):
        ids = torch.tensor(tokenizer(text)["input_ids"][skip:skip + n])
        out[prefix + name] = PerplexityTask(ids, metric="ppl_wikitext2", dataset=data.WIKITEXT2, split=split,
                                            tokenizer_name="", tokenizer_hash="", seq_len=128,
                                            max_tokens=n)   # raises in one line when no window is left
    return out


@contextlib.contextmanager
def pruned(base: Any, arch: Any, importance: Any) -> Iterator[Any]:
    """The pruned model of ``arch``, released afterwards. Unlike ``Evaluator.evaluate_architecture``
    this collects garbage only every 32 models on CPU (``gc.collect`` took 0.2 s, as long as a KL
    pass on 1,024 tokens)."""
    from archopt.evaluators import prune_model
    from archopt.evaluators.evaluator import free_memory
    model = prune_model(base, arch, importance)
    try:
        yield model
    finally:
        del model
        _PRUNED[0] += 1
        if str(base.device) != "cpu" or _PRUNED[0] % 32 == 0:
            free_memory(base.device)


class SharedCache:
    """(kind, base key, architecture, protocol) -> pickled value and the seconds it took."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(str(path))
        self.db.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, kind TEXT, arch TEXT, "
                        "params INTEGER, value BLOB, seconds REAL)")
        self.measured = 0
        self.hits = 0
        self.seconds = 0.0

    @staticmethod
    def key(kind: str, base_key: str, arch: Any, protocol: str) -> str:
        return hashlib.sha256(f"{kind}|{base_key}|{arch.canonical_json()}|{protocol}".encode()).hexdigest()

    def get(self, key: str) -> tuple[Any, float] | None:
        row = self.db.execute("SELECT value, seconds FROM cache WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        self.hits += 1
        return pickle.loads(row[0]), float(row[1])

    def put(self, key: str, kind: str, arch: Any, value: Any, seconds: float) -> None:
        self.measured += 1
        self.seconds += seconds
        self.db.execute("INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?, ?, ?)",
                        (key, kind, arch.canonical_json(), arch.params, pickle.dumps(value), seconds))
        self.db.commit()

    def rows(self, kind: str) -> list[tuple[str, int, Any]]:
        return [(a, int(p), pickle.loads(v)) for a, p, v in
                self.db.execute("SELECT arch, params, value FROM cache WHERE kind = ?", (kind,))]


class CachedEvaluator:
    """Wraps an ``Evaluator`` so that ``Campaign.run`` (archopt's own path) reads the shared cache."""

    def __init__(self, inner: Any, cache: SharedCache, base_key: str, kind: str) -> None:
        self.inner = inner
        self.tasks = inner.tasks
        self.metrics = inner.metrics
        self.cache = cache
        self.base_key = base_key
        self.kind = kind
        self.protocols = ",".join(f"{m}={t.protocol.key()}" for m, t in sorted(inner.tasks.items()))
        self.tokens = sum(int(t.protocol.tokens or 0) for t in inner.tasks.values())

    def __getattr__(self, name: str) -> Any:
        """Anything else (``forwarded_tokens``, ...) is the wrapped evaluator's."""
        return getattr(self.inner, name)

    def lookup(self, arch: Any) -> tuple[list[Any], float] | None:
        return self.cache.get(SharedCache.key(self.kind, self.base_key, arch, self.protocols))

    def evaluate_architecture(self, base: Any, arch: Any, importance: Any) -> list[Any]:
        found = self.lookup(arch)
        if found is not None:
            return found[0]
        t = time.perf_counter()
        with pruned(base, arch, importance) as model:
            out = self.inner.evaluate(model)
        self.cache.put(SharedCache.key(self.kind, self.base_key, arch, self.protocols), self.kind, arch, out,
                       time.perf_counter() - t)
        return out


@dataclass
class MethodRun:
    """One method at one target and seed: its ledger, the full values it saw, its notes."""

    name: str
    target: int
    lo: int
    ledger: Ledger
    seen: dict[str, tuple[Any, dict[str, float]]] = field(default_factory=dict)
    kl_seen: dict[tuple[str, tuple[int, ...]], float] = field(default_factory=dict)
    cheap_seen: dict[str, float] = field(default_factory=dict)
    reference_paid: bool = False
    seconds: float = 0.0
    cpu_seconds: float = 0.0        # CPU time of the process (all threads) while the method ran
    saved_seconds: float = 0.0      # measuring time the shared cache saved this method
    cpu_started: float = field(default_factory=time.process_time)
    notes: dict[str, Any] = field(default_factory=dict)
    final: Any = None               # the architecture the method reports (default: best measured in the window)

    @property
    def full_evaluations(self) -> int:
        return len(self.seen)

    def best(self) -> tuple[Any, dict[str, float]] | None:
        """The method's pick: ``final`` if set, else its best full-evaluated architecture in the window."""
        if self.final is not None:
            got = self.seen.get(self.final.canonical_json())
            return (self.final, got[1]) if got else None
        inside = [(a, v) for a, v in self.seen.values() if self.lo <= a.params <= self.target]
        return min(inside, key=lambda av: av[1][OBJECTIVE]) if inside else None


class Bench:
    """The loaded model, its caches and the measuring callbacks (see the module doc)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from archopt.archdb.archive import Archive
        from archopt.optimizer.campaign import Campaign, EvalSettings, cache_dir
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.archive = Archive(f"sqlite:///{self.work / 'shared.sqlite'}")
        settings = EvalSettings(metrics=METRICS, data_dir=args.data_dir, seq_len=128, max_tokens=args.max_tokens,
                                importance="taylor", device=args.device)
        t = time.perf_counter()
        self.campaign = Campaign(self.archive, args.model, settings)
        self.spec = self.campaign.base.spec
        base_key = self.campaign.base.config_hash
        self.base_key = base_key
        self.cache = SharedCache(self.work / "measure-cache.sqlite")
        self.full = CachedEvaluator(self.campaign.evaluator, self.cache, base_key, "full")
        self.campaign.evaluator = self.full
        # the cheap fidelity (archopt's query --screen): WikiText-2 on the first --screen-tokens tokens
        self.campaign.enable_screening(OBJECTIVE, args.screen_tokens)
        self.cheap = CachedEvaluator(self.campaign.screener, self.cache, base_key, "cheap")
        self.campaign.screener = None
        self.kl_task = self._kl_task(cache_dir() / "tokens")
        self.kl_reference_computed = self.kl_task.prepare_reference(self.campaign.base, cache_dir() / "kl")
        self.load_seconds = time.perf_counter() - t
        self.full_tokens = self.full.tokens
        self.cheap_tokens = self.cheap.tokens
        base = self._measure_full_raw(self._full_arch())[0]
        self.base_values = {m.metric: float(m.value) for m in base if m.metric in METRICS}
        self.heldout_texts = self._heldout_texts()
        self.heldout_base = self.heldout(self._full_arch())

    # ----- set-up ----------------------------------------------------------------------------------
    def _kl_task(self, tokens_cache: Path) -> Any:
        """KL calibration: WikiText-2 validation (the tokenized ``wiki.valid.tokens``, rows joined
        ``"\\n\\n"``) or PTB train, the first ``--kl-pool`` tokens in windows of 128."""
        from archopt.evaluators import data
        from archopt.evaluators.kl import KLTask
        tok = self.campaign.base.tokenizer
        if self.args.kl_text == "ptb-train":
            text, dataset, split = data.dataset_text(data.PTB, "train", self.args.data_dir), data.PTB, "train"
        else:
            rows = data.read_wikitext_rows(Path(self.args.data_dir) / "wikitext-2" / "wiki.valid.tokens")
            text, dataset, split = data.JOINING.join(rows), "wikitext-2-v1", "validation"
        return KLTask.from_text(tok, text, dataset=dataset, split=split, seq_len=128, max_tokens=self.args.kl_pool,
                                cache_dir=tokens_cache)

    def _heldout_texts(self) -> dict[str, Any]:
        """The held-out texts (see the module doc) as the product's ``PerplexityTask``s."""
        n = int(getattr(self.args, "heldout_tokens", 32768))
        return heldout_tasks(self.campaign.base.tokenizer, self.args.data_dir, n, test_skip=self.args.max_tokens,
                             valid_skip=self.args.kl_pool, prefix="wikitext2_")

    def heldout(self, arch: Any) -> dict[str, float]:
        """Held-out perplexities of ``arch`` (not charged; cached)."""
        out = {}
        todo = {}
        for name, task in self.heldout_texts.items():
            key = SharedCache.key("heldout", self.base_key, arch, f"{name}|{task.windows.shape[0]}x128")
            found = self.cache.get(key)
            if found is None:
                todo[name] = (key, task)
            else:
                out[name] = float(found[0])
        if todo:
            with pruned(self.campaign.base, arch, self.campaign.importance) as model:
                for name, (key, task) in todo.items():
                    t = time.perf_counter()
                    nll, count = task.total_nll(model)
                    out[name] = math.exp(nll / count)
                    self.cache.put(key, "heldout", arch, out[name], time.perf_counter() - t)
        return out

    def _full_arch(self) -> Any:
        from archopt.archdb.arch import full
        return full(self.spec)

    def _measure_full_raw(self, arch: Any) -> tuple[list[Any], float, bool]:
        """(measurements, seconds of the first measurement, was it cached)."""
        found = self.full.lookup(arch)
        if found is not None:
            return found[0], found[1], True
        t = time.perf_counter()
        out = self.full.evaluate_architecture(self.campaign.base, arch, self.campaign.importance)
        return out, time.perf_counter() - t, False

    def values_of(self, measurements: Sequence[Any]) -> dict[str, float]:
        """metric -> value; a failed (diverged) measurement counts as an infinite perplexity."""
        out = {}
        for m in measurements:
            if m.metric in METRICS:
                v = float(m.value)
                out[m.metric] = v if v == v else math.inf
        return out

    def run(self, name: str, target: int, lo: int, full_evaluations: float | None = None) -> MethodRun:
        """A new ``MethodRun`` with ``--budget`` full evaluations' worth of tokens (or the given count)."""
        evals = self.args.budget if full_evaluations is None else full_evaluations
        return MethodRun(name, target, lo, Ledger(int(round(evals * self.full_tokens))))

    # ----- the callbacks ------------------------------------------------------------------------------
    def measure(self, run: MethodRun, archs: Sequence[Any], strict: bool = False) -> list[dict[str, float] | None]:
        """Full values of ``archs``; each new one charges a full evaluation. An architecture this
        method measured before is returned without a charge. When the budget is spent the value is
        None (``strict``: ``BudgetSpent`` is raised instead)."""
        out: list[dict[str, float] | None] = []
        for a in archs:
            key = a.canonical_json()
            if key in run.seen:
                out.append(run.seen[key][1])
                continue
            if not run.ledger.can(self.full_tokens):
                if strict:
                    raise BudgetSpent("full evaluation")
                out.append(None)
                continue
            ms, seconds, cached = self._measure_full_raw(a)
            run.ledger.charge("full", self.full_tokens)
            if cached:
                run.saved_seconds += seconds
            values = self.values_of(ms)
            run.seen[key] = (a, values)
            out.append(values)
        return out

    def measure_cheap(self, run: MethodRun, archs: Sequence[Any], strict: bool = True) -> list[float | None]:
        """Cheap-fidelity WikiText-2 perplexities of ``archs`` (``--screen-tokens`` each)."""
        out: list[float | None] = []
        for a in archs:
            key = a.canonical_json()
            if key in run.cheap_seen:
                out.append(run.cheap_seen[key])
                continue
            if not run.ledger.can(self.cheap_tokens):
                if strict:
                    raise BudgetSpent("cheap evaluation")
                out.append(None)
                continue
            found = self.cheap.lookup(a)
            if found is None:
                t = time.perf_counter()
                ms = self.cheap.evaluate_architecture(self.campaign.base, a, self.campaign.importance)
                seconds, cached = time.perf_counter() - t, False
            else:
                (ms, seconds), cached = found, True
            run.ledger.charge("cheap", self.cheap_tokens)
            if cached:
                run.saved_seconds += seconds
            value = self.values_of(ms)[OBJECTIVE]
            run.cheap_seen[key] = value
            out.append(value)
        return out

    def use_reference(self, run: MethodRun) -> None:
        """Charge the base model's reference pass over the KL pool, once per method run."""
        if not run.reference_paid:
            run.ledger.pay("reference", self.kl_task.tokens)
            run.reference_paid = True

    def measure_kl(self, run: MethodRun, archs: Sequence[Any], windows: Sequence[int]) -> list[float]:
        """Mean KL(base || pruned) per token of each architecture on ``windows`` (indices into the
        KL pool); each new (architecture, windows) charges ``len(windows) * 128`` tokens. Raises
        ``BudgetSpent`` before a pass that does not fit."""
        self.use_reference(run)
        wins = tuple(int(w) for w in windows)
        tokens = self.kl_task.tokens_of(wins)
        protocol = self.kl_task.protocol(wins).key()
        out = []
        for a in archs:
            memo = (a.canonical_json(), wins)
            if memo in run.kl_seen:
                out.append(run.kl_seen[memo])
                continue
            run.ledger.pay("kl", tokens)
            key = SharedCache.key("kl", self.base_key, a, protocol)
            found = self.cache.get(key)
            if found is not None:
                value, seconds = found
                run.saved_seconds += seconds
            else:
                t = time.perf_counter()
                with pruned(self.campaign.base, a, self.campaign.importance) as model:
                    value = self.kl_task.mean_kl(model, wins)
                self.cache.put(key, "kl", a, value, time.perf_counter() - t)
            run.kl_seen[memo] = float(value)
            out.append(float(value))
        return out

    def bind_archive(self, path: Path) -> tuple[Any, Any]:
        """A Campaign on a fresh archive of its own, sharing the loaded model and the cache."""
        from archopt.archdb.archive import Archive
        if path.exists():
            path.unlink()
        archive = Archive(f"sqlite:///{path}")
        return self.campaign.bind(archive), archive

    def full_rows(self) -> list[tuple[str, int, dict[str, float]]]:
        """(architecture JSON, params, metric -> value) of every full measurement in the cache."""
        return [(a, p, self.values_of(v)) for a, p, v in self.cache.rows("full")]

    def describe(self) -> dict[str, Any]:
        t = self.kl_task
        return {"full_tokens": self.full_tokens, "cheap_tokens": self.cheap_tokens,
                "heldout": {name: {"windows": int(t.windows.shape[0]), "seq_len": 128,
                                   "base_ppl": round(self.heldout_base[name], 4)}
                            for name, t in self.heldout_texts.items()},
                "kl": {"dataset": t.dataset, "split": t.split, "pool_tokens": t.tokens, "windows": t.n_windows,
                       "seq_len": t.seq_len, "top_k": t.top_k, "reference_key": t.reference_key}}

