"""What the importance cache holds, read from the cached files' metadata alone (numpy, no torch).

Each cached importance is ``<cache>/<key>.npz`` with its metadata (criterion, config hash,
calibration) as JSON text beside the arrays (``importance.Importance.save``). A command can tell
from it, before loading any model, whether a Taylor importance it needs is there or whether it will
need calibration text; ``importance.find_cached`` then confirms a file against the loaded weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def calibration_label(calibration: dict[str, Any] | None) -> str | None:
    """One-line calibration description (``None`` for data-free criteria), as the archive stores it."""
    c = calibration
    if not c:
        return None
    return f"{c['name']}/{c['samples']}x{c['seq_len']}/seed{c['seed']}/sha256:{c['text_sha256'][:16]}"


def cached_entries(cache_dir: str | Path, criterion: str, config_hash: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(file, metadata) of each readable cached importance by ``criterion`` of a model with
    ``config_hash`` (the weights are not checked here)."""
    import numpy as np

    folder = Path(cache_dir)
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.npz")):
        try:
            with np.load(file, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError):
            continue  # unreadable or half-written: not a candidate
        if (isinstance(meta, dict) and meta.get("criterion") == criterion and meta.get("config_hash") == config_hash
                and file.stem == meta.get("key")):
            yield file, meta


def may_hold(cache_dir: str | Path, criterion: str, config_hash: str, label: str | None = None) -> bool:
    """The cache holds an importance by ``criterion`` of a model with ``config_hash`` (calibrated as
    ``label`` says, when given)."""
    return any(label is None or calibration_label(meta.get("calibration")) == label
               for _, meta in cached_entries(cache_dir, criterion, config_hash))
