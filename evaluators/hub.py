"""Where base models and evaluation texts come from: a local path, or the Hugging Face hub.

A hub id or dataset that this machine cannot get fails in one line within seconds, naming what
to pass instead (a local directory, ``--data-dir``), never after minutes of download retries:

- ``HF_HUB_OFFLINE=1`` (``HF_DATASETS_OFFLINE=1`` for texts) is honoured: only what the local
  caches hold is used, and nothing in them gives the error at once;
- otherwise one quick request to the hub endpoint (``HF_ENDPOINT``, 2 s at most, remembered for a
  minute) decides whether the hub can be reached at all before transformers or datasets try it;
- a path that does not exist says so (not "Repo id must be in the form ...").

Nothing here imports torch, transformers or datasets: commands call ``check_model_source`` and
``check_text_sources`` before loading a model, and the loaders call them again (cheaply).
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable

from archopt.archdb.errors import ArchoptError

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 2.0
PROBE_MEMORY_S = 60
# metric -> the ``datasets`` hub id its text comes from without --data-dir
METRIC_DATASETS = {"ppl_wikitext2": "wikitext", "ppl_ptb": "ptb_text_only", "mmlu": "cais/mmlu"}
CALIBRATION_DATASET = "ptb_text_only"
DATA_DIR_HINT = "pass --data-dir DIR (a folder laid out like ../shared/data)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class SourceError(ArchoptError, OSError):
    """A model or text that cannot be had here (missing path, hub offline or unreachable): one line."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: models come from local paths and the hub cache only."""
    return _flag("HF_HUB_OFFLINE")


def datasets_offline() -> bool:
    """``HF_DATASETS_OFFLINE`` (or ``HF_HUB_OFFLINE``) is set: texts come from --data-dir or the cache."""
    return _flag("HF_DATASETS_OFFLINE") or hub_offline()


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_reachable() -> bool:
    """False when offline or when one quick request to the endpoint gets no HTTP answer."""
    if hub_offline():
        return False
    return _probe(endpoint(), int(time.monotonic() // PROBE_MEMORY_S))


@functools.lru_cache(maxsize=4)
def _probe(url: str, _minute: int) -> bool:
    """One HEAD request to ``url`` (any HTTP status below 500 counts as reachable), bounded by
    ``PROBE_TIMEOUT_S`` even when name resolution hangs; remembered per endpoint for a minute."""
    answer: list[bool] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
            answer.append(True)
        except urllib.error.HTTPError as exc:  # the hub answered (a proxy's 5xx: it could not)
            answer.append(exc.code < 500)
        except (OSError, ValueError):
            answer.append(False)

    thread = threading.Thread(target=ask, daemon=True, name="archopt-hub-probe")
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.2)
    return bool(answer and answer[0])


def _hf_home() -> Path:
    """``HF_HOME`` as set now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    from huggingface_hub import constants
    return Path(constants.HF_HOME)


def _hub_cache() -> Path:
    found = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(found).expanduser() if found else _hf_home() / "hub"


def _datasets_cache() -> Path:
    found = os.environ.get("HF_DATASETS_CACHE")
    return Path(found).expanduser() if found else _hf_home() / "datasets"


def model_cached(repo_id: str) -> bool:
    """The hub cache holds a snapshot of ``repo_id`` with a config.json."""
    folder = _hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return folder.is_dir() and any((snap / "config.json").is_file() for snap in folder.iterdir())


def dataset_maybe_cached(name: str) -> bool:
    """Something of dataset ``name`` lies in the hub or datasets cache (False: surely not there)."""
    tail = name.split("/")[-1]
    hub, local = _hub_cache(), _datasets_cache()
    hub_hit = hub.is_dir() and any(p.name == f"datasets--{name.replace('/', '--')}" or p.name.endswith(f"--{tail}")
                                   for p in hub.iterdir() if p.name.startswith("datasets--"))
    local_hit = local.is_dir() and any(p.name in (tail, name.replace("/", "___")) or p.name.endswith(f"___{tail}")
                                       for p in local.iterdir())
    return hub_hit or local_hit


def looks_like_path(ref: str) -> bool:
    """Written as a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x/``), so never a hub id."""
    return (ref.startswith((".", "/", "~")) or "\\" in ref or ref.count("/") > 1 or ref.endswith("/")
            or not _HUB_ID.match(ref))


def check_model_source(ref: str, what: str | None = None) -> str:
    """``"local"`` for a directory, ``"hub"`` for a hub id this machine can load (cached, or the hub
    reachable); else ``SourceError`` naming ``what`` (default ``--model REF``) and what to pass."""
    what = what or f"--model {ref}"
    path = Path(ref).expanduser()
    if path.is_dir():
        return "local"
    if path.exists():
        raise SourceError(f"{what}: not a directory (a model directory holds config.json and the weights)")
    if looks_like_path(ref):
        raise SourceError(f"{what}: no such directory")
    if model_cached(ref):
        return "hub"
    if hub_offline():
        raise SourceError(f"{what}: not a local directory, and HF_HUB_OFFLINE=1 keeps archopt off the Hugging Face "
                          "hub (nothing cached for it): pass a local model directory")
    if not hub_reachable():
        raise SourceError(f"{what}: not a local directory, and the Hugging Face hub ({endpoint()}) cannot be "
                          "reached: pass a local model directory (or set HF_HUB_OFFLINE=1 to use a cached copy)")
    return "hub"


def check_dataset(name: str) -> None:
    """``SourceError`` when dataset ``name`` would have to come from a hub this machine cannot use."""
    if datasets_offline():
        if not dataset_maybe_cached(name):
            flag = "HF_HUB_OFFLINE=1" if hub_offline() else "HF_DATASETS_OFFLINE=1"
            raise SourceError(f"dataset {name} is not cached and {flag} keeps archopt off the Hugging Face hub: "
                              f"{DATA_DIR_HINT}")
    elif not hub_reachable():
        raise SourceError(f"dataset {name}: the Hugging Face hub ({endpoint()}) cannot be reached: {DATA_DIR_HINT}, "
                          "or set HF_DATASETS_OFFLINE=1 to use a cached copy")


def check_text_sources(data_dir: str | Path | None, metrics: Iterable[str], option: str = "--data-dir") -> None:
    """Before loading a model: ``data_dir`` exists, or every metric's dataset can be had from the hub."""
    if data_dir is not None:
        if not Path(data_dir).expanduser().is_dir():
            raise SourceError(f"{option} {data_dir}: no such directory")
        return
    for metric in dict.fromkeys(metrics):
        if metric in METRIC_DATASETS:
            check_dataset(METRIC_DATASETS[metric])
