"""docs/cli-reference.md is the CLI's own --help of every command, kept current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "render_cli_reference.py"


def _renderer():
    spec = importlib.util.spec_from_file_location("render_cli_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_current() -> None:
    # stale: an option added or changed without `python scripts/render_cli_reference.py`
    assert _renderer().main(["--check"]) == 0


def test_the_reference_lists_every_option_of_every_command() -> None:
    import click

    from wmark.cli import main

    module = _renderer()
    page = module.render()
    missing = [(" ".join(path), opt) for path, cmd in module.commands(main) if not isinstance(cmd, click.Group)
               for param in cmd.params for opt in param.opts if opt.startswith("--") and opt not in page]
    assert missing == []
