"""The research shift-invariant feature map (``invariant_map.py``): it keeps the directions shifts leave in place,
its null stays exact, and bad requests are refused in one sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from invariant_map import Invariance, PooledFeaturizer, image_shifts, invariant_rule
from keykit import seeded_key
from scipy import stats

from wmark.errors import UsageError
from wmark.models import build_model
from wmark.schemes.tiebreak import build_tiebreak_rule, tiebreak_statistic, top_pairs

SHAPE = (1, 8, 8)
MOVING = [18, 19, 26, 27, 36, 45]  # single pixels inside the content: a shift moves them


def featurizer(x: np.ndarray) -> np.ndarray:
    """Six shift-invariant features (the six largest pixels) and six loud ones that a shift moves (single
    pixels, scaled up so that the principal directions are theirs)."""
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return np.concatenate([np.sort(flat, axis=1)[:, -6:], 5.0 * flat[:, MOVING]], axis=1)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Content in the central 4×4 of 8×8: a shift of up to 2 pixels keeps all of it in the frame."""
    x = np.zeros((600, *SHAPE), dtype=np.float32)
    x[:, :, 2:6, 2:6] = np.random.default_rng(0).uniform(size=(600, 1, 4, 4))
    return x


def key_for(name: str):
    return seeded_key(f"tiebreak/invariance/{name}", owner="o", num_classes=4, input_shape=SHAPE)


def test_image_shifts_move_by_each_offset_and_fill_with_zeros():
    inv = image_shifts(2)
    assert len(inv.transforms) == 24 and inv.name == "shifts of up to 2 pixels"
    x = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)
    moved = {tuple(np.argwhere(t(x)[0, 0] == 12)[0]) for t in inv.transforms}  # where the centre pixel went
    assert moved == {(2 + dy, 2 + dx) for dy in range(-2, 3) for dx in range(-2, 3)} - {(2, 2)}
    for t in inv.transforms:
        out = t(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert np.count_nonzero(out == 0) >= 5  # a border row or column is empty
    with pytest.raises(UsageError, match="at least 1 pixel"):
        image_shifts(0)
    with pytest.raises(UsageError, match="image batches"):
        inv.transforms[0](np.zeros((3, 5), np.float32))


def test_the_invariant_map_keeps_the_directions_shifts_leave_in_place(images):
    key = key_for("keep")
    shifted = image_shifts(2).transforms[7](images)
    principal = build_tiebreak_rule(key=key, x=images, featurizer=featurizer, feature_space="t", components=6)
    invariant = invariant_rule(key=key, x=images, featurizer=featurizer, feature_space="t", components=6,
                               invariance=image_shifts(2))
    np.testing.assert_array_equal(invariant.directions, principal.directions)
    # the keyed shift of a shifted image equals the original's under the invariant map, not the principal one
    np.testing.assert_allclose(invariant.shifts(shifted), invariant.shifts(images), atol=1e-6)
    same = np.corrcoef(principal.shifts(shifted).ravel(), principal.shifts(images).ravel())[0, 1]
    assert same < 0.5
    # still a whitened map: unit variance, uncorrelated, about N(0, 1) shifts per class
    psi = invariant.features(images)
    np.testing.assert_allclose(np.cov(psi.T), np.eye(6), atol=1e-6)
    assert abs(invariant.shifts(images).std() - 1.0) < 0.25


def test_an_innocent_suspect_has_an_exact_standard_normal_z_over_keys(images):
    # The map is key-free and the directions come from the key alone: over 200 keys one fixed suspect's Z is
    # N(0, 1) (Kolmogorov-Smirnov against scipy's normal).
    rng = np.random.default_rng(1)
    scores = rng.dirichlet(np.ones(4), size=len(images))
    _, lo, hi = top_pairs(scores)
    answers = np.where(rng.uniform(size=len(images)) < 0.5, lo, hi)
    zs = []
    for i in range(200):
        rule = invariant_rule(key=key_for(f"null/{i}"), x=images, featurizer=featurizer, feature_space="t",
                              components=6, invariance=image_shifts(1))
        z, _ = tiebreak_statistic(rule=rule, psi=rule.features(images), lo=lo, hi=hi, answers=answers)
        zs.append(z)
    assert stats.kstest(zs, "norm").pvalue > 1e-3


def test_bad_requests_are_refused_in_one_sentence(images):
    key = key_for("bad")
    build = {"key": key, "x": images, "featurizer": featurizer, "feature_space": "t", "components": 4}
    with pytest.raises(UsageError, match="no transforms"):
        invariant_rule(**build, invariance=Invariance(name="nothing", transforms=()))
    with pytest.raises(UsageError, match="must keep the shape"):
        invariant_rule(**build, invariance=Invariance(name="crop", transforms=(lambda v: v[..., 1:, 1:],)))


def test_pooled_featurizer_averages_a_conv_layer_globally_and_by_quadrant():
    model = build_model("fmnist-cnn", num_classes=10, input_shape=(1, 28, 28), seed=0)
    x = np.random.default_rng(1).uniform(size=(5, 1, 28, 28)).astype(np.float32)
    both, only = PooledFeaturizer(model, "conv2")(x), PooledFeaturizer(model, "conv2", quadrants=False)(x)
    assert both.shape == (5, 32 * 5) and only.shape == (5, 32)
    with torch.no_grad():
        act = torch.relu(model.conv2(model.pool(torch.relu(model.conv1(torch.from_numpy(x))))))
    np.testing.assert_allclose(only, act.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[:, :32], only, rtol=1e-6)
    assert not model._forward_hooks and not model.conv2._forward_hooks
    with pytest.raises(UsageError, match="no module 'conv9'"):
        PooledFeaturizer(model, "conv9")
