"""The ``wmark ...`` command lines of the user docs parse with the real CLI, and README's Python imports resolve.

Nothing here runs a command: each line is parsed by click against the command it names, so a renamed or
removed command or option, a missing required option or a bad choice fails here, naming the doc file and line.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import click
import pytest

from wmark.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # not docs/research/
SHELL = {"bash", "sh", "shell", "console", ""}  # untagged fences hold commands too
BAD = "<not a command line>"


def _blocks(path: Path) -> list[tuple[str, list[tuple[int, str]]]]:
    """Each fenced block of a Markdown file: its language and its (line number, line) pairs."""
    blocks: list[tuple[str, list[tuple[int, str]]]] = []
    current: list[tuple[int, str]] | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if current is None:
                current = []
                blocks.append((stripped[3:].strip(), current))
            else:
                current = None
        elif current is not None:
            current.append((number, line))
    return blocks


def _code(line: str) -> str:
    """A shell line without its ``# comment`` (a ``#`` that starts a word outside quotes)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _commands() -> list[tuple[str, list[str]]]:
    """Every ``wmark`` command line of the docs' shell blocks, as ("file:line", argv after ``wmark``)."""
    found: list[tuple[str, list[str]]] = []
    for path in DOCS:
        name = path.relative_to(ROOT).as_posix()
        for lang, lines in _blocks(path):
            if lang not in SHELL:
                continue
            pending: tuple[int, str] | None = None
            for number, line in lines:
                code = _code(line).lstrip()
                if lang == "console":  # only the prompted lines are commands; the rest is output
                    if pending is None and not code.startswith("$ "):
                        continue
                    code = code.removeprefix("$ ")
                start, text = (number, code) if pending is None else (pending[0], pending[1] + " " + code)
                if text.endswith("\\"):  # as in bash, only a `\` that ends the line (no comment, no space) continues it
                    pending = (start, text[:-1])
                    continue
                pending = None
                if text.startswith("--"):  # a continuation the line above ended, e.g. with a `\` before a comment
                    found.append((f"{name}:{start}", [BAD, f"an option line that continues no command: {text!r}"]))
                elif text.startswith("wmark "):
                    try:
                        found.append((f"{name}:{start}", shlex.split(text)[1:]))
                    except ValueError as exc:  # an unclosed quote
                        found.append((f"{name}:{start}", [BAD, f"{exc}: {text!r}"]))
    return found


COMMANDS = _commands()


def _parse(argv: list[str]) -> None:
    """Parse ``wmark ARGV`` down to its subcommand's options, without invoking anything."""
    if argv and argv[0] == BAD:
        raise click.UsageError(argv[1])
    argv = [token.strip("[]") for token in argv if token != "&"]  # `[--opt value]`: optional, still checked
    argv = [token for token in argv if token]
    cmd: click.Command = main
    ctx = click.Context(main, info_name="wmark")
    while isinstance(cmd, click.Group):
        if not argv or argv[0].startswith("-"):
            raise click.UsageError(f"{ctx.command_path}: no subcommand given", ctx)
        sub = cmd.get_command(ctx, argv[0])
        if sub is None:
            raise click.UsageError(f"{ctx.command_path}: no such command {argv[0]!r}", ctx)
        cmd, ctx = sub, click.Context(sub, info_name=argv.pop(0), parent=ctx)
    # `...` elides part of a command: as an option's value it stands for one; elsewhere it is dropped, and the
    # options it may hide (required ones too) are not asked for.
    flags = {opt for param in cmd.params if isinstance(param, click.Option) and (param.is_flag or param.count)
             for opt in param.opts + param.secondary_opts}
    elided = "..." in argv
    kept = [token for i, token in enumerate(argv)
            if token != "..." or (i > 0 and argv[i - 1].startswith("-") and argv[i - 1] not in flags)]
    try:
        cmd.make_context(ctx.info_name, kept, parent=ctx.parent, resilient_parsing=False)
    except click.MissingParameter:
        if not elided:
            raise


@pytest.fixture
def _no_file_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    # The docs' files do not exist here: a PATH argument checked for existence takes any name.
    monkeypatch.setattr(click.Path, "convert", lambda self, value, param, ctx: value)


def test_the_docs_show_commands() -> None:
    # the extraction itself works: README alone shows about twenty command lines
    assert len([where for where, _ in COMMANDS if where.startswith("README.md:")]) >= 15
    assert len(COMMANDS) >= 50


@pytest.mark.usefixtures("_no_file_checks")
@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_a_doc_command_parses(argv: list[str], request: pytest.FixtureRequest) -> None:
    try:
        _parse(argv)
        problem = ""
    except (click.ClickException, click.exceptions.Exit) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        pytest.fail(f"{request.node.callspec.id}: `wmark {shlex.join(argv)}`: {problem}", pytrace=False)


def _inline() -> list[tuple[str, str]]:
    """Every inline `wmark ...` span of the docs' prose, as ("file:line", span)."""
    return [(f"{path.relative_to(ROOT).as_posix()}:{number}", match.group(1))
            for path in DOCS for number, line in enumerate(path.read_text().splitlines(), 1)
            for match in re.finditer(r"`wmark ([^`]+)`", line)]


def test_inline_commands_name_real_commands_and_options() -> None:
    # prose like `wmark verify file --whitebox --reference R`: a sketch, not a full command line, so only the
    # command and the option names are checked (`wmark COMMAND --help` and the like are placeholders)
    failures = []
    for where, span in _inline():
        words = span.split()
        cmd: click.Command = main
        ctx = click.Context(main, info_name="wmark")
        while isinstance(cmd, click.Group) and words and not words[0].startswith("-"):
            sub = cmd.get_command(ctx, words[0])
            if sub is None:
                if not words[0].isupper():
                    failures.append(f"{where}: `wmark {span}`: no command {words[0]!r} in {ctx.command_path}")
                break
            cmd, ctx = sub, click.Context(sub, info_name=words.pop(0), parent=ctx)
        else:
            known = {opt for param in cmd.params for opt in param.opts + param.secondary_opts}
            failures += [f"{where}: `wmark {span}`: {ctx.command_path} has no option {opt}"
                         for word in words for opt in re.findall(r"--[a-z0-9][a-z0-9-]*", word) if opt not in known]
    assert failures == []


def _readme_python() -> list[tuple[int, str]]:
    return [(lines[0][0], "\n".join(line for _, line in lines))
            for lang, lines in _blocks(ROOT / "README.md") if lang == "python" and lines]


def test_readme_python_compiles_and_its_wmark_imports_resolve() -> None:
    blocks = _readme_python()
    assert blocks
    failures = []
    for first, source in blocks:
        tree = compile(source, f"README.md:{first}", "exec", ast.PyCF_ONLY_AST)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "wmark":
                        try:
                            importlib.import_module(alias.name)
                        except ImportError as exc:
                            failures.append(f"README.md:{first + node.lineno - 1}: {exc}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "wmark":
                assert node.module is not None
                where = f"README.md:{first + node.lineno - 1}"
                try:
                    module = importlib.import_module(node.module)
                except ImportError as exc:
                    failures.append(f"{where}: {exc}")
                    continue
                failures += [f"{where}: {node.module} has no {alias.name}" for alias in node.names
                             if not hasattr(module, alias.name)]
    assert failures == []
