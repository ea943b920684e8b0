"""The ``archopt`` command line: the root group, what every command shares, and the error mapping.

The commands live in ``commands/``, one module per family (archive, measure, query, predictors,
serve, queue, db), loaded when a command is asked for. Commands parse options, make library calls
(``archdb``, ``optimizer``, ``evaluators``, ``jobqueue``) and print through ``commands.output``;
they run no SQL of their own. Heavy modules (torch, transformers, scikit-learn) are imported
inside the commands that need them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import click
from rich.console import Console

from .archdb.errors import ArchoptError

# command name -> "module:attribute" under archopt.commands, in the order --help lists them
COMMANDS = {
    "db": "db:db",
    "ingest": "archive:ingest",
    "export": "archive:export",
    "models": "archive:models",
    "archs": "archive:archs",
    "show": "archive:show",
    "evaluations": "archive:evaluations",
    "evaluate": "measure:evaluate",
    "prune": "measure:prune",
    "query": "query:query",
    "predictors": "predictors:predictors",
    "serve": "serve:serve",
    "submit": "queue:submit",
    "worker": "queue:worker",
    "jobs": "queue:jobs",
}


class UserError(click.ClickException):
    """A one-line error for the user."""


class LazyGroup(click.Group):
    """A group whose commands are imported when first needed (``COMMANDS``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(f"archopt.commands.{module}"), attribute)


class State:
    """What every command shares: the archive URL (opened on first use, closed at exit) and output."""

    def __init__(self, db: str | None, debug: bool) -> None:
        self.db = db
        self.debug = debug
        self._archive: Any = None
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        for console in (self.out, self.err):
            if not console.is_terminal:
                console.width = 160  # pipes and logs: wide enough for a Pareto table

    @property
    def archive(self) -> Any:
        """The ``archdb.archive.Archive`` of ``--db``, opened on first use."""
        if self._archive is None:
            from .archdb.archive import Archive
            self._archive = Archive(self.db)
        return self._archive

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()


pass_state = click.make_pass_decorator(State)


def db_option(name: str = "db", **overrides: Any) -> Callable[[Any], Any]:
    """``--db URL``, the archive: on the root group, and on ``serve`` where it may follow the command."""
    options: dict[str, Any] = dict(envvar="ARCHOPT_DB", default=None, metavar="URL",
                                   help="Archive database URL (default: $ARCHOPT_DB, else sqlite:///archopt.db).")
    options.update(overrides)
    return click.option("--db", name, **options)


def server_options(func: Any) -> Any:
    """``--server URL`` and ``--token``: make the same call to an archopt service instead of the archive."""
    func = click.option("--token", envvar="ARCHOPT_TOKEN", default=None, metavar="TOKEN",
                        help="Bearer token for writes to --server (default: $ARCHOPT_TOKEN).")(func)
    return click.option("--server", envvar="ARCHOPT_SERVER", default=None, metavar="URL",
                        help="Ask an archopt service (archopt serve) at URL instead of --db "
                             "(default: $ARCHOPT_SERVER).")(func)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """The evaluation options of a command line (``eval_options``), before a device is chosen."""

    metrics: str             # as written: ``ppl_wikitext2,ppl_ptb`` (checked by ``settings``)
    data_dir: Path | None
    seq_len: int
    max_tokens: int | None
    max_questions: int | None
    shots: int
    ptb_split: str
    importance: str
    device: str | None
    dtype: str | None
    max_memory: str | None = None   # as written: 6GB (parsed by ``settings``)
    kl_text: str = "ptb-train"      # kl_base's calibration text
    kl_top_k: int = 256             # 0: the whole distribution

    def settings(self, seed: int, *, metrics: Sequence[str] | None = None, device: str | None = None) -> Any:
        """``optimizer.campaign.EvalSettings`` (default device: cuda when available, else cpu)."""
        from .optimizer.campaign import EvalSettings
        quiet_libraries()
        device = device or self.device
        if device is None:
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return EvalSettings(metrics=metric_list(",".join(metrics) if metrics else self.metrics),
                            data_dir=str(self.data_dir) if self.data_dir else None, seq_len=self.seq_len,
                            max_tokens=self.max_tokens, max_questions=self.max_questions, shots=self.shots,
                            ptb_split=self.ptb_split, importance=self.importance, device=device, dtype=self.dtype,
                            seed=seed, max_memory=memory_size(self.max_memory), kl_text=self.kl_text,
                            kl_top_k=self.kl_top_k or None)


