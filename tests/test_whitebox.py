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
from wmark.errors import RuntimeFailure, UsageError
from wmark.io import load_tensors, save_model, save_tensors
from wmark.keys import save_key
from wmark.whitebox.verify import match_neurons, verify_whitebox

CHAIN = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("wbx")
    key = tiny_key(seed=10)
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


def test_permuted_copy_verifies_when_an_earlier_layer_shares_the_marked_shape(tmp_path) -> None:
    # hidden layers b and c are both 128x128: b must still be aligned when c is the marked layer
    from wmark.schemes.weights import WeightsEmbedder

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    key = tiny_key(seed=3)
    emb = WeightsEmbedder(key, model, layer="5")
    assert emb.chain == ["1.weight", "3.weight", "5.weight"]
    train(model, steps=150, seed=0, embedder=emb)
    save_model(model, tmp_path / "ref.safetensors", metadata={"weights": emb.metadata()})
    chain = ["1.weight", "3.weight", "5.weight", "7.weight"]
    save_tensors(permute_state_dict(model.state_dict(), chain=chain, seed=1), tmp_path / "copy.safetensors")
    verdict = verify_whitebox(key=key, reference=tmp_path / "ref.safetensors", suspect=tmp_path / "copy.safetensors")
    test = verdict.tests[0]
    assert verdict.detected and test.matches == 64 and test.details["candidates"] == 2
    assert test.details["chain_found"] == ["1.weight", "3.weight", "5.weight"] and test.details["unaligned_layers"] == []


def test_unaligned_reading_of_a_permuted_copy_fails_so_alignment_matters(setup) -> None:
    key, model, _d = setup
    from wmark.schemes.weights import extract_bits, payload_bits

    attacked = permute_state_dict(model.state_dict(), chain=CHAIN, seed=4)
    bits = extract_bits(key, [attacked[n] for n in CHAIN[:3]])
    assert np.mean(bits == payload_bits(key)) < 0.8


def test_anchor_to_unmarked_base_detects_a_copy(setup, tmp_path) -> None:
    key = tiny_key(seed=11)
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


def _pair(i: int, d, *, same_base: bool):
    """One null pair: a fresh key, a reference marked from its base, a suspect that never saw the key."""
    from wmark.schemes.weights import WeightsEmbedder

    key = tiny_key(seed=1000 + i)
    base = train(tiny_model(1000 + i), steps=5, seed=i)
    save_model(base, d / "base.safetensors")
    marked = tiny_model(0)
    marked.load_state_dict(base.state_dict())
    emb = WeightsEmbedder(key, marked)
    train(marked, steps=25, seed=i, embedder=emb)
    save_model(marked, d / "ref.safetensors", metadata={"weights": emb.metadata()})
    if same_base:
        suspect = tiny_model(0)
        suspect.load_state_dict(base.state_dict())
        train(suspect, steps=10, seed=9 * i + 2)
        suspect.load_state_dict(permute_state_dict(suspect.state_dict(), chain=CHAIN, seed=i))
    else:
        suspect = train(tiny_model(5000 + i), steps=10, seed=7 * i + 1)
    save_model(suspect, d / "sus.safetensors")
    return key, marked


def test_anchor_alignment_never_reads_the_reference_so_bits_are_exact_coins(tmp_path) -> None:
    """With an anchor the aligned vector is a function of (anchor, suspect) only, hence independent of the key.

    Structural half: references marked with two different keys from one base give the very same alignment,
    and ``align_chain`` ignores the marked layer it is handed. Statistical half: for that fixed vector, the
    match counts over 3000 random keys follow Binomial(64, 1/2) (scipy reference), so P(p <= t) <= t.
    """
    from wmark.schemes.weights import payload_bits, projection
    from wmark.whitebox.verify import align_chain

    key_a, _ = _pair(0, tmp_path, same_base=True)
    (tmp_path / "ref.safetensors").rename(tmp_path / "ref_a.safetensors")
    key_b, _ = _pair(0, tmp_path, same_base=True)
    runs = [verify_whitebox(key=k, reference=tmp_path / ref, suspect=tmp_path / "sus.safetensors",
                            anchor=tmp_path / "base.safetensors").tests[0]
            for k, ref in ((key_a, "ref_a.safetensors"), (key_b, "ref.safetensors"))]
    assert runs[0].details["alignment_similarity"] == runs[1].details["alignment_similarity"]
    assert runs[0].null["exact_by_construction"] and runs[0].details["anchor_recorded"]

    anchor, _ = load_tensors(tmp_path / "base.safetensors")
    suspect, _ = load_tensors(tmp_path / "sus.safetensors")
    chain_a = [anchor[n] for n in CHAIN[:2]] + [torch.randn(32, 256)]
    chain_b = [anchor[n] for n in CHAIN[:2]] + [torch.zeros(32, 256)]
    vector, _ = align_chain(chain_a, [suspect[n] for n in CHAIN[:3]])
    assert torch.equal(vector, align_chain(chain_b, [suspect[n] for n in CHAIN[:3]])[0])

    n = 3000
    u = vector / vector.norm()
    matches = np.array([int(np.sum(((projection(k, 256) @ u) >= 0).numpy() == payload_bits(k)))
                        for k in (tiny_key(seed=10_000 + j) for j in range(n))])
    observed = np.bincount(matches, minlength=65)
    expected = n * stats.binom.pmf(np.arange(65), 64, 0.5)
    lo, hi = 24, 40  # pool the tails so every cell expects >= 5
    cells_o = [observed[:lo].sum(), *observed[lo:hi + 1], observed[hi + 1:].sum()]
    cells_e = [expected[:lo].sum(), *expected[lo:hi + 1], expected[hi + 1:].sum()]
    assert stats.chisquare(cells_o, cells_e).pvalue > 1e-3
    p = stats.binom.sf(matches - 1, 64, 0.5)
    for t in (0.01, 0.05, 0.25, 0.5):
        assert np.sum(p <= t) <= stats.binom.ppf(0.999, n, t), t


