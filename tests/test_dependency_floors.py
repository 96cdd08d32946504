"""Lower bounds in pyproject.toml that the package and the test command rely on."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _floor(name: str) -> tuple[int, ...]:
    found = re.search(rf'"{re.escape(name)}>=([0-9.]+)', (ROOT / "pyproject.toml").read_text())
    assert found, f"pyproject.toml sets no lower bound for {name}"
    return tuple(int(part) for part in found.group(1).split("."))


def test_h11_is_a_release_without_the_chunked_body_smuggling_flaw() -> None:
    """`wmark serve` parses every request with h11 (wmark.serve_protocol), also where httptools is installed; h11
    before 0.16 accepted malformed chunk terminators (CVE-2025-43859, request smuggling behind a proxy)."""
    assert _floor("h11") >= (0, 16)


def test_pytest_xdist_knows_every_option_the_test_command_passes() -> None:
    """scripts/test.sh runs `pytest --no-loadscope-reorder`, an option pytest-xdist has from 3.8: with 3.5 to 3.7,
    which the dev extras allowed, pytest stops at an unrecognized argument and no test runs."""
    assert "--no-loadscope-reorder" in (ROOT / "scripts" / "test.sh").read_text()
    assert _floor("pytest-xdist") >= (3, 8)
