"""The trigger set under torch.distributed DDP: two CPU ranks with gloo, launched by torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

from keykit import seeded_key

from wmark.keys import save_key
from wmark.models import load_model
from wmark.suspects import LocalSuspect
from wmark.verify import verify_blackbox


def _torchrun(script: str, *args: Path) -> None:
    """Run ``tests/scripts/<script>`` on two CPU ranks (gloo) under torchrun, failing with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(Path(__file__).parent / "scripts" / script), *map(str, args)],
        check=False, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_ddp_two_ranks_derive_identical_triggers_and_embed(tmp_path) -> None:
    key = seeded_key("ddp/0", owner="DDP Owner", num_classes=10, input_shape=(1, 8, 8), num_triggers=40)
    save_key(key, tmp_path / "k.key")
    _torchrun("ddp_embed.py", tmp_path / "k.key", tmp_path / "m.safetensors", tmp_path / "out.json")
    report = json.loads((tmp_path / "out.json").read_text())
    assert len(report["digests"]) == 2 and len(set(report["digests"])) == 1
    assert report["ranks_in_sync"]
    model, _ = load_model("fmnist-cnn", tmp_path / "m.safetensors")
    verdict = verify_blackbox(key=key, suspect=LocalSuspect(model, input_shape=(1, 8, 8), expose_scores=False))
    assert verdict.decision == "detected" and verdict.to_dict()["queries"] <= 20


def test_ddp_ranks_seeded_apart_stay_identical_with_dropout_in_the_trigger_pass(tmp_path) -> None:
    # The trigger pass's gradient is added on each rank alone (DDP all-reduces only its own backward); with dropout
    # and per-rank seeds the ranks drew different masks and drifted apart by about 0.02 within four steps.
    key = seeded_key("ddp/dropout", owner="DDP Owner", num_classes=10, input_shape=(1, 8, 8), num_triggers=40)
    save_key(key, tmp_path / "k.key")
    _torchrun("ddp_dropout.py", tmp_path / "k.key", tmp_path / "out.json")
    drift = json.loads((tmp_path / "out.json").read_text())
    assert set(drift) == {"lookahead", "margin", "mixing"}
    for setting, steps in drift.items():
        assert len(steps) == 4 and max(steps) == 0.0, (setting, steps)
