"""The research shared feature map (``shared_map.py``): it keeps the served directions a reference represents."""

from __future__ import annotations

import numpy as np
from shared_map import shared_variance


def test_shared_variance_gives_each_whitened_direction_its_r2_from_the_reference_features():
    rng = np.random.default_rng(0)
    psi = rng.normal(size=(4000, 6))
    psi = (psi - psi.mean(0)) / psi.std(0)
    seen = np.c_[2 * psi[:, 0], psi[:, 1] + rng.normal(size=4000), rng.normal(size=(4000, 3))]
    r2 = np.diag(shared_variance(psi, [seen]))
    assert r2[0] > 0.99 and 0.4 < r2[1] < 0.6 and r2[2:].max() < 0.01
    both = shared_variance(psi, [seen, rng.normal(size=(4000, 4))])
    np.testing.assert_allclose(np.diag(both)[:2], r2[:2] / 2, atol=0.01)
