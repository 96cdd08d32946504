"""White-box end to end on real Fashion-MNIST through the CLI: key with an owner message, embed trigger and
weight marks together, permute then prune the copy, verify its weights (about a minute on 2 idle cores)."""

import json
from pathlib import Path

from clikit import REAL_DATA, run

pytestmark = REAL_DATA


def test_permuted_pruned_copy_detected_from_its_weights_independent_not(tmp_path: Path) -> None:
    key, base, marked = tmp_path / "k.key", tmp_path / "base.safetensors", tmp_path / "marked.safetensors"
    permuted, stolen, indep = (tmp_path / f"{n}.safetensors" for n in ("permuted", "stolen", "indep"))
    assert run("keygen", "--owner", "ACME Corp", "--message", "ACME Corp 2026", "--out", str(key))[0] == 0
    assert run("train", "--arch", "fmnist-cnn", "--data", "fashion-mnist@owner", "--max-samples", "6000",
               "--epochs", "1", "--out", str(base))[0] == 0
    assert run("embed", "--key", str(key), "--arch", "fmnist-cnn", "--weights", str(base), "--data",
               "fashion-mnist@owner", "--max-samples", "6000", "--epochs", "1", "--scheme", "trigger,weights",
               "--out", str(marked))[0] == 0
    assert json.loads(run("inspect", str(marked))[1])["weights"]["bit_errors_at_save"] == 0
    assert run("attack", "permute", "--arch", "fmnist-cnn", "--weights", str(marked), "--out", str(permuted),
               "--seed", "5")[0] == 0
    assert run("attack", "prune", "--arch", "fmnist-cnn", "--weights", str(permuted), "--sparsity", "0.5",
               "--out", str(stolen))[0] == 0
    assert run("train", "--arch", "fmnist-cnn", "--data", "fashion-mnist@attacker", "--max-samples", "6000",
               "--epochs", "1", "--seed", "3", "--out", str(indep))[0] == 0

    whitebox = ["verify", "file", "--whitebox", "--key", str(key), "--reference", str(marked), "--json"]
    code, out = run(*whitebox, "--anchor", str(base), "--suspect", str(stolen))
    doc = json.loads(out)
    test = doc["tests"][0]
    assert code == 0 and doc["decision"] == "detected" and doc["log10_p"] < -6
    assert test["details"]["aligned_to"] == "anchor" and test["null"]["exact_by_construction"]
    assert test["details"]["decoded_message"] == "ACME Corp 2026"
    assert run(*whitebox, "--suspect", str(stolen))[0] == 0

    code, out = run(*whitebox, "--anchor", str(base), "--suspect", str(indep))
    doc = json.loads(out)
    assert code == 1 and doc["decision"] == "not_detected" and doc["log10_p"] > -3
    assert run(*whitebox, "--suspect", str(indep))[0] == 1