def quiet_libraries() -> None:
    """Third-party progress bars off (transformers' "Loading weights", hub downloads, datasets'
    splits): a command that loads models shows archopt's own progress bar only. For the commands
    that import transformers anyway; datasets, when not imported yet, reads the setting then."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        from datasets.utils import disable_progress_bars as datasets_bars_off
        datasets_bars_off()
    else:
        import os
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def metric_list(text: str) -> tuple[str, ...]:
    """``ppl_wikitext2,ppl_ptb`` -> known metric names (unknown ones refused with a close match)."""
    from .archdb.protocol import METRICS
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    for name in names:
        if name not in METRICS:
            import difflib
            close = difflib.get_close_matches(name, METRICS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(METRICS)})"
            raise UserError(f"unknown metric {name!r}{hint}")
    if not names:
        raise UserError("--metrics needs at least one metric")
    return names


EVAL_OPTIONS = (
    click.option("--metrics", default="ppl_wikitext2,ppl_ptb", show_default=True,
                 help="Comma-separated: ppl_wikitext2, ppl_ptb, mmlu, kl_base (KL divergence from the base "
                      "model's next-token distribution)."),
    click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Local data laid out like ../shared/data (default: Hugging Face datasets)."),
    click.option("--seq-len", type=click.IntRange(min=8), default=128, show_default=True,
                 help="Perplexity window (LLM-Pruner and the paper use 128)."),
    click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                 help="Evaluate perplexity on the first T tokens only (recorded in the protocol); kl_base reads "
                      "the first T of its text (default 32768)."),
    click.option("--max-questions", type=click.IntRange(min=1), default=None,
                 help="MMLU questions per run (recorded in the protocol)."),
    click.option("--shots", type=click.IntRange(min=0), default=5, show_default=True, help="MMLU shots."),
    click.option("--ptb-split", type=click.Choice(["validation", "test"]), default="validation",
                 show_default=True, help="PTB split (LLM-Pruner reports validation)."),
    click.option("--kl-text", type=click.Choice(["ptb-train", "wikitext2-validation"]), default="ptb-train",
                 show_default=True,
                 help="kl_base's calibration text (never a split perplexities are reported on; WikiText-2 raw "
                      "validation comes from the hub or DIR/wikitext-2/wiki.valid.raw)."),
    click.option("--kl-top-k", type=click.IntRange(min=0), default=256, show_default=True,
                 help="kl_base keeps the base's K most likely tokens per position, the rest as one tail bucket "
                      "(a lower bound of the KL; recorded in the protocol); 0: the whole distribution."),
    click.option("--importance", type=click.Choice(["taylor", "l2"]), default="taylor", show_default=True,
                 help="What pruning keeps: first-order Taylor (needs gradients) or L2 magnitude."),
    click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                 help="Weights dtype (default: float32 on CPU, bfloat16 on CUDA)."),
    click.option("--max-memory", default=None,
                 help="Memory the run may use, e.g. 6GB: sizes batches and pruned copies (default: automatic, "
                      "about 1.1x the weights)."),
)


def memory_size(text: str | None) -> int | None:
    """``--max-memory 6GB`` -> bytes; a one-line error otherwise."""
    if text is None:
        return None
    from .evaluators.loading import parse_memory
    try:
        return parse_memory(text)
    except ValueError as exc:
        raise UserError(f"--max-memory: {exc}") from None


def bundled_options(options: Sequence[Any], cls: type, argument: str) -> Callable[[Any], Any]:
    """A decorator adding ``options`` to a command and handing their values to it as one ``cls``
    instance (a dataclass whose fields are the options' names) in the keyword ``argument``."""
    names = tuple(f.name for f in dataclasses.fields(cls))

    def decorate(func: Any) -> Any:
        @functools.wraps(func)
        def bundled(*args: Any, **kwargs: Any) -> Any:
            kwargs[argument] = cls(**{name: kwargs.pop(name) for name in names})
            return func(*args, **kwargs)

        for option in reversed(options):
            bundled = option(bundled)
        return bundled

    return decorate


# The options that define how architectures are measured (evaluate, submit, query --verify),
# handed to the command as one ``evaluation: EvalOptions`` argument.
eval_options = bundled_options(EVAL_OPTIONS, EvalOptions, "evaluation")


def floats(text: str | None, option: str) -> list[float]:
    """``0.1,0.2`` -> [0.1, 0.2]; a one-line error naming ``option`` otherwise."""
    if not text:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated numbers, got {text!r}") from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@db_option()
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="archopt", prog_name="archopt")
@click.pass_context
def cli(ctx: click.Context, db: str | None, debug: bool) -> None:
    """archopt: find the best pruned LLM for a size target.

    \b
    Example:
      archopt ingest examples/ptb-llama-8l.jsonl
      archopt query --model ptb-llama-8l --params 80%
    """
    state = State(db, debug)
    ctx.obj = state
    ctx.call_on_close(state.close)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one-line errors with a non-zero exit, tracebacks only with --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="archopt", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        # an argument echoed back may hold line breaks (or \x1c-\x1e, \u2028): keep the error on one line
        click.echo(f"error: {' '.join(exc.format_message().splitlines())}", err=True)
        sys.exit(exc.exit_code if exc.exit_code else 1)
    except ArchoptError as exc:
        _fail(debug, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except UnicodeEncodeError:  # a path or name holding a lone surrogate (only possible in-process)
        _fail(debug, "an argument holds characters that cannot be encoded (a lone surrogate)")
    except OSError as exc:  # a file that cannot be written or read (--output into a missing folder)
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        _fail(debug, f"{where}{exc.strerror or exc}".splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback
        first = str(exc).splitlines()[0] if str(exc) else ""
        _fail(debug, f"{type(exc).__name__}: {first[:300]} (run with --debug for details)")


def _fail(debug: bool, message: str) -> None:
    if debug:
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    sys.exit(1)
