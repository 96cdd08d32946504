"""Shared helpers for end-to-end tests that drive the CLI on real Fashion-MNIST."""

import pytest
from click.testing import CliRunner

from wmark.cli import main
from wmark.data import FASHION_MNIST_DIR

REAL_DATA = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs apt-get install dataset-fashion-mnist"),
]


def run(*args: str) -> tuple[int, str]:
    """Run ``wmark ARGS`` in-process; return the exit code and standard output."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout
