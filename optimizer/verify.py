"""Verification: measuring a query's candidates for real, under the protocols its predictors learn from.

``archopt query --verify K`` (one round or ``--rounds R``), ``--queue`` (jobs for workers), the
workers and benchmarks/search_quality.py all measure through this module:

- ``measurement_settings``: one ``EvalSettings`` per group of metrics that share protocol options.
  Each objective with a predictor is measured under that predictor's own protocol (its window,
  tokens, split, questions, shots), so the next query learns from the result; other metrics under
  their default protocol in the archive, else the caller's defaults (``metric_protocols``). Two perplexities under protocols of different token counts are two groups.
- ``CampaignCache``: loaded campaigns by (weights, settings). A base model is loaded and its
  importance computed once; settings that differ only in what they measure reuse it.
- ``Verifier``: the measure / measure-cheap / strong-starts callbacks of ``optimizer.loop.verify_loop``
  and the one-round ``verify`` of ``archopt query --verify K``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

from archopt.archdb import reads
from archopt.archdb.arch import Architecture, from_layer_dicts, full
from archopt.archdb.archive import Archive
from archopt.archdb.errors import ArchoptError
from archopt.archdb.metrics import metric_info
from archopt.archdb.store import spec_of

from .campaign import Campaign, CampaignError, CampaignReport, EvalSettings

OnResult = Callable[[int, int, Any], Any]
PROPOSALS = 24   # the profile's next-best integer-program solutions offered to each round

__all__ = ["CampaignCache", "VerifyError", "Verifier", "budget_tokens", "measure_profile", "measurement_settings",
           "metric_protocols", "origin_of", "reachable", "shortfall", "standing"]


class VerifyError(ArchoptError, RuntimeError):
    """Verification cannot run (weights out of reach, a model that does not load): one line."""


def measure_profile(campaign: Campaign, metric: str, tokens: int | None = None,
                    on_result: OnResult | None = None) -> Any:
    """The base model's sensitivity profile (``optimizer.profile.Profile``) of a perplexity or
    ``kl_base`` ``metric`` on a cheap fidelity of ``campaign``'s protocol (``tokens``; default an eighth):
    the single-layer variants the archive lacks are measured (origin ``profile``), the rest read
    back, so any later query or run of the same base model and protocol reuses them. None for a
    metric without a damage scale (``profile.damage_scale``), when the protocol is too short for a
    cheaper fidelity or when the base has no value."""
    from .profile import Profile, damage_scale, profile_variants
    spec = campaign.base.spec
    if damage_scale(metric) is None:
        return None
    try:
        cheap = campaign.cheap_evaluator(metric, tokens)
    except CampaignError:
        return None
    variants = profile_variants(spec)
    values = campaign.cheap_values([full(spec)] + [v.architecture for v in variants], metric, cheap, "profile",
                                   on_result)
    if values[0] is None:
        return None
    return Profile.from_values(spec, variants, values[1:], values[0], log_scale=damage_scale(metric) == "log")


def budget_tokens(campaign: Campaign, metric: str, evaluations: float) -> int:
    """Tokens per single-layer variant for a sensitivity profile of ``metric`` that costs about
    ``evaluations`` full evaluations' worth of ``campaign``'s protocol: whole windows, at least one,
    at most the default cheap fidelity's (``Campaign.cheap_evaluator``)."""
    from .profile import profile_variants
    protocol = campaign.evaluator.tasks[metric].protocol
    full_tokens = int(protocol.tokens or 0)
    seq = int(protocol.seq_len or campaign.settings.seq_len)
    per_variant = evaluations * full_tokens / (len(profile_variants(campaign.base.spec)) + 1)
    return int(min(max(seq, per_variant // seq * seq), max(8 * seq, full_tokens // 8)))


def measurement_settings(protocols: dict[str, dict[str, Any]], metrics: Sequence[str],
                         defaults: EvalSettings) -> list[EvalSettings]:
    """``EvalSettings`` groups measuring every metric of ``metrics``: a metric with an entry in
    ``protocols`` (metric -> protocol dict, as ``reads.protocol_dict`` gives) under that protocol's
    options, the others under ``defaults``. Metrics whose options agree share a group."""
    groups: dict[EvalSettings, list[tuple[str, dict[str, Any]]]] = {}
    for metric in dict.fromkeys(metrics):
        options = _protocol_options(metric, protocols.get(metric), defaults)
        own = {k: options.pop(k) for k in ("tokens", "ptb_split") if k in options}  # what only this metric reads
        groups.setdefault(dataclasses.replace(defaults, metrics=(), metric_tokens=(), **options), []).append(
            (metric, own))
    return [dataclasses.replace(s, metrics=tuple(m for m, _ in members),
                                metric_tokens=tuple((m, own["tokens"]) for m, own in members if own.get("tokens")),
                                **{k: v for _, own in members for k, v in own.items() if k == "ptb_split"})
            for s, members in groups.items()]


def metric_protocols(archive: Archive, doc: dict[str, Any], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Metric -> the protocol (``reads.protocol_dict``) to measure it under for a query document:
    its predictor's protocol, else the metric's default protocol in the archive (most evaluations),
    else none (the command line's options then decide)."""
    chosen = {m: pid for m, pid in doc.get("predictor_protocols", {}).items() if pid is not None}
    with archive.read() as session:
        base = reads.get_base_model(session, doc["model"])
        for metric in metrics:
            if metric not in chosen:
                pid = reads.default_protocol(session, base, metric)
                if pid is not None:
                    chosen[metric] = pid
        return {metric: reads.protocol_dict(session, pid) for metric, pid in chosen.items() if metric in metrics}


def _protocol_options(metric: str, p: dict[str, Any] | None, defaults: EvalSettings) -> dict[str, Any]:
    """The ``EvalSettings`` fields that decide ``metric``'s protocol (``tokens``: a perplexity's or
    ``kl_base``'s own token count, for ``metric_tokens``; ``kl_base``'s text and top-k); fields it ignores keep the defaults so that metrics of one
    protocol family group together. A protocol's precision decides the dtype unless the command
    line chose one."""
    options: dict[str, Any] = {}
    if p is not None and defaults.dtype is None:
        options["dtype"] = p.get("precision") or "float32"
    if metric.startswith("ppl"):
        if p is not None:
            options.update(seq_len=p.get("seq_len") or defaults.seq_len, tokens=p.get("tokens"))
        if metric == "ppl_ptb" and p is not None and p.get("split") in ("validation", "test"):
            options["ptb_split"] = p["split"]
    elif metric == "kl_base" and p is not None:
        from archopt.evaluators.kl import KL_TEXTS   # only when a kl_base protocol is in play
        text = next((name for name, (dataset, split) in KL_TEXTS.items()
                     if dataset == p.get("dataset") and split == p.get("split")), None)
        options.update(seq_len=p.get("seq_len") or defaults.seq_len, tokens=p.get("tokens"),
                       kl_top_k=int((p.get("extra") or {}).get("top_k") or 0) or None)
        if text is not None:
            options["kl_text"] = text
    elif metric == "mmlu" and p is not None:
        options.update(max_questions=p.get("questions"),
                       shots=p["shots"] if p.get("shots") is not None else defaults.shots)
    return options


def origin_of(row: dict[str, Any]) -> str:
    """The archive origin of a verified result row: a strong start of ``verify_loop`` as
    ``starts.start_origin`` says (``uniform``, ``rule`` or ``search``), anything else ``verify``."""
    if row.get("origin") == "start":
        from .starts import start_origin
        return start_origin(str(row.get("start")))
    return "verify"


def standing(archive: Archive, doc: dict[str, Any]) -> dict[str, Any] | None:
    """Where the best measured architecture of a query's window stands against the best rule of
    thumb (origin ``uniform`` or ``rule``) measured there, on the first objective under its
    predictor's protocol: ``{"objective", "best": {arch_id, value}, "best_rule": {...} | None,
    "ratio": best / best_rule}``; None when nothing in the window is measured."""
    objective = doc["objectives"][0]
    pid = doc.get("predictor_protocols", {}).get(objective)
    if pid is None:
        return None
    lo, hi = doc["window"]
    sign = -1.0 if metric_info(objective, strict=False).higher_is_better else 1.0
    with archive.read() as session:
        base = reads.get_base_model(session, doc["model"])
        inside = [(a.arch_hash, a.origin, v) for a, v, _ in reads.training_pairs(session, base, objective, pid)
                  if lo <= a.params <= hi]
    if not inside:
        return None
    best = min(inside, key=lambda t: sign * t[2])
    rules = [t for t in inside if t[1] in ("uniform", "rule")]
    rule = min(rules, key=lambda t: sign * t[2]) if rules else None
    return {"objective": objective, "best": {"arch_id": best[0], "origin": best[1], "value": best[2]},
            "best_rule": {"arch_id": rule[0], "origin": rule[1], "value": rule[2]} if rule else None,
            "ratio": best[2] / rule[2] if rule and rule[2] else None}


def shortfall(doc: dict[str, Any], k: int) -> str | None:
    """Why ``--verify k`` measures fewer than ``k`` architectures of a query answer (it has fewer
    results; some are measured already), in one line; None when it measures ``k``."""
    rows = doc["results"][:k]
    done = [r for r in rows if all(r["measured"].get(o) is not None for o in doc["objectives"])]
    reasons = []
    if len(rows) < k:
        reasons.append(f"the answer holds only {len(rows)} architecture{'s' if len(rows) != 1 else ''} (the Pareto "
                       "front at this size; a wider --tolerance, or --rounds 2, which fills each round with the next "
                       "best, gives more)")
    if done:
        reasons.append(f"{len(done)} of {'them' if len(rows) > 1 else 'it'} (#{', #'.join(str(r['rank']) for r in done)}) "
                       "measured in the archive already under the predictors' protocols")
    if not reasons:
        return None
    todo = len(rows) - len(done)
    return f"--verify {k} measures {todo} architecture{'s' if todo != 1 else ''}: " + "; ".join(reasons)


def reachable(location: str | None) -> bool:
    """A local model directory, or something that looks like a hub id (``org/name``)."""
    if not location:
        return False
    path = Path(location)
    return path.is_dir() or ("/" in location and not path.exists() and not location.startswith((".", "/")))


class CampaignCache:
    """Loaded campaigns by (weights location, settings), sharing one loaded base model (and its
    importance) between settings that differ only in what they measure. Not thread-safe: one per
    thread, or guard it."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self._campaigns: dict[tuple[str, str, EvalSettings], Campaign] = {}

    def has(self, location: str, settings: EvalSettings, name: str) -> bool:
        """True when ``get`` would load nothing (this model is loaded already)."""
        return any(loc == location and n == name and _same_model(s, settings) for loc, n, s in self._campaigns)

    def get(self, location: str, settings: EvalSettings, name: str) -> Campaign:
        key = (location, name, settings)
        found = self._campaigns.get(key)
        if found is not None:
            return found
        loaded = next((c for (loc, n, s), c in self._campaigns.items()
                       if loc == location and n == name and _same_model(s, settings)), None)
        try:
            campaign = (loaded.measuring(settings) if loaded is not None
                        else Campaign(self.archive, location, settings, name))
        except (CampaignError, OSError) as exc:
            raise VerifyError(f"cannot verify: {str(exc).splitlines()[0]}") from None
        self._campaigns[key] = campaign
        return campaign

    def forwarded_tokens(self) -> int:
        """Tokens every campaign of this cache has put through pruned models (and through the base
        for the ``kl_base`` references it computed)."""
        return sum(c.forwarded_tokens for c in self._campaigns.values())


def _same_model(a: EvalSettings, b: EvalSettings) -> bool:
    """Two settings that load the same weights and compute the same importance."""
    fields = ("data_dir", "importance", "calibration_samples", "calibration_seq_len", "device", "dtype", "seed")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


class Verifier:
    """Measures architectures of one base model under the protocols of a query's predictors.

    ``defaults`` holds the evaluation options of the command line (device, data, importance, and
    the protocol options of metrics without a predictor). ``extra_metrics`` are measured too.
    """

    def __init__(self, archive: Archive, model: str, defaults: EvalSettings, *, weights: str | None = None,
                 extra_metrics: Sequence[str] = (), cache: CampaignCache | None = None) -> None:
        self.archive = archive
        self.defaults = defaults
        self.extra_metrics = tuple(extra_metrics)
        self.cache = cache or CampaignCache(archive)
        with archive.read() as session:
            base = reads.get_base_model(session, model)
            self.model, self.spec = base.name, spec_of(base)
            self.location = weights or base.location
        if not reachable(self.location):
            raise VerifyError(f"cannot verify: the weights of {self.model} are not reachable "
                              f"({self.location or 'no location recorded'}); pass --weights PATH")
        self.screen_tokens: int | None = None
        self.profile_budget: float | None = None      # full evaluations' worth a new profile may cost (None: an eighth)
        self.profile_start_count = 2                  # the profile's least-damage architectures among the starts
        self.proposal_count = PROPOSALS               # the profile's next-best solutions offered per round
        self.allow_drop = False                       # profile starts and proposals may drop layers (--allow-drop)
        self._solutions: dict[tuple[int, int], list[Architecture]] = {}
        self.on_profile: OnResult | None = None       # progress of the profile's measurements

    def settings(self, doc: dict[str, Any]) -> list[EvalSettings]:
        """The settings groups that measure a query document's objectives (and the extra metrics)."""
        metrics = [*doc["objectives"], *self.extra_metrics]
        return measurement_settings(metric_protocols(self.archive, doc, metrics), metrics, self.defaults)

    def campaigns(self, doc: dict[str, Any]) -> list[Campaign]:
        return [self.cache.get(self.location, s, self.model) for s in self.settings(doc)]

    def architectures(self, rows: Sequence[dict[str, Any]]) -> list[Architecture]:
        return [from_layer_dicts(self.spec, r["layers"]) for r in rows]

    def measure(self, archs: Sequence[Architecture | tuple[Architecture, str]], doc: dict[str, Any],
                on_result: OnResult | None = None) -> list[CampaignReport]:
        """Prune, measure and store ``archs`` (or (architecture, origin) pairs; default origin
        ``verify``) under every settings group of ``doc``."""
        pairs = [a if isinstance(a, tuple) else (a, "verify") for a in archs]
        return [c.run(pairs, on_result) for c in self.campaigns(doc)]

    def measured(self, rows: Sequence[dict[str, Any]], doc: dict[str, Any]) -> list[dict[str, Any]]:
        """For each result row: its id, predictions and the archive's value of every objective under
        the protocol it was verified with (None where unmeasured); ``also_measured``: the extra
        metrics' values (e.g. the perplexity of a search on ``kl_base``), when there are any."""
        keys: dict[str, str] = {}
        for campaign in self.campaigns(doc):
            keys.update(campaign.protocol_keys())
        ids = [r["arch_id"] for r in rows]
        extra = [m for m in dict.fromkeys(self.extra_metrics) if m not in doc["objectives"] and m in keys]
        with self.archive.read() as session:
            base = reads.get_base_model(session, self.model)
            values = {o: reads.values_under(session, base, ids, o, keys[o])
                      for o in [*doc["objectives"], *extra] if o in keys}
        out = []
        for r in rows:
            row = {"arch_id": r["arch_id"], "predicted": r["predicted"],
                   "measured": {o: values.get(o, {}).get(r["arch_id"]) for o in doc["objectives"]}}
            if extra:
                row["also_measured"] = {m: values[m].get(r["arch_id"]) for m in extra}
            out.append(row)
        return out

    def verify(self, doc: dict[str, Any], k: int, on_result: OnResult | None = None) -> list[dict[str, Any]]:
        """Measure the top ``k`` results of a query document; returns ``measured`` of them."""
        top = doc["results"][:k]
        self.measure(list(zip(self.architectures(top), map(origin_of, top))), doc, on_result)
        return self.measured(top, doc)

    def strong_starts(self, doc: dict[str, Any]) -> list[tuple[str, Architecture]]:
        """The search-free starts at the query's target: the rules of thumb and global allocations
        of the loaded model's importance (``optimizer.starts``) and, for a perplexity or ``kl_base`` objective,
        the ``profile_start_count`` least-damage architectures of the sensitivity profile
        (``profile``): ``verify_loop``'s ``starts``."""
        from .profile import profile_starts
        from .starts import strong_starts
        importance = self.campaigns(doc)[0].importance
        found = strong_starts(self.spec, doc["target_params"], importance.kv_group, importance.channel)
        profile = self.profile(doc)
        if profile is not None:
            found += profile_starts(profile, *doc["window"], n=self.profile_start_count, allow_drop=self.allow_drop)
        return found

    def proposals(self, doc: dict[str, Any]) -> list[Architecture]:
        """The sensitivity profile's ``proposal_count`` least-damage architectures in the query's
        window (``verify_loop``'s ``proposals``; solved once per window, the profile read from the
        archive): none without a profile."""
        lo, hi = (int(x) for x in doc["window"])
        if (lo, hi) not in self._solutions:
            from .profile import profile_solutions
            profile = self.profile(doc) if self.proposal_count else None
            self._solutions[(lo, hi)] = (profile_solutions(profile, lo, hi, self.proposal_count, self.allow_drop)
                                         if profile is not None else [])
        return self._solutions[(lo, hi)]

    def profile(self, doc: dict[str, Any]) -> Any:
        """The base model's sensitivity profile on a cheap fidelity of the first objective
        (``optimizer.profile``): single-layer variants measured where the archive lacks them (origin
        ``profile``, reused by every later query), or None for an objective that is neither a
        perplexity nor ``kl_base``. With ``profile_budget``, a profile the archive holds on any
        cheap fidelity of the protocol is used as it is; else one is measured on as many tokens per
        variant as the budget allows (``budget_tokens``).

        A perplexity's damages are its own rise, not KL to the base on the same tokens: with one
        128-token window a variant, KL's least-damage architecture measured worse on the deep
        testbed where the choice matters most (ptb-llama-24l at 50% +4.8% against +4.1%, at 40%
        +11.7% against +10.3%, on held-out text as well; at 60% +2.0% against +1.9%), though
        better on ptb-llama-8l (80%: +3.1% against +5.0%) (``benchmarks/profile_metric.py``)."""
        from .profile import damage_scale
        objective = doc["objectives"][0]
        if damage_scale(objective) is None:
            return None
        campaign = next(c for c in self.campaigns(doc) if objective in c.settings.metrics)
        tokens = self.screen_tokens
        if self.profile_budget is not None:
            stored = self._stored_profile(campaign, objective)
            if stored is not None:
                return stored
            tokens = budget_tokens(campaign, objective, self.profile_budget)
        return measure_profile(campaign, objective, tokens, self.on_profile)

    def _stored_profile(self, campaign: Campaign, metric: str) -> Any:
        """The archive's profile of ``metric`` under a cheap fidelity of ``campaign``'s protocol
        (``training.stored_profile``: the most tokens first), or None."""
        from archopt.archdb import models as m
        from sqlalchemy import select
        from .training import stored_profile
        key = campaign.protocol_keys()[metric]
        with self.archive.read() as session:
            pid = session.scalar(select(m.Protocol.id).where(m.Protocol.key == key))
            if pid is None:
                return None
            found = stored_profile(session, reads.get_base_model(session, self.model), metric, pid)
        return None if found is None else found[0]

    def measure_cheap(self, archs: Sequence[Architecture], doc: dict[str, Any],
                      on_screening: Callable[[str, int, int], Any] | None = None) -> list[float | None]:
        """Cheap-fidelity values of the first objective (``verify_loop``'s ``measure_cheap``).
        Screening is enabled on first use and calibrated on archived architectures of the query's
        window; ``on_screening(protocol key, tokens, paired)`` is told once."""
        objective = doc["objectives"][0]
        campaign = next(c for c in self.campaigns(doc) if objective in c.settings.metrics)
        if campaign.screener is None:
            try:
                key = campaign.enable_screening(objective, self.screen_tokens)
            except CampaignError as exc:
                raise VerifyError(str(exc)) from None
            lo, hi = doc["window"]
            paired = campaign.calibrate_screening(objective, int(lo * 0.95), int(hi * 1.05))
            if on_screening is not None:
                on_screening(key, campaign.screener.tasks[objective].protocol.tokens, paired)
        return campaign.screen_values(archs, objective)
