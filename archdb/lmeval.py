"""lm-evaluation-harness results files (``results`` -> task -> ``"metric,filter"``).

Values are stored under ``<task>/<metric>`` (``wikitext/word_perplexity``, ``hellaswag/acc_norm``)
with an lm-eval protocol (task, task version, n-shot, filter, limit, max_length, lm-eval version):
they are never mixed with archopt's own ``ppl_wikitext2`` at seq 128. The model is the
``pretrained=`` of ``config.model_args`` (or ``model_name``): a directory written by ``archopt
prune`` (it holds ``archopt.json``) lands on that architecture of its base model; a registered
base model (name, path or hub id) gets the values on its full architecture; an unregistered local
model directory is registered first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .formats import FormatError, loads_strict
from .protocol import Protocol, ProtocolError, validate_value


@dataclass(frozen=True)
class LmEvalFile:
    model_ref: str
    values: list[tuple[str, float, Protocol]]
    limit: Any


def _model_ref(data: Mapping[str, Any]) -> str | None:
    config = data.get("config") if isinstance(data.get("config"), Mapping) else {}
    args = config.get("model_args")
    if isinstance(args, Mapping):
        ref = args.get("pretrained")
        if isinstance(ref, str) and ref:
            return ref
    elif isinstance(args, str):
        for part in args.split(","):
            key, _, value = part.partition("=")
            if key.strip() == "pretrained" and value.strip():
                return value.strip()
    name = data.get("model_name")
    return name if isinstance(name, str) and name else None


def read_lmeval(path: str, raw: bytes, allow_limit: bool = False) -> LmEvalFile:
    try:
        data = loads_strict(raw.decode("utf-8"), allow_nonfinite=True)  # NaN stderrs are common; values are checked below
    except UnicodeDecodeError:
        raise FormatError(path, None, "is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(path, None, f"invalid JSON: {str(exc).splitlines()[0][:120]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise FormatError(path, None, "field 'results': missing (not an lm-evaluation-harness results file)")
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    limit = config.get("limit")
    if limit is not None and not allow_limit:
        raise FormatError(path, None, f"field 'config.limit': evaluated with limit={limit!r}; "
                                      "pass --allow-limit to ingest partial results")
    ref = _model_ref(data)
    if ref is None:
        raise FormatError(path, None, "field 'config.model_args': no pretrained= model and no model_name")
    versions = data.get("versions") if isinstance(data.get("versions"), dict) else {}
    nshot = data.get("n-shot") if isinstance(data.get("n-shot"), dict) else {}
    tool_version = data.get("lm_eval_version") or data.get("git_hash") or ""
    max_length = data.get("max_length", config.get("max_length"))
    values: list[tuple[str, float, Protocol]] = []
    samples = data.get("n-samples") if isinstance(data.get("n-samples"), dict) else {}
    for task, metrics in sorted(data["results"].items()):
        if not isinstance(metrics, dict):
            raise FormatError(path, None, f"field 'results.{str(task)[:40]}': must be an object")
        shots = nshot.get(task)
        used = samples.get(task, {}).get("effective") if isinstance(samples.get(task), dict) else None
        # lm-eval 0.4 writes every metric as "metric,filter"; its other keys ("alias", "name",
        # "sample_len") are not metrics. Files without such keys (0.3) name metrics plainly.
        filtered = any("," in str(key) for key in metrics)
        for key, value in sorted(metrics.items()):
            name, _, filt = str(key).partition(",")
            if filtered and not filt:
                continue
            if name in ("alias", "name", "sample_len") or name.endswith("_stderr") or "_stderr" in name:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # "N/A" and similar placeholders
            metric = f"{task}/{name}"
            try:
                if not math.isfinite(float(value)):
                    raise ProtocolError("value must be finite")
                v = validate_value(metric, value)
                protocol = Protocol(
                    dataset=str(task), split="", tokenizer="", seq_len=max_length if isinstance(max_length, int) else None,
                    shots=shots if isinstance(shots, int) and shots >= 0 else None,
                    questions=used if isinstance(used, int) and not isinstance(used, bool) and used >= 0 else None,
                    tool="lm-eval",
                    tool_version=str(tool_version)[:200],
                    extra={"task_version": versions.get(task), "filter": filt or "none", "limit": limit})
            except ProtocolError as exc:
                raise FormatError(path, None, f"field 'results.{task}.{key}': {exc}") from None
            values.append((metric, v, protocol))
    if not values:
        raise FormatError(path, None, "field 'results': holds no numeric metric")
    return LmEvalFile(ref, values, limit)


def archopt_json(ref: str) -> dict[str, Any] | None:
    """The ``archopt.json`` of a directory written by ``archopt prune``, if ``ref`` is one."""
    path = Path(ref).expanduser() / "archopt.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
