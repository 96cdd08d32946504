"""Helpers shared by the ``wmark`` command modules: error handling, output, help texts."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from wmark.console import exit_interrupted
from wmark.errors import UsageError, WmarkError
from wmark.keys import check_outputs_spare_keys
from wmark.report import report_paths

EXIT_HELP = """\b
Exit codes:
  0  detected (verify) or success
  1  not detected or inconclusive (verify)
  2  usage error: bad option, missing/corrupt file, mismatched key
  3  runtime error: the suspect failed or broke its protocol (e.g. the wrong number of labels)
  130  interrupted (Ctrl-C)"""

ARCH_HELP = ("built-in name (fmnist-cnn, fmnist-cnn-wide, fmnist-mlp, resnet-small; text: minilm-classifier, "
             "tiny-bert, text-bow) or package.module:factory")
DATA_HELP = ("fashion-mnist[:DIR], fashion-mnist-rgb32[:DIR], digits, fortunes[:DIR] (any with @owner|@attacker), "
             "or a .safetensors file with tensors x and y")


class Group(click.Group):
    """The ``wmark`` command group: Ctrl-C while click reads the command line, before a command's own handling,
    exits 130 in one line too (click would print "Aborted!" and exit 1)."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            exit_interrupted()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            exit_interrupted()


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WmarkError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # not KeyboardInterrupt: the command group turns that into exit 130
            if os.environ.get("WMARK_DEBUG"):
                raise
            click.echo(f"error: unexpected {type(exc).__name__}: {exc} (set WMARK_DEBUG=1 for a traceback)", err=True)
            sys.exit(3)

    return wrapper


def _emit(doc: dict[str, Any], as_json: bool, summary: str) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else summary)


def _progress() -> bool:
    return sys.stderr.isatty() or bool(os.environ.get("WMARK_PROGRESS"))


def given(names: Iterable[str]) -> list[str]:
    """The options among ``names`` (parameter names) the user gave on the command line, as ``--flag`` spellings."""
    ctx = click.get_current_context()
    out = []
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            param = next(p for p in ctx.command.params if p.name == name)
            out.append(max(param.opts, key=len))
    return out


def refuse(names: Iterable[str], why: str) -> None:
    """Refuse, in one sentence, options given where they do not apply (exit 2)."""
    flags = given(names)
    if flags:
        raise UsageError(f"{', '.join(flags)} {'does' if len(flags) == 1 else 'do'} not apply {why}.")


def check_outputs(*paths: str | None, report: str | None = None, reads: Iterable[str | None] = ()) -> None:
    """Refuse, before any work, an output path the command could not write (exit 2).

    Commands call this first so that a mistyped ``--out`` or ``--report`` does not throw away a training run
    or a verification's paid queries; ``report`` also checks the JSON twin written next to it.

    Args:
        paths: Files the command writes or appends to; None for an option not given.
        report: The evidence report, if any.
        reads: Files the command reads (the key, the suspect, the reference): the report may be none of them,
            since writing it there would destroy the evidence it describes.

    Raises:
        UsageError: For a path in a missing or read-only directory, a directory in its place, a wmark key
            file there (writing would destroy its secret), or a report over a file the command reads.
        RuntimeFailure: If probing the directory fails otherwise (a full disk).
    """
    wanted = [p for p in paths if p is not None]
    if report is not None:
        wanted += [str(p) for p in report_paths(report)]
    # first, so that a report over the key file is refused for what it would destroy: the key's secret
    check_outputs_spare_keys(*wanted)
    for out in report_paths(report) if report is not None else ():
        for src in (r for r in reads if r is not None):
            if os.path.exists(out) and os.path.exists(src) and os.path.samefile(out, src):
                raise UsageError(f"The report would be written over {src}, which this command reads; choose "
                                 "another --report path.")
