"""The ``wmark`` console command's entry point (``[project.scripts]`` in ``pyproject.toml``).

Importing :mod:`wmark.cli` takes a second or more (torch and friends), and Ctrl-C in that time reached Python's
own handler: a traceback instead of the one line and exit 130 that a command gives. This module imports only the
standard library, so the whole start, imports included, runs under that handling.
"""

from __future__ import annotations

import sys
from typing import NoReturn

INTERRUPTED = "interrupted (Ctrl-C); no output was left half-written."


def exit_interrupted() -> NoReturn:
    """Say in one line on stderr that Ctrl-C stopped wmark, and exit 130 (128 + SIGINT, what a shell reports)."""
    sys.stderr.write(INTERRUPTED + "\n")
    sys.exit(130)


def main() -> None:
    """Run the ``wmark`` command line; Ctrl-C at any time, even while it imports, exits 130."""
    try:
        from wmark.cli import main as cli

        cli()
    except KeyboardInterrupt:
        exit_interrupted()
