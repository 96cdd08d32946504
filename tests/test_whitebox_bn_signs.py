"""Row signs a norm absorbs: a conv row followed by BatchNorm flips with the norm's γ and running mean
(``BN(−z) = BN(z)`` then) without changing the function, so a thief could flip the rows that carry the mark.
The graph records these signs, `permute_spaces(signs=True)` applies them, and the aligner reads them back
from the suspect and the unmarked anchor only: the mark survives, independent models stay at chance, and a
reading without the recovery loses the mark."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _whitebox_helpers import check, image_task, mark_over_anchor, tiny_key
from _whitebox_helpers import train_on_images as train
from scipy import stats
from torch import nn

from wmark.attacks import prune, rename_tensors
from wmark.attacks.symmetry import fold_batchnorm, permute_spaces
from wmark.errors import UsageError
from wmark.io import load_tensors, save_tensors
from wmark.resnet import ResNet
from wmark.whitebox.graph import read_graph
from wmark.whitebox.verify import verify_whitebox

MARKED = "blocks.3.conv2.weight"


def resnet(seed: int) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(num_classes=10, input_shape=(3, 16, 16), widths=(8, 16, 32))




def flipped(model: nn.Module, seed: int) -> ResNet:
    """``model`` with every space permuted and every BatchNorm-followed conv row's sign flipped at random."""
    out = resnet(99)
    out.load_state_dict(permute_spaces(model.state_dict(), graph=read_graph(model), seed=seed, signs=True))
    return out.eval()


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """(key, marked ResNet, folder with ref.safetensors and its unmarked base anchor.safetensors)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("bnsigns")
    key = tiny_key(64, seed=31)
    model, emb = mark_over_anchor(key, train(resnet(0), 0, steps=30), d, train, steps=50)
    assert emb.bit_errors() == 0 and emb.layer == MARKED
    return key, model, d


class Shared(nn.Module):
    """A conv read both by its BatchNorm and by the residual add: flipping its rows would change the add."""

    def __init__(self, conv: nn.Sequential) -> None:
        super().__init__()
        self.conv = conv
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv[0](x)
        return self.head(self.conv[1](z) + z)


def test_the_graph_records_which_norm_absorbs_each_layers_row_signs() -> None:
    g = read_graph(resnet(0))
    assert all(lay.own == "rows" for lay in g.layers[:-1]) and g.layers[-1].own == ""
    assert g.layer(MARKED).absorbers == ("blocks.3.bn2.weight", "blocks.3.bn2.running_mean")
    assert g.layer("blocks.1.down.0.weight").absorbers == ("blocks.1.down.1.weight", "blocks.1.down.1.running_mean")
    # A conv whose output also feeds something other than its BatchNorm owns no signs; GroupNorm(C, C) absorbs
    # each row's, GroupNorm(1, C) only one sign for the whole layer.
    g = read_graph(Shared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    assert g.layer("conv.0.weight").own == ""
    for norm, own in ((nn.GroupNorm(4, 4), "rows"), (nn.GroupNorm(1, 4), "whole"), (nn.BatchNorm2d(4, affine=False), "")):
        g = read_graph(nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.ReLU(), nn.Conv2d(4, 2, 1)))
        assert g.layer("0.weight").own == own, norm


def test_bn_sign_flips_keep_the_function_and_are_undone_by_folding() -> None:
    model = train(resnet(3), 0, steps=10)
    with torch.no_grad():  # non-zero running means, so a running mean left unflipped would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
    x = image_task(5, 32)[0]
    other = flipped(model, 1)
    assert torch.allclose(other(x), model(x), atol=1e-5)
    assert (other.blocks[3].bn2.weight < 0).sum() >= 8 and (model.blocks[3].bn2.weight > 0).all()
    assert torch.allclose(fold_batchnorm(other)(x), model(x), atol=1e-5)


class Norms(nn.Module):
    """Each kind of norm that absorbs a layer's row signs: per row (GroupNorm(C, C), BatchNorm1d) or whole
    (GroupNorm(1, C), a LayerNorm over a linear layer's units)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3), nn.GroupNorm(8, 8)
        self.c2, self.n2 = nn.Conv2d(8, 8, 3), nn.GroupNorm(1, 8)
        self.f1, self.n3 = nn.Linear(8, 16), nn.BatchNorm1d(16)
        self.f2, self.n4 = nn.Linear(16, 16), nn.LayerNorm(16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.n2(self.c2(torch.relu(self.n1(self.c1(x)))))).mean((2, 3))
        return self.head(torch.relu(self.n4(self.f2(torch.relu(self.n3(self.f1(h)))))))


def test_every_norm_that_absorbs_row_signs_keeps_the_function_when_they_flip() -> None:
    torch.manual_seed(0)
    model = Norms()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        model.n3.running_mean.normal_()
    model.eval()
    g = read_graph(model)
    assert [lay.own for lay in g.layers] == ["rows", "whole", "rows", "whole", ""]
    x = torch.randn(4, 3, 8, 8)
    sd = permute_spaces(model.state_dict(), graph=g, seed=2, signs=True)
    assert (sd["n2.weight"] < 0).all() and (sd["n1.weight"] < 0).any() and (sd["n1.weight"] > 0).any()
    other = Norms()
    other.load_state_dict(sd)
    assert torch.allclose(other.eval()(x), model(x), atol=1e-5)


def test_the_mark_survives_sign_flips_permutation_fine_tune_and_pruning(cnn) -> None:
    key, model, d = cnn
    for seed in (0, 1):
        verdict = check(key, d, rename_tensors(flipped(model, seed).state_dict(), seed=seed), "flipped")
        assert verdict.detected and verdict.tests[0].matches == 64, verdict.tests[0].matches
    attacked = prune(train(flipped(model, 3), 2, steps=40), sparsity=0.3)
    verdict = check(key, d, rename_tensors(attacked.state_dict(), seed=2), "attacked")
    test = verdict.tests[0]
    assert verdict.detected and test.matches >= 60, test.matches
    assert test.null["exact_by_construction"] and test.details["own_row_signs"] == "read against the anchor"


def test_reading_without_the_sign_recovery_loses_the_mark(cnn, tmp_path) -> None:
    """The same plan without the signs the norms absorb (as recorded before they were), or no anchor to read the
    marked layer's signs against: the flipped copy is not detected."""
    key, model, d = cnn
    save_tensors(flipped(model, 1).state_dict(), tmp_path / "sus.safetensors")
    tensors, meta = load_tensors(d / "ref.safetensors")
    info = json.loads(meta["wmark.weights"])
    info["graph"]["layers"] = [{k: v for k, v in lay.items() if k != "own"} for lay in info["graph"]["layers"]]
    save_tensors(tensors, tmp_path / "blind.safetensors", metadata={"weights": info,
                                                                    "commitment": meta["wmark.commitment"]})
    verdict = verify_whitebox(key=key, reference=tmp_path / "blind.safetensors", suspect=tmp_path / "sus.safetensors",
                              anchor=d / "anchor.safetensors")
    assert not verdict.detected and verdict.tests[0].matches < 40, verdict.tests[0].matches
    verdict = verify_whitebox(key=key, reference=d / "ref.safetensors", suspect=tmp_path / "sus.safetensors")
    assert not verdict.detected and verdict.tests[0].details["own_row_signs"].startswith("not read")


def test_an_anchor_whose_marked_layer_is_not_the_base_is_refused(cnn, tmp_path) -> None:
    """The marked layer's signs are read against the anchor's copy of it: one carrying the mark would pull every
    suspect's signs toward it, so that copy must be the base's as recorded at embedding, even nudged slightly."""
    key, _, d = cnn
    tensors, _ = load_tensors(d / "anchor.safetensors")
    nudged = tensors[MARKED] + 1e-3 * torch.randn_like(tensors[MARKED])
    save_tensors({**tensors, MARKED: nudged}, tmp_path / "doctored.safetensors")
    save_tensors(train(resnet(100), 100, steps=20).state_dict(), tmp_path / "sus.safetensors")
    with pytest.raises(UsageError, match="is not the model the reference was fine-tuned from"):
        verify_whitebox(key=key, reference=d / "ref.safetensors", suspect=tmp_path / "sus.safetensors",
                        anchor=tmp_path / "doctored.safetensors")


def test_without_a_recorded_digest_an_anchor_carrying_the_mark_is_refused(cnn, tmp_path) -> None:
    """A reference embedded before the marked layer's digest was recorded: the anchor is checked by reading it."""
    key, model, d = cnn
    tensors, meta = load_tensors(d / "ref.safetensors")
    info = json.loads(meta["wmark.weights"])
    del info["anchor_marked_digest"]
    save_tensors(tensors, tmp_path / "old-ref.safetensors", metadata={**meta, "wmark.weights": json.dumps(info)})
    anchor, _ = load_tensors(d / "anchor.safetensors")
    save_tensors({**anchor, MARKED: model.state_dict()[MARKED]}, tmp_path / "doctored.safetensors")
    save_tensors(train(resnet(100), 100, steps=20).state_dict(), tmp_path / "sus.safetensors")
    with pytest.raises(UsageError, match=f"reads 64 of 64 bits of this key's mark in {MARKED}, so it is not the "
                                         "unmarked base"):
        verify_whitebox(key=key, reference=tmp_path / "old-ref.safetensors", suspect=tmp_path / "sus.safetensors",
                        anchor=tmp_path / "doctored.safetensors")


def test_independent_resnets_stay_at_chance_after_sign_recovery(cnn) -> None:
    """Trained and random ResNets, half of them sign-flipped: p-values no smaller than a calibrated test allows."""
    key, _, d = cnn
    for seed in range(2):
        verdict = check(key, d, flipped(train(resnet(100 + seed), 100 + seed, steps=50), seed).state_dict(), "indep")
        assert not verdict.detected and verdict.tests[0].log10_p > -3, verdict.tests[0].matches
    n = 16
    log10_ps = [check(key, d, (flipped(resnet(300 + i), i) if i % 2 else resnet(300 + i)).state_dict(),
                      "null").tests[0].details["log10_p_uncorrected"] for i in range(n)]
    p = 10 ** np.asarray(log10_ps)
    for t in (0.05, 0.25, 0.5):
        assert np.sum(p <= t) <= stats.binom.ppf(0.999, n, t), (t, np.sum(p <= t))
    assert min(log10_ps) > -3
