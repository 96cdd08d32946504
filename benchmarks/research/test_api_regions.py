"""Keyed region marks: exact per-cell null, determinism, a thief that learns the cells is caught, errors."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from _api_helpers import LinearModel
from api_regions import (
    RegionMarkedAPI,
    accuracy_cost,
    build_region_map,
    cell_pluralities,
    count_statistic_log10_sf,
    load_region_map,
    pooled_features,
    region_test,
)
from keykit import seeded_key
from scipy import stats

from wmark.errors import UsageError
from wmark.keys import generate_key
from wmark.models import penultimate_featurizer

C, D = 5, 6
Linear = partial(LinearModel, num_classes=C, dims=D)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).random((400, D), dtype=np.float32)


def make_map(key, x, backend, **kw):
    return build_region_map(key=key, x=x, served_labels=backend.query(x).labels, **kw)


def test_targets_avoid_the_excluded_class_and_are_deterministic(data):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    a = make_map(key, data, backend, num_regions=20, num_marked=6)
    b = make_map(key, data, backend, num_regions=20, num_marked=6)
    np.testing.assert_array_equal(a.targets, b.targets)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert len(set(a.marked.tolist())) == 6
    assert (a.targets != a.excluded[a.marked]).all()
    api = RegionMarkedAPI(key=key, backend=backend, regions=a)
    first, second = api.query(data), api.query(data)
    np.testing.assert_array_equal(first.labels, second.labels)
    target = a.target_of(a.regions(data))
    np.testing.assert_array_equal(first.labels[target >= 0], target[target >= 0])
    np.testing.assert_array_equal(first.labels[target < 0], backend.query(data).labels[target < 0])
    np.testing.assert_allclose(first.scores.sum(1), 1.0)
    assert (first.scores.argmax(1) == first.labels).all()


def test_targets_are_uniform_on_the_other_classes():
    # Over many keys, each cell's target is uniform on the C - 1 non-excluded classes (chi-square vs scipy).
    x = np.random.default_rng(1).random((60, D), dtype=np.float32)
    labels = np.zeros(60, dtype=np.int64)
    counts = np.zeros(C, dtype=np.int64)
    for i in range(300):
        key = seeded_key(f"regions/targets/{i}", owner=f"o{i}", num_classes=C, input_shape=(D,))
        rmap = build_region_map(key=key, x=x, served_labels=labels, num_regions=6, num_marked=3, iterations=0)
        counts += np.bincount(rmap.targets, minlength=C)
    assert counts[0] == 0
    assert stats.chisquare(counts[1:]).pvalue > 1e-3


def test_null_is_super_uniform_for_a_key_independent_model(data):
    # A fixed model, many keys: p-values must satisfy P(p <= a) <= a (up to sampling error), and the
    # match count per test must follow Binomial(cells, 1/(C-1)) exactly.
    backend, suspect = Linear(1), Linear(2)
    logs, counts, tail = [], [], []
    for i in range(300):
        key = seeded_key(f"regions/null/{i}", owner=f"k{i}", num_classes=C, input_shape=(D,))
        rmap = make_map(key, data, backend, num_regions=20, num_marked=8, iterations=2)
        res = region_test(key=key, regions=rmap, suspect=suspect, inputs=data, min_inputs=3, statistic="plurality")
        logs.append(res.log10_p)
        counts.append(res.details["count_log10_p"])
        n = res.details["cells_counted"]
        tail.append(stats.binom.sf(res.matches - 1, n, 1 / (C - 1)) if n else 1.0)
    p = 10.0 ** np.asarray(logs)
    np.testing.assert_allclose(p, tail, rtol=1e-9)
    for pv in (p, 10.0 ** np.asarray(counts)):
        for a in (0.05, 0.1, 0.2, 0.5):
            # one-sided binomial bound on the empirical rejection rate under the null
            assert stats.binom.sf((pv <= a).sum() - 1, len(pv), a) > 1e-3


def test_count_statistic_matches_brute_force_enumeration():
    import itertools

    cells = [np.array([0, 3, 1, 0]), np.array([2, 2, 5]), np.array([7, 0])]
    sums = [sum(choice) for choice in itertools.product(*cells)]
    for observed in range(17):
        expected = np.mean([s >= observed for s in sums])
        got = count_statistic_log10_sf(observed, cells)
        assert (got == -np.inf and expected == 0) or 10.0 ** got == pytest.approx(expected, rel=1e-12)
    # many cells: no underflow, and the all-maximal corner has probability prod(1/len)
    many = [np.array([1, 0, 0, 0, 0, 0, 0, 0, 0])] * 400
    assert count_statistic_log10_sf(400, many) == pytest.approx(-400 * np.log10(9))


def test_a_thief_that_learned_the_cells_is_caught_and_the_server_is_not_falsely_framed(data):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    rmap = make_map(key, data, backend, num_regions=20, num_marked=12)
    thief = RegionMarkedAPI(key=key, backend=backend, regions=rmap)
    res = region_test(key=key, regions=rmap, suspect=thief, inputs=data, min_inputs=3, statistic="plurality")
    assert res.matches == res.details["cells_counted"] > 0
    assert res.details["count_log10_p"] <= res.log10_p + 1e-9
    assert res.log10_p == pytest.approx(stats.binom.logsf(res.matches - 1, res.matches, 1 / (C - 1)) / np.log(10))
    innocent = region_test(key=key, regions=rmap, suspect=backend, inputs=data, min_inputs=3)
    assert innocent.log10_p > -3


def test_plurality_ignores_the_excluded_class_and_breaks_ties_low():
    answers = np.array([0, 0, 0, 3, 2, 2, 3, 1, -1])
    regions = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1])
    out = cell_pluralities(answers, regions, np.array([0, 1]), 4)
    assert out[0] == (2, 2, 7)
    assert out[1] == (-1, 0, 1)


def test_save_load_roundtrip_rederives_targets(tmp_path, data):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    rmap = make_map(key, data, Linear(1), num_regions=10, num_marked=3)
    rmap.save(tmp_path / "map.safetensors")
    back = load_region_map(tmp_path / "map.safetensors", key=key)
    np.testing.assert_array_equal(back.targets, rmap.targets)
    np.testing.assert_array_equal(back.regions(data), rmap.regions(data))
    other = generate_key(owner="x", num_classes=C, input_shape=(D,))
    with pytest.raises(UsageError, match="built under another key"):
        load_region_map(tmp_path / "map.safetensors", key=other)


def test_pooling_and_cost(data):
    img = np.arange(2 * 16, dtype=np.float32).reshape(2, 1, 4, 4)
    np.testing.assert_allclose(pooled_features(img, pool=2)[0], [2.5, 4.5, 10.5, 12.5])
    assert pooled_features(data, pool=4).shape == data.shape
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    rmap = make_map(key, data, backend, num_regions=20, num_marked=2)
    served = backend.query(data).labels
    cost = accuracy_cost(regions=rmap, x=data, y=served, served_labels=served)
    assert cost["served_accuracy"] == 1.0
    assert cost["accuracy_cost_pp"] == pytest.approx(100 * cost["changed_fraction"])


def test_errors(data):
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    labels = backend.query(data).labels
    with pytest.raises(UsageError, match="num_marked must be between"):
        build_region_map(key=key, x=data, served_labels=labels, num_regions=5, num_marked=6)
    with pytest.raises(UsageError, match="one label per input"):
        build_region_map(key=key, x=data, served_labels=labels[:3], num_regions=5, num_marked=1)
    with pytest.raises(UsageError, match="at least 3 classes"):
        build_region_map(key=generate_key(owner="o", num_classes=2, input_shape=(D,)), x=data,
                         served_labels=labels % 2, num_regions=5, num_marked=1)
    rmap = make_map(key, data, backend, num_regions=20, num_marked=3)
    with pytest.raises(UsageError, match="answers over 3 classes"):
        region_test(key=key, regions=rmap, suspect=Linear(2, num_classes=3), inputs=data)
    with pytest.raises(UsageError, match="No marked cell holds"):
        region_test(key=key, regions=rmap, suspect=backend, inputs=data[:2], min_inputs=5)
    with pytest.raises(UsageError, match="statistic must be"):
        region_test(key=key, regions=rmap, suspect=backend, inputs=data, statistic="mean")
    with pytest.raises(UsageError, match="input shape"):
        region_test(key=key, regions=rmap, suspect=backend, inputs=data[:, :3])
    other = generate_key(owner="x", num_classes=C, input_shape=(D,))
    with pytest.raises(UsageError, match="another key"):
        RegionMarkedAPI(key=other, backend=backend, regions=rmap)
    with pytest.raises(UsageError, match="inputs shaped"):
        RegionMarkedAPI(key=key, backend=backend, regions=rmap).query(data[:, :3])


def test_penultimate_featurizer_and_feature_space_roundtrip(tmp_path, data):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.ReLU(), torch.nn.Linear(8, C))
    feat = penultimate_featurizer(net, batch_size=64)
    f = feat(data)
    expected = torch.relu(net[0](torch.from_numpy(data))).detach().numpy()
    np.testing.assert_allclose(f, expected, rtol=1e-6)
    key = generate_key(owner="o", num_classes=C, input_shape=(D,))
    rmap = make_map(key, data, Linear(1), num_regions=10, num_marked=3, featurizer=feat, feature_space="toy-net")
    rmap.save(tmp_path / "m.safetensors")
    with pytest.raises(UsageError, match="feature space 'toy-net'"):
        load_region_map(tmp_path / "m.safetensors", key=key)
    back = load_region_map(tmp_path / "m.safetensors", key=key, featurizer=feat)
    np.testing.assert_array_equal(back.regions(data), rmap.regions(data))
    with pytest.raises(UsageError, match="Name the feature space"):
        make_map(key, data, Linear(1), num_regions=10, num_marked=3, featurizer=feat)
    with pytest.raises(UsageError, match="no nn.Linear layer"):
        penultimate_featurizer(torch.nn.ReLU())