def test_reference_alignment_null_on_a_small_panel(tmp_path) -> None:
    """Without an anchor the null is checked empirically (full panel: benchmarks/whitebox_null.py).

    Half the suspects share the reference's base model and are permuted, the hardest honest case. None may
    come near detection, and the fraction of small p-values must not exceed what a calibrated test allows.
    """
    n = 24
    log10_ps = []
    for i in range(n):
        key, _ = _pair(i, tmp_path, same_base=i % 2 == 0)
        test = verify_whitebox(key=key, reference=tmp_path / "ref.safetensors",
                               suspect=tmp_path / "sus.safetensors").tests[0]
        assert test.details["aligned_to"] == "reference" and not test.null["exact_by_construction"]
        log10_ps.append(test.details["log10_p_uncorrected"])
    p = 10 ** np.asarray(log10_ps)
    for t in (0.05, 0.25, 0.5):
        assert np.sum(p <= t) <= stats.binom.ppf(0.999, n, t), (t, np.sum(p <= t))
    assert min(log10_ps) > -3


def test_anchor_that_is_not_the_base_is_refused(tmp_path) -> None:
    save_model(tiny_model(42), tmp_path / "other.safetensors")
    key, _ = _pair(2, tmp_path, same_base=False)
    with pytest.raises(UsageError, match="is not the model the reference was fine-tuned from .its layers differ"):
        verify_whitebox(key=key, reference=tmp_path / "ref.safetensors", suspect=tmp_path / "sus.safetensors",
                        anchor=tmp_path / "other.safetensors")


def test_a_half_precision_copy_of_the_base_is_refused_naming_its_precision(tmp_path) -> None:
    """The recorded digest is of the full-precision base, which a float16 copy cannot match; the refusal said only
    that the anchor was some other model."""
    key, _ = _pair(3, tmp_path, same_base=False)
    base, _ = load_tensors(tmp_path / "base.safetensors")
    save_tensors({n: t.half() for n, t in base.items()}, tmp_path / "base16.safetensors")
    with pytest.raises(UsageError, match=r"\(its layers are stored as F16 and the base's were recorded in full "
                                         r"precision; pass the base as it was saved, or no anchor\)\.$"):
        verify_whitebox(key=key, reference=tmp_path / "ref.safetensors", suspect=tmp_path / "sus.safetensors",
                        anchor=tmp_path / "base16.safetensors")


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
    save_tensors({n: torch.full_like(t, float("nan")) for n, t in model.state_dict().items()},
                 tmp_path / "nan.safetensors")
    with pytest.raises(RuntimeFailure, match=r"holds NaN or infinite values; white-box verification needs finite"):
        verify_whitebox(key=key, reference=d / "marked.safetensors", suspect=tmp_path / "nan.safetensors")


def test_extra_tensors_of_another_dtype_or_holding_nan_do_not_stop_verification(setup, tmp_path) -> None:
    """A thief's extra tensor shaped like a chain layer (an int64 buffer, a NaN-filled decoy) aborted verification."""
    key, model, d = setup
    tensors = dict(model.state_dict())
    fc1, conv2 = tensors["fc1.weight"], tensors["conv2.weight"]
    decoys = {"a.mask": torch.zeros_like(fc1, dtype=torch.int64), "b.decoy": torch.full_like(fc1, float("nan")),
              "c.decoy": torch.full_like(conv2, float("inf"))}
    save_tensors({**tensors, **decoys}, tmp_path / "decoys.safetensors")
    verdict = verify_whitebox(key=key, reference=d / "marked.safetensors", suspect=tmp_path / "decoys.safetensors")
    assert verdict.detected and verdict.tests[0].details["candidates"] == 1


def test_cli_whitebox_exit_codes(setup, tmp_path) -> None:
    key, _, d = setup
    save_key(key, tmp_path / "k.key")
    save_model(tiny_model(77), tmp_path / "indep.safetensors")
    base = ["verify", "file", "--whitebox", "--key", str(tmp_path / "k.key"), "--reference", str(d / "marked.safetensors")]
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
    no_ref = runner.invoke(main, ["verify", "file", "--whitebox", "--key", str(tmp_path / "k.key"),
                                  "--suspect", str(d / "marked.safetensors")])
    assert no_ref.exit_code == 2 and "--reference" in no_ref.stderr
