"""White-box verification: detection through dtype changes, permutation, rescaling and renaming; the null
after alignment, checked over many (independent model, random key) pairs; every bad-input path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _whitebox_helpers import marked_file, tiny_key, tiny_model, train
from click.testing import CliRunner
from scipy import stats

from wmark.attacks import permute_state_dict, rename_tensors
from wmark.cli import main
from wmark.errors import UsageError
from wmark.io import save_model, save_tensors
from wmark.keys import save_key
from wmark.whitebox.verify import match_neurons, verify_whitebox

CHAIN = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("wbx")
    key = tiny_key()
    model, _ = marked_file(key, d / "marked.safetensors")
    return key, model, d


def test_marked_model_reads_every_bit_and_p_matches_scipy(setup) -> None:
    key, _, d = setup
    verdict = verify_whitebox(key=key, reference=d / "marked.safetensors", suspect=d / "marked.safetensors")
    test = verdict.tests[0]
    assert verdict.detected and verdict.kind == "copy" and test.evidence_of == "copy"
    assert test.matches == 64 and test.details["bit_error_rate"] == 0.0
    assert test.log10_p == pytest.approx(np.log10(stats.binom.sf(63, 64, 0.5)), rel=1e-9)
    doc = verdict.to_dict()
    assert {"decision", "kind", "log10_p", "p_value", "alpha", "null", "tests"} <= set(doc)
    assert key.secret.hex() not in json.dumps(doc)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "int8"])
def test_low_precision_suspects_verify(setup, dtype) -> None:
    key, model, d = setup
    tensors = {}
    for name, t in model.state_dict().items():
        if dtype == "int8" and t.dim() >= 2:
            scale = t.reshape(t.shape[0], -1).abs().amax(1) / 127
            tensors[name] = torch.round(t / scale.view(-1, *[1] * (t.dim() - 1))).to(torch.int8)
        else:
            tensors[name] = t.to(torch.float16 if dtype == "int8" else dtype)
    save_tensors(tensors, d / "low.safetensors")
    verdict = verify_whitebox(key=key, reference=d / "marked.safetensors", suspect=d / "low.safetensors")
    assert verdict.detected and verdict.tests[0].details["bit_error_rate"] <= 0.05


def test_permuted_rescaled_renamed_copy_keeps_predictions_and_verifies(setup) -> None:
    key, model, d = setup
    attacked = permute_state_dict(model.state_dict(), chain=CHAIN, seed=3, scale_range=(0.2, 5.0))
    copy = tiny_model(99)
    copy.load_state_dict(attacked)
    x = torch.rand(64, 1, 16, 16)
    torch.testing.assert_close(copy(x), model(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(attacked["fc1.weight"], model.state_dict()["fc1.weight"])
    save_tensors(rename_tensors(attacked, seed=1), d / "stolen.safetensors")
    verdict = verify_whitebox(key=key, reference=d / "marked.safetensors", suspect=d / "stolen.safetensors")
    test = verdict.tests[0]
    assert verdict.detected and test.matches == 64
    assert test.details["layer_found"].startswith("t") and test.details["candidates"] == 1
    assert min(test.details["alignment_similarity"]) > 0.99


def test_unaligned_reading_of_a_permuted_copy_fails_so_alignment_matters(setup) -> None:
    key, model, d = setup
    from wmark.schemes.weights import extract_bits, payload_bits

    attacked = permute_state_dict(model.state_dict(), chain=CHAIN, seed=4)
    bits = extract_bits(key, [attacked[n] for n in CHAIN[:3]])
    assert np.mean(bits == payload_bits(key)) < 0.8


def test_anchor_to_unmarked_base_detects_a_copy(setup, tmp_path) -> None:
    key = tiny_key()
    base = train(tiny_model(5), steps=40, seed=5)
    save_model(base, tmp_path / "base.safetensors")
    from wmark.schemes.weights import WeightsEmbedder

    marked = tiny_model(0)
    marked.load_state_dict(base.state_dict())
    emb = WeightsEmbedder(key, marked)
    train(marked, steps=60, seed=6, embedder=emb)
    save_model(marked, tmp_path / "marked.safetensors", metadata={"weights": emb.metadata()})
    save_tensors(permute_state_dict(marked.state_dict(), chain=CHAIN, seed=1), tmp_path / "copy.safetensors")
    verdict = verify_whitebox(key=key, reference=tmp_path / "marked.safetensors",
                              suspect=tmp_path / "copy.safetensors", anchor=tmp_path / "base.safetensors")
    assert verdict.detected and verdict.tests[0].details["aligned_to"] == "anchor"


def test_null_calibration_over_independent_models_and_random_keys(tmp_path) -> None:
    """Under the null the p-value must be (super-)uniform: P(p <= t) <= t for every t.

    Each pair has a fresh key, a reference marked with it, and a suspect that never saw that key. Half of
    the suspects are independently initialised and trained; the other half share the reference's *base*
    model (a fine-tune of the same starting point, then permuted), the hardest honest case for alignment.
    """
    n = 80
    log10_ps = []
    for i in range(n):
        key = tiny_key()
        base = train(tiny_model(1000 + i), steps=5, seed=i)
        marked = tiny_model(0)
        marked.load_state_dict(base.state_dict())
        from wmark.schemes.weights import WeightsEmbedder

        emb = WeightsEmbedder(key, marked)
        train(marked, steps=25, seed=i, embedder=emb)
        save_model(marked, tmp_path / "ref.safetensors", metadata={"weights": emb.metadata()})
        if i % 2:
            suspect = train(tiny_model(5000 + i), steps=10, seed=7 * i)
        else:
            suspect = tiny_model(0)
            suspect.load_state_dict(base.state_dict())
            train(suspect, steps=10, seed=9 * i)
            suspect.load_state_dict(permute_state_dict(suspect.state_dict(), chain=CHAIN, seed=i))
        save_model(suspect, tmp_path / "sus.safetensors")
        verdict = verify_whitebox(key=key, reference=tmp_path / "ref.safetensors", suspect=tmp_path / "sus.safetensors")
        log10_ps.append(verdict.tests[0].details["log10_p_uncorrected"])
    p = 10 ** np.asarray(log10_ps)
    print("null fractions", {t: float(np.mean(p <= t)) for t in (0.01, 0.05, 0.1, 0.25, 0.5)}, min(log10_ps))
    for t in (0.01, 0.05, 0.1, 0.25, 0.5):
        # The observed count may exceed n*t by chance; reject only beyond the 99.9 % binomial quantile.
        assert np.sum(p <= t) <= stats.binom.ppf(0.999, n, t), (t, np.sum(p <= t))
    assert min(log10_ps) > -3


def test_match_neurons_recovers_a_permutation() -> None:
    rng = np.random.default_rng(0)
    perm = rng.permutation(50)
    sim = rng.normal(0, 0.1, (50, 50))
    sim[np.arange(50), perm] += 1.0
    assert np.array_equal(match_neurons(sim), perm)


def test_suspect_without_compatible_tensor(setup, tmp_path) -> None:
    key, _, d = setup
    save_tensors({"w": torch.randn(7, 9)}, tmp_path / "other.safetensors")
    with pytest.raises(UsageError, match="has no tensor of shape"):
        verify_whitebox(key=key, reference=d / "marked.safetensors", suspect=tmp_path / "other.safetensors")


def test_reference_problems_are_clear(setup, tmp_path) -> None:
    key, model, d = setup
    save_model(model, tmp_path / "plain.safetensors")
    with pytest.raises(UsageError, match="no wmark.weights metadata"):
        verify_whitebox(key=key, reference=tmp_path / "plain.safetensors", suspect=d / "marked.safetensors")
    with pytest.raises(UsageError, match="marked with another key"):
        verify_whitebox(key=tiny_key(), reference=d / "marked.safetensors", suspect=d / "marked.safetensors")
    meta = {"weights": {"chain": CHAIN[:3], "chain_shapes": [[4, 1, 3, 3], [16, 4, 3, 3], [32, 512]]}}
    save_model(model, tmp_path / "shape.safetensors", metadata=meta)
    with pytest.raises(UsageError, match="differ from those it was marked with"):
        verify_whitebox(key=key, reference=tmp_path / "shape.safetensors", suspect=d / "marked.safetensors")
    meta = {"weights": {"chain": CHAIN[:3]}}
    save_model(tiny_model(8), tmp_path / "unmarked.safetensors", metadata=meta)
    with pytest.raises(UsageError, match="does not carry this key's weight watermark"):
        verify_whitebox(key=key, reference=tmp_path / "unmarked.safetensors", suspect=d / "marked.safetensors")


def test_corrupt_and_odd_dtype_files(setup, tmp_path) -> None:
    key, model, d = setup
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        verify_whitebox(key=key, reference=d / "marked.safetensors", suspect=tmp_path / "bad.safetensors")
    tensors = {n: t for n, t in model.state_dict().items()}
    tensors["fc1.weight"] = (tensors["fc1.weight"] > 0)
    save_tensors(tensors, tmp_path / "bool.safetensors")
    with pytest.raises(UsageError, match="has dtype BOOL"):
        verify_whitebox(key=key, reference=d / "marked.safetensors", suspect=tmp_path / "bool.safetensors")


def test_cli_whitebox_exit_codes(setup, tmp_path) -> None:
    key, _, d = setup
    save_key(key, tmp_path / "k.key")
    save_model(tiny_model(77), tmp_path / "indep.safetensors")
    base = ["verify", "--mode", "whitebox", "--key", str(tmp_path / "k.key"), "--reference", str(d / "marked.safetensors")]
    runner = CliRunner()
    hit = runner.invoke(main, [*base, "--suspect", str(d / "marked.safetensors"), "--json"])
    assert hit.exit_code == 0, hit.output
    doc = json.loads(hit.stdout)
    assert doc["decision"] == "detected" and doc["tests"][0]["name"] == "weights"
    miss = runner.invoke(main, [*base, "--suspect", str(tmp_path / "indep.safetensors")])
    assert miss.exit_code == 1, miss.output
    (tmp_path / "bad.safetensors").write_bytes(b"{}")
    bad = runner.invoke(main, [*base, "--suspect", str(tmp_path / "bad.safetensors")])
    assert bad.exit_code == 2 and "not a readable safetensors file" in bad.stderr
    no_ref = runner.invoke(main, ["verify", "--mode", "whitebox", "--key", str(tmp_path / "k.key"),
                                  "--suspect", str(d / "marked.safetensors")])
    assert no_ref.exit_code == 2 and "--reference" in no_ref.stderr
