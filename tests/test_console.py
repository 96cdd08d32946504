"""The ``wmark`` console command: Ctrl-C at any time exits 130 with one line on stderr, never a traceback."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from wmark.cli import main
from wmark.console import INTERRUPTED

ROOT = Path(__file__).resolve().parents[1]

# The entry point pyproject.toml names, run with torch's import held up (until the test's SIGINT ends it) so that the
# signal lands while the command imports, whatever the machine's speed.
SLOW_START = """
import importlib, importlib.abc, signal, sys, time

# Ctrl-C as a terminal delivers it: a test run in the background by a shell without job control ignores SIGINT
signal.signal(signal.SIGINT, signal.default_int_handler)

class SlowTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("importing torch", flush=True)
            time.sleep(120)
        return None

sys.meta_path.insert(0, SlowTorch())
module, function = sys.argv[1].split(":")
sys.argv = ["wmark", "--version"]
getattr(importlib.import_module(module), function)()
"""


def _entry_point() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'^\[project\.scripts\]\nwmark = "([\w.]+:\w+)"$', text, re.MULTILINE)
    assert found, "pyproject.toml names no wmark console script"
    return found.group(1)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT cannot be sent to another process on Windows")
def test_ctrl_c_while_the_command_imports_exits_130_in_one_line() -> None:
    """Ctrl-C in the first second or so, while torch imported, printed a KeyboardInterrupt traceback."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_START, _entry_point()], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline() if proc.stdout else ""
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert ready == "importing torch\n", err
    assert (proc.returncode, err, out) == (130, INTERRUPTED + "\n", "")


def test_ctrl_c_while_click_reads_the_command_line_exits_130_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before a command's own handling, click turned Ctrl-C into "Aborted!" and exit 1."""
    def interrupted(*_args: object) -> list[str]:
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "parse_args", interrupted)
    result = CliRunner().invoke(main, ["--version"])
    assert (result.exit_code, result.stderr, result.stdout) == (130, INTERRUPTED + "\n", "")
    monkeypatch.undo()
    keygen = main.commands["keygen"]
    monkeypatch.setattr(keygen, "parse_args", interrupted)
    result = CliRunner().invoke(main, ["keygen", "--owner", "A", "--out", "k.key"])
    assert (result.exit_code, result.stderr, result.stdout) == (130, INTERRUPTED + "\n", "")
