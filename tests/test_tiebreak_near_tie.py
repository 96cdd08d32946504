"""The near-tie swap: it changes only near ties, to the keyed choice of the top two, and its followers are caught."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from _api_helpers import LinearModel
from keykit import seeded_key

from wmark.errors import UsageError
from wmark.schemes.tiebreak import TieBreakAPI, accuracy_cost, build_tiebreak_rule, tiebreak_test
from wmark.suspects import Answers

C, D, F = 4, 6, 12
Linear = partial(LinearModel, num_classes=C, dims=D)
_PROJ = np.random.default_rng(99).normal(size=(D, F))


def featurizer(x: np.ndarray) -> np.ndarray:
    return np.tanh(np.asarray(x, dtype=np.float64) @ _PROJ)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(1500, D)).astype(np.float32)


def test_only_near_ties_change_and_each_to_the_keyed_choice_of_the_top_two(data):
    key = seeded_key("tiebreak/near-tie", owner="o", num_classes=C, input_shape=(D,))
    backend = Linear(1)
    rule = build_tiebreak_rule(key=key, x=data, featurizer=featurizer, feature_space="test", components=8)
    gap = 0.4
    api = TieBreakAPI(key=key, backend=backend, rule=rule, near_tie=gap)
    served = backend.query(data).scores
    marked = api.query(data)
    order = np.argsort(-served, axis=1)
    rows = np.arange(len(data))
    first, second = order[:, 0], order[:, 1]
    close = np.log(served[rows, first] / served[rows, second]) < gap
    u = rule.shifts(data)
    keyed = np.where(u[rows, second] > u[rows, first], second, first)
    np.testing.assert_array_equal(marked.labels[close], keyed[close])
    np.testing.assert_array_equal(marked.labels[~close], first[~close])
    assert 0.2 < (marked.labels != first)[close].mean() < 0.8  # the key picks either of the pair
    np.testing.assert_allclose(np.sort(marked.scores, axis=1), np.sort(served, axis=1))  # a swap, nothing else
    np.testing.assert_array_equal(api.query(data).labels, marked.labels)
    shifted = TieBreakAPI(key=key, backend=backend, rule=rule, beta=1.0)
    y = backend.query(data).labels  # a labelled set where the served model is always right: every change costs
    swap_cost, shift_cost = accuracy_cost(api=api, x=data, y=y), accuracy_cost(api=shifted, x=data, y=y)
    assert 0 < swap_cost["changed_fraction"] < close.mean()
    assert shift_cost["changed_fraction"] > swap_cost["changed_fraction"]
    assert api.for_client("c").near_tie == gap


class Follower:
    """Answers the marked API's label with probability ``q``, else the served one."""

    def __init__(self, api: TieBreakAPI, q: float, seed: int) -> None:
        self.api, self.q, self.rng = api, q, np.random.default_rng(seed)
        self.description, self.num_classes, self.input_shape = "follower", C, (D,)

    def query(self, x: np.ndarray) -> Answers:
        marked, plain = self.api.query(x).labels, self.api.backend.query(x).labels
        return Answers(labels=np.where(self.rng.random(len(x)) < self.q, marked, plain))


def test_a_near_tie_follower_is_caught_and_the_unmarked_server_is_not(data):
    caught, innocent = [], []
    for seed in range(4):
        key = seeded_key(f"tiebreak/near-tie/{seed}", owner="o", num_classes=C, input_shape=(D,))
        backend = Linear(1)
        rule = build_tiebreak_rule(key=key, x=data, featurizer=featurizer, feature_space="test", components=F)
        api = TieBreakAPI(key=key, backend=backend, rule=rule, near_tie=1.0)
        caught.append(tiebreak_test(key=key, rule=rule, served=backend, suspect=Follower(api, 0.9, seed), inputs=data,
                                    queries=600).log10_p)
        innocent.append(tiebreak_test(key=key, rule=rule, served=backend, suspect=backend, inputs=data,
                                      queries=600).log10_p)
    assert max(caught) < -3, caught
    assert min(innocent) > -3, innocent


def test_refusals(data, tmp_path):
    from click.testing import CliRunner

    from wmark.cli import main
    from wmark.marks import open_served

    key = seeded_key("tiebreak/near-tie/errors", owner="o", num_classes=C, input_shape=(D,))
    rule = build_tiebreak_rule(key=key, x=data, featurizer=featurizer, feature_space="test", components=8)
    with pytest.raises(UsageError, match="near-tie gap must be positive"):
        TieBreakAPI(key=key, backend=Linear(1), rule=rule, near_tie=0.0)
    with pytest.raises(UsageError, match="not both"):
        open_served(key=key, mark="tiebreak", rule=tmp_path / "r.safetensors", beta=1.0, near_tie=0.5)
    with pytest.raises(UsageError, match="belong to the tie-break mark"):
        open_served(key=key, mark="flip", near_tie=0.5)
    res = CliRunner().invoke(main, ["serve", "--name", "m", "--mark", "flip", "--near-tie", "0.5"])
    assert res.exit_code == 2 and "--near-tie does not apply to --mark flip" in res.output
