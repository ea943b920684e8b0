"""The evaluation queue on a PostgreSQL archive: submit, worker, jobs (retry, cancel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console

from archopt.cli import EvalOptions, State, UserError, eval_options, floats, pass_state, quiet_libraries

from .measure import parse_arch
from .output import emit, hide_password, print_json


def queue_url(state: State) -> str:
    """The archive URL if it is PostgreSQL; else the one-line answer that the queue needs it."""
    from archopt.archdb.archive import resolve_url
    from archopt.jobqueue import NEEDS_POSTGRES
    url = resolve_url(state.db)
    if not url.startswith("postgresql"):
        raise UserError(NEEDS_POSTGRES)
    return url


def submit_jobs(state: State, model: str, archs: list[tuple[Any, str]], settings: Any, weights: str | None,
                priority: int, console: Console | None = None) -> Any:
    """Enqueue one job per architecture the archive and the queue do not hold; says what it did."""
    from archopt.jobqueue import submit
    report = submit(state.archive, model, archs, settings, location=weights, priority=priority)
    note = "" if report.archive_checked else " (weights not reachable here: archive not checked, workers skip what it holds)"
    (console or state.out).print(f"enqueued {len(report.enqueued)} job(s); {report.in_archive} already in the "
                                 f"archive, {report.in_queue} already queued or running{note}")
    return report


@click.command()
@click.option("--model", "-m", required=True, help="Registered base model (name, path or hub id).")
@click.option("--arch", "arch_texts", multiple=True, help="Architecture to measure (id, JSON or compact).")
@click.option("--samples", type=click.IntRange(min=0), default=0, help="Sampled architectures to measure.")
@click.option("--sampler", type=click.Choice(["random", "paper"]), default="random", show_default=True,
              help="random: per-layer widths; paper: ratios from --ratios.")
@click.option("--layers", default=None, help="Prunable layers, inclusive: 3-29.")
@click.option("--ratios", default="0.1,0.2,0.3,0.4,0.5", show_default=True, help="Ratio set of --sampler paper.")
@click.option("--params", "params_text", default=None, help="Random samples near this size: 5B, 550M, 80%.")
@click.option("--tolerance", default="5%", show_default=True, help="Size window of --params.")
@click.option("--from-query", "query_id", type=int, default=None, help="Every result of this stored query.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--weights", default=None, help="Where workers find the base weights (default: the archive's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled architectures.")
@eval_options
@pass_state
def submit(state: State, model: str, arch_texts: tuple[str, ...], samples: int, sampler: str, layers: str | None,
           ratios: str, params_text: str | None, tolerance: str, query_id: int | None, priority: int,
           weights: str | None, seed: int, evaluation: EvalOptions) -> None:
    """Queue evaluations for `archopt worker`s (needs a PostgreSQL archive).

    One job per architecture the archive does not hold under these protocol settings; submitting the
    same thing twice enqueues nothing new. --device is the workers' choice (archopt worker --device).

    \b
    Example:
      archopt --db postgresql://archopt@db/archopt submit --model ptb-llama-8l --samples 50 --max-tokens 4096
      archopt submit --model ptb-llama-8l --from-query 12
    """
    queue_url(state)
    if not (arch_texts or samples or query_id is not None):
        raise UserError("give --arch, --samples N or --from-query ID")
    from archopt.archdb.arch import from_layer_dicts, parse_layer_range
    from archopt.archdb.reads import get_base_model
    from archopt.archdb.sizes import parse_size, parse_tolerance
    from archopt.archdb.store import spec_of
    from archopt.optimizer.samplers import sample_architectures
    with state.archive.read() as session:
        base = get_base_model(session, model)
        name, spec = base.name, spec_of(base)
    archs: list[tuple[Any, str]] = [(parse_arch(state, name, spec, t), "ingest") for t in arch_texts]
    if samples:
        layer_idx = parse_layer_range(layers, spec.num_layers) if layers else None
        target = parse_size(params_text, spec.total_params) if params_text else None
        archs += [(a, "random") for a in sample_architectures(
            spec, samples, sampler, seed=seed, layers=layer_idx,
            ratios=tuple(floats(ratios, "--ratios")) or (0.1, 0.2, 0.3, 0.4, 0.5),
            target_params=target, tolerance=parse_tolerance(tolerance))]
    if query_id is not None:
        from archopt.optimizer.query import get_query
        doc = get_query(state.archive, query_id)
        if doc["model"] != name:
            raise UserError(f"query #{query_id} is about {doc['model']}, not {name}")
        archs += [(from_layer_dicts(spec, r["layers"]), "verify") for r in doc["results"]]
    settings = evaluation.settings(seed, device=evaluation.device or "cpu")
    submit_jobs(state, name, archs, settings, weights, priority)


@click.command()
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available); one worker per GPU.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Weights dtype (default: float32 on CPU, bfloat16 on CUDA).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local data laid out like ../shared/data (default: Hugging Face datasets).")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Jobs at once in this process (1 per GPU is right for most models).")
@click.option("--max-jobs", type=click.IntRange(min=0), default=None, help="Exit after this many jobs.")
@click.option("--idle-exit", type=click.FloatRange(min=0), default=None, help="Exit after S seconds without a job.")
@click.option("--attempts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs of a job before it is marked failed (a stalled worker counts as one).")
@click.option("--heartbeat", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds between two heartbeats of this worker.")
@click.option("--stall-timeout", type=click.FloatRange(min=0.5), default=60.0, show_default=True,
              help="A job whose worker sent no heartbeat for this long is retried by another worker.")
@click.option("--poll", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between two looks at the queue (besides PostgreSQL notifications).")
@click.option("--name", default=None, help="Worker name in `archopt jobs` (default: host:pid).")
@pass_state
def worker(state: State, device: str | None, dtype: str | None, data_dir: Path | None, concurrency: int,
           max_jobs: int | None, idle_exit: float | None, attempts: int, heartbeat: float, stall_timeout: float,
           poll: float, name: str | None) -> None:
    """Run queued evaluations (from `archopt submit` / `query --verify K --queue`) on this machine.

    Keeps each base model loaded between jobs. SIGTERM or Ctrl-C finishes the job in hand, then exits;
    a worker killed outright leaves its job to another worker after --stall-timeout.

    \b
    Example:
      CUDA_VISIBLE_DEVICES=0 archopt --db postgresql://archopt@db/archopt worker --device cuda \\
          --data-dir ../shared/data
    """
    import logging
    url = queue_url(state)
    if heartbeat >= stall_timeout:
        raise UserError("--heartbeat must be shorter than --stall-timeout")
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: no such directory")
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    from archopt.jobqueue import run_worker
    state.err.print(f"worker on {device}, archive {hide_password(url)}", markup=False)
    ran = run_worker(url, device=device, dtype=dtype, data_dir=str(data_dir) if data_dir else None,
                     concurrency=concurrency, max_jobs=max_jobs, idle_exit=idle_exit, attempts=attempts,
                     heartbeat=heartbeat, stall_timeout=stall_timeout, poll=poll, name=name)
    state.err.print(f"worker done: {ran} job(s)", markup=False)


@click.group(invoke_without_command=True)
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["todo", "doing", "succeeded", "failed", "cancelled", "aborting", "aborted"]),
              help="Only jobs in this status (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Newest jobs listed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def jobs(ctx: click.Context, statuses: tuple[str, ...], limit: int, as_json: bool) -> None:
    """The evaluation queue: counts per status and per worker, newest jobs; retry or cancel jobs.

    \b
    Example:
      archopt jobs --status failed
      archopt jobs retry 17 18
      archopt jobs cancel 19
    """
    if ctx.invoked_subcommand is not None:
        return  # retry / cancel check the archive themselves
    state: State = ctx.obj
    url = queue_url(state)
    from archopt.jobqueue import list_jobs
    doc = list_jobs(url, statuses, limit)
    if as_json:
        print_json(doc)
        return
    state.out.print("jobs: " + (", ".join(f"{n} {s}" for s, n in doc["counts"].items()) or "none"))
    if doc["workers"]:
        emit(state, doc["workers"], [("worker", "worker"), ("alive", "alive"), ("doing", "running"),
                                     ("succeeded", "succeeded"), ("failed_or_stalled", "failed/stalled"),
                                     ("busy_seconds", "busy s")], False, title="workers")
    rows = [{**j, "arch_id": (j["arch_id"] or "")[:12], "updated": (j["updated"] or "")[:19]} for j in doc["jobs"]]
    emit(state, rows, [("id", "job"), ("status", "status"), ("model", "model"), ("arch_id", "arch"),
                       ("attempts", "runs"), ("priority", "priority"), ("worker", "worker"),
                       ("updated", "updated"), ("error", "last error")], False)


@jobs.command("retry")
@click.argument("job_ids", nargs=-1, type=int, required=True)
@pass_state
def jobs_retry(state: State, job_ids: tuple[int, ...]) -> None:
    """Put failed jobs back in the queue.

    \b
    Example:
      archopt jobs retry 17 18
    """
    from archopt.jobqueue import retry_jobs
    _report(state, "requeued", "not failed, left alone", job_ids, retry_jobs(queue_url(state), job_ids))


@jobs.command("cancel")
@click.argument("job_ids", nargs=-1, type=int, required=True)
@pass_state
def jobs_cancel(state: State, job_ids: tuple[int, ...]) -> None:
    """Cancel queued jobs (a running one is asked to abort).

    \b
    Example:
      archopt jobs cancel 19 20
    """
    from archopt.jobqueue import cancel_jobs
    _report(state, "cancelled", "already finished or unknown", job_ids, cancel_jobs(queue_url(state), job_ids))


def _report(state: State, done_word: str, others_word: str, asked: tuple[int, ...], done: list[int]) -> None:
    """``requeued 2 job(s); not failed, left alone: 19`` (the ids that were not acted on, if any)."""
    others = [str(j) for j in asked if j not in done]
    state.out.print(f"{done_word} {len(done)} job(s)" + (f"; {others_word}: {', '.join(others)}" if others else ""))
