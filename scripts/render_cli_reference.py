"""Write docs/cli-reference.md: every `wmark` command with its full `--help`, generated from the CLI itself.

Run it after changing a command or an option (`python scripts/render_cli_reference.py`); a test fails while the
page is stale. `--check` exits 1 instead of writing when the page's words differ (not its wrapping, which
click versions lay out differently).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "cli-reference.md"
WIDTH = 100


def commands(group: click.Group, prefix: tuple[str, ...] = ("wmark",)) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command under ``group``, depth first in name order, with its full path."""
    out: list[tuple[tuple[str, ...], click.Command]] = [(prefix, group)]
    for name in sorted(group.commands):
        cmd = group.commands[name]
        if isinstance(cmd, click.Group):
            out += commands(cmd, (*prefix, name))
        else:
            out.append(((*prefix, name), cmd))
    return out


def _help(cmd: click.Command, parent: click.Context | None, name: str, parts: list[str], path: tuple[str, ...]) -> None:
    # each context under its parent, as click makes them when run: settings such as `-h` are inherited
    settings = {"max_content_width": WIDTH, **cmd.context_settings, "terminal_width": WIDTH}
    ctx = click.Context(cmd, parent=parent, info_name=name, **settings)
    parts += [f"## `{' '.join(path)}`", "", "```text", cmd.get_help(ctx).rstrip(), "```", ""]
    if isinstance(cmd, click.Group):
        for sub in sorted(cmd.commands):
            _help(cmd.commands[sub], ctx, sub, parts, (*path, sub))


def render() -> str:
    """The page's Markdown."""
    from wmark.cli import main

    parts = ["# `wmark` command reference", "",
             "Generated from the command line itself by `scripts/render_cli_reference.py`; do not edit. The",
             "workflows and what each command is for are in [cli.md](cli.md).", ""]
    _help(main, None, "wmark", parts, ("wmark",))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale instead of writing it")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        old, new = current.split(), text.split()
        if old != new:  # wrapping may differ between click versions; words may not
            at = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
            print(f"{PAGE.relative_to(ROOT)} is stale (at {' '.join(old[at - 8:at + 8])!r}, now "
                  f"{' '.join(new[at - 8:at + 8])!r}); run python scripts/render_cli_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
