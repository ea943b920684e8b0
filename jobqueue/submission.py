"""``archopt submit``: one job per architecture that is neither in the archive nor queued or running."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from archopt.archdb.archive import Archive

from .app import TASK_NAME, make_app
from .connection import QueueError, connect
from .schema import require_queue

log = logging.getLogger("archopt.jobs")


@dataclass
class SubmitReport:
    """Job ids enqueued, architectures skipped (in the archive, in the queue), and whether the
    archive could be checked here (it needs the tokenizer)."""

    enqueued: list[int]
    in_archive: int
    in_queue: int
    archive_checked: bool


def settings_payload(settings: Any) -> dict[str, Any]:
    """The protocol-defining settings of a job (device and data dir belong to the worker)."""
    data = dataclasses.asdict(settings)
    data["metrics"] = list(data["metrics"])
    data["metric_tokens"] = [list(pair) for pair in data.get("metric_tokens", ())]
    for machine_local in ("device", "data_dir"):
        data.pop(machine_local, None)
    return data


def job_lock(model: str, arch_id: str, settings: dict[str, Any]) -> str:
    """The lock key of a job: the same (model, architecture, settings) is queued at most once."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return f"archopt:{model}:{arch_id}:{digest}"


def _protocol_keys(location: str, settings: Any) -> dict[str, str] | None:
    """The protocol key of each metric (loads only the tokenizer); None when the weights are out of reach."""
    try:
        from transformers import AutoTokenizer
        from archopt.optimizer.campaign import make_evaluator
        evaluator = make_evaluator(AutoTokenizer.from_pretrained(location), settings)
    except Exception as exc:  # noqa: BLE001 - the queue still dedupes; the worker skips what is stored
        log.info("cannot compute protocols here (%s): skipping the archive check", str(exc).splitlines()[0][:200])
        return None
    return {metric: task.protocol.key() for metric, task in evaluator.tasks.items()}


def submit(archive: Archive, model: str, archs: Sequence[tuple[Any, str]], settings: Any,
           location: str | None = None, priority: int = 0) -> SubmitReport:
    """Enqueue one job per architecture that is neither in the archive nor queued/running."""
    from procrastinate import exceptions as pexc
    from archopt.archdb import reads
    require_queue(archive.url)
    with archive.read() as session:
        base = reads.get_base_model(session, model)
        name, where = base.name, location or base.location
    if not where:
        raise QueueError(f"no weights location recorded for {name}: pass --weights")
    payload = settings_payload(settings)
    keys = _protocol_keys(where, settings)
    done: set[tuple[str, str, str]] = set()
    if keys is not None:
        with archive.read() as session:
            done = reads.measured_keys(session, reads.get_base_model(session, name), list(keys.values()))
    todo: list[tuple[str, Any, str]] = []
    in_archive = 0
    seen: set[str] = set()
    for arch, origin in archs:
        arch_id = arch.arch_id(name)
        if arch_id in seen:
            continue
        seen.add(arch_id)
        if keys is not None and all((arch_id, metric, key) in done for metric, key in keys.items()):
            in_archive += 1
            continue
        todo.append((arch_id, arch, origin))
    locks = [job_lock(name, arch_id, payload) for arch_id, _, _ in todo]
    with connect(archive.url) as conn:
        queued = {row[0] for row in conn.execute(
            "SELECT lock FROM procrastinate_jobs WHERE lock = ANY(%s) AND status IN ('todo', 'doing')", (locks,))}
    app = make_app(archive.url, sync=True)
    enqueued: list[int] = []
    in_queue = 0
    with app.open():
        task = app.tasks[TASK_NAME]
        for (arch_id, arch, origin), lock in zip(todo, locks):
            if lock in queued:
                in_queue += 1
                continue
            try:
                job_id = task.configure(lock=lock, queueing_lock=lock, priority=priority).defer(
                    model=name, location=where, arch_id=arch_id, layers=arch.layer_dicts(), origin=origin,
                    settings=payload)
            except pexc.AlreadyEnqueued:
                in_queue += 1
                continue
            enqueued.append(job_id)
    return SubmitReport(enqueued, in_archive, in_queue, keys is not None)
