"""A cost the owner sets: the tie-break build picks the largest scale within it, the rule records it, the API serves
it; what cannot be met is refused before anything is written."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from keykit import seeded_key
from scipy import stats

from wmark import api
from wmark.cli import main
from wmark.data import load_dataset
from wmark.errors import UsageError
from wmark.io import load_tensors, save_tensors
from wmark.keys import load_key, save_key
from wmark.marks import open_served
from wmark.models import build_model, load_model, model_metadata, penultimate_featurizer
from wmark.schemes.tiebreak import (
    BETA_GRID,
    DEFAULT_BETA,
    TieBreakAPI,
    accuracy_cost,
    accuracy_costs,
    largest_beta_within,
    load_tiebreak_rule,
)
from wmark.suspects import LocalSuspect
from wmark.training import make_loader, train_epochs

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def served_files(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A digits MLP, its key and a rule at the default scale (no references: the served model's nearest ties)."""
    tmp = tmp_path_factory.mktemp("cost")
    ds = load_dataset("digits")
    model = build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE, seed=0)
    train_epochs(model, make_loader(ds.x_train, ds.y_train, seed=0), epochs=3,
                 optimizer=torch.optim.Adam(model.parameters(), 3e-3))
    weights, key = tmp / "served.safetensors", tmp / "owner.key"
    save_tensors(model.state_dict(), weights, metadata=model_metadata(arch="fmnist-mlp", num_classes=10,
                                                                       input_shape=SHAPE))
    save_key(seeded_key("tiebreak/cost target", num_classes=10, input_shape=SHAPE), key)
    rule = tmp / "rule.safetensors"
    info = api.build_tiebreak(key=key, arch="fmnist-mlp", weights=weights, data="digits", out=rule, references=[],
                              verify_count=100)
    return ds, weights, key, rule, info


def _marked(weights, key, rule, beta=None) -> TieBreakAPI:
    served, _ = load_model("fmnist-mlp", weights, num_classes=10, input_shape=SHAPE)
    k = load_key(key)
    return TieBreakAPI(key=k, backend=LocalSuspect(served, input_shape=SHAPE), expose_scores=False, beta=beta,
                       rule=load_tiebreak_rule(rule, key=k, featurizer=penultimate_featurizer(served)))


def test_costs_at_every_scale_match_the_api_and_their_standard_error(served_files):
    ds, weights, key, rule, _ = served_files
    x, y = ds.x_test.numpy(), ds.y_test.numpy()
    costs = accuracy_costs(api=_marked(weights, key, rule), x=x, y=y, betas=(0.3, 1.0, 2.0))
    for entry in costs:
        api_at = _marked(weights, key, rule, beta=entry["beta"])
        assert accuracy_cost(api=api_at, x=x, y=y) == pytest.approx(entry)  # the API's own scale
        # against the labels the served model and the marked API answer, asked one by one
        plain, answered = np.asarray(api_at.backend.query(x).labels), np.asarray(api_at.query(x).labels)
        served, marked = plain == y, answered == y
        diff = served.astype(float) - marked
        assert entry["served_accuracy"] == pytest.approx(served.mean())
        assert entry["api_accuracy"] == pytest.approx(marked.mean())
        assert entry["accuracy_cost_pp"] == pytest.approx(100 * diff.mean())
        assert entry["changed_fraction"] == pytest.approx((plain != answered).mean())
        assert entry["cost_se_pp"] == pytest.approx(100 * diff.std(ddof=1) / np.sqrt(len(y)))
    assert [c["changed_fraction"] for c in costs] == sorted(c["changed_fraction"] for c in costs)
    for bad in (0.0, float("inf"), 1e308):
        with pytest.raises(UsageError, match="beta must be above 0 and at most 100"):
            accuracy_costs(api=_marked(weights, key, rule), x=x, y=y, betas=(0.5, bad))
        with pytest.raises(UsageError, match="beta must be above 0 and at most 100"):
            _marked(weights, key, rule, beta=bad)
    assert {c["inputs"] for c in costs} == {len(y)}


def _entries(*rows: tuple) -> list[dict]:
    return [{"beta": b, "accuracy_cost_pp": c, "cost_se_pp": se, "inputs": n} for b, c, se, n in rows]


def test_the_largest_scale_within_the_target_needs_every_smaller_scale_within_it_too():
    big = 10**9  # so many inputs that the one-answer floor of the standard error is nil
    costs = _entries((0.2, 0.1, 0, big), (0.1, 0.0, 0, big), (0.3, 0.6, 0, big), (0.4, 0.4, 0, big),
                     (0.5, 0.9, 0, big))
    assert largest_beta_within(costs, 0.5)["beta"] == 0.2  # 0.4 dips under by noise above 0.3, which does not
    assert largest_beta_within(costs, 1.0)["beta"] == 0.5
    assert largest_beta_within(costs[1:2], 1e-6)["beta"] == 0.1
    assert largest_beta_within(_entries((0.1, 0.3, 0, big)), 0.2) is None
    for bad in (float("nan"), 0.0, -1.0, float("inf"), 1e300):
        with pytest.raises(UsageError, match="above 0 and at most 100"):
            largest_beta_within(costs, bad)


def test_no_changed_answer_in_a_small_sample_is_not_taken_as_no_cost():
    # 0 of 400 answers lost, so the sample's standard error is 0: one answer's worth (0.25 pp) is assumed
    costs = _entries((0.1, 0.0, 0.0, 400))
    assert largest_beta_within(costs, 0.25 * stats.norm.ppf(0.9) - 1e-9) is None
    assert largest_beta_within(costs, 0.25 * stats.norm.ppf(0.9) + 1e-9)["beta"] == 0.1


def test_a_scale_must_fit_the_target_with_its_standard_error_at_the_confidence_asked():
    costs = _entries((0.1, 0.1, 0.1, 10**6), (0.2, 0.3, 0.2, 10**6))
    z90, z95 = stats.norm.ppf(0.9), stats.norm.ppf(0.95)
    assert largest_beta_within(costs, 0.3 + 0.2 * z90 + 1e-9)["beta"] == 0.2  # the default: 90 % one-sided
    assert largest_beta_within(costs, 0.3 + 0.2 * z90 - 1e-9)["beta"] == 0.1
    assert largest_beta_within(costs, 0.3 + 0.2 * z90 + 1e-9, confidence=0.95)["beta"] == 0.1
    assert largest_beta_within(costs, 0.3 + 0.2 * z95 + 1e-9, confidence=0.95)["beta"] == 0.2
    assert largest_beta_within(costs, 0.3, confidence=0.5)["beta"] == 0.2
    for bad in (0.4, 1.0):
        with pytest.raises(UsageError, match=r"confidence must be in \[0.5, 1\)"):
            largest_beta_within(costs, 1.0, confidence=bad)


def test_the_default_build_serves_the_default_scale(served_files):
    _, weights, key, rule, info = served_files
    assert info["honest_cost"]["beta"] == DEFAULT_BETA and "max_cost_pp" not in info["honest_cost"]
    assert _marked(weights, key, rule).beta == DEFAULT_BETA


def test_a_cost_target_is_recorded_in_the_rule_and_served(served_files, tmp_path):
    ds, weights, key, default_rule, default_info = served_files
    target = default_info["honest_cost"]["accuracy_cost_pp"] / 2
    assert target > 0
    out = tmp_path / "cheap.safetensors"
    info = api.build_tiebreak(key=key, arch="fmnist-mlp", weights=weights, data="digits", out=out, references=[],
                              verify_count=100, max_cost=target)
    cost = info["honest_cost"]
    assert 0 < cost["beta"] < DEFAULT_BETA and cost["beta"] in BETA_GRID
    assert cost["accuracy_cost_pp"] <= target and cost["max_cost_pp"] == target and cost["confidence"] == 0.9
    assert cost["default_cost_pp"] == pytest.approx(default_info["honest_cost"]["accuracy_cost_pp"])
    # within the target with 90 % confidence, and the next scale up is not: nothing larger would have done
    z = stats.norm.ppf(0.9)
    assert cost["accuracy_cost_pp"] + z * cost["cost_se_pp"] <= target
    grid = accuracy_costs(api=_marked(weights, key, out), x=ds.x_test.numpy(), y=ds.y_test.numpy())
    above = [c for c in grid if c["beta"] > cost["beta"]]
    assert above and above[0]["accuracy_cost_pp"] + z * above[0]["cost_se_pp"] > target
    # the same rule otherwise: only the served scale differs
    tensors, _ = load_tensors(out)
    assert all(torch.equal(t, load_tensors(default_rule)[0][n]) for n, t in tensors.items())
    served_api = _marked(weights, key, out)
    assert served_api.beta == cost["beta"]
    assert accuracy_cost(api=served_api, x=ds.x_test.numpy(), y=ds.y_test.numpy())["accuracy_cost_pp"] == \
        pytest.approx(cost["accuracy_cost_pp"])
    served = open_served(key=load_key(key), mark="tiebreak", rule=out)
    assert served.answerer.beta == cost["beta"]
    assert open_served(key=load_key(key), mark="tiebreak", rule=out, beta=0.8).answerer.beta == 0.8


def test_an_unreachable_or_meaningless_target_is_refused_and_nothing_is_written(served_files, tmp_path, monkeypatch):
    ds, weights, key, _, _ = served_files
    out = tmp_path / "rule.safetensors"
    common = {"key": key, "arch": "fmnist-mlp", "weights": weights, "out": out, "references": [], "verify_count": 100}
    with pytest.raises(UsageError, match=r"No scale of the mark costs at most 1e-09 accuracy points with 90 % confidence on the test "
                                         r"split: the smallest tried, beta 0.05, costs .* ± .*monitor flags"):
        api.build_tiebreak(data="digits", max_cost=1e-9, **common)
    for bad in (0, -1, float("nan"), float("inf"), 1e300):
        with pytest.raises(UsageError, match=r"max_cost is in accuracy points, above 0 and at most 100; got"):
            api.build_tiebreak(data="digits", max_cost=bad, **common)
    small = dataclasses.replace(ds, x_test=ds.x_test[:299], y_test=ds.y_test[:299])
    monkeypatch.setattr(api, "load_dataset", lambda spec: small)
    with pytest.raises(UsageError, match=r"The test split has 299 inputs the API takes; bounding the cost needs at "
                                         r"least 300: drop max_cost"):
        api.build_tiebreak(data="digits", max_cost=50.0, **common)
    untested = dataclasses.replace(ds, x_test=ds.x_test[:0], y_test=ds.y_test[:0])
    monkeypatch.setattr(api, "load_dataset", lambda spec: untested)
    with pytest.raises(UsageError, match="has no test split to measure the cost on; drop max_cost"):
        api.build_tiebreak(data="digits", max_cost=1.0, **common)
    assert not out.exists()
    assert api.build_tiebreak(data="digits", **common)["honest_cost"] is None  # without a target: built, no cost


def test_an_unreachable_target_is_refused_before_the_references_train(served_files, tmp_path, monkeypatch):
    from wmark.schemes import tiebreak

    _, weights, key, _, _ = served_files
    trained = []
    monkeypatch.setattr(tiebreak, "train_reference_surrogates", lambda **kw: trained.append(kw))
    with pytest.raises(UsageError, match="No scale of the mark"):
        api.build_tiebreak(key=key, arch="fmnist-mlp", weights=weights, data="digits", out=tmp_path / "r.st",
                           verify_count=100, max_cost=1e-9, reference_repeats=1)
    assert trained == []


def test_the_cli_prints_the_chosen_scale_and_exits_2_when_none_fits(served_files, tmp_path):
    _, weights, key, _, default_info = served_files
    target = default_info["honest_cost"]["accuracy_cost_pp"] / 2
    out = tmp_path / "rule.safetensors"
    args = ["tiebreak", "build", "--key", str(key), "--arch", "fmnist-mlp", "--weights", str(weights),
            "--data", "digits", "--out", str(out), "--references", "none", "--verify-count", "100"]
    done = CliRunner().invoke(main, [*args, "--max-cost", f"{target}"])
    assert done.exit_code == 0, done.output
    assert f"(the largest scale within {target:g} points with 90 % confidence; the default 1.0 costs" in done.stdout
    assert "accuracy points" in done.stdout and "±" in done.stdout
    out.unlink()
    refused = CliRunner().invoke(main, [*args, "--max-cost", "1e-9"])
    assert refused.exit_code == 2 and "No scale of the mark" in refused.stderr and not out.exists()


def test_a_rule_written_without_a_scale_serves_the_default(served_files, tmp_path):
    from safetensors.torch import save_file

    _, weights, key, rule, _ = served_files
    tensors, raw = load_tensors(rule)
    path = tmp_path / "older.safetensors"
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path),
              metadata={n: v for n, v in raw.items() if n != "wmark.beta"})
    assert _marked(weights, key, path).beta == DEFAULT_BETA


def test_a_damaged_recorded_scale_is_refused(served_files, tmp_path):
    _, weights, key, rule, _ = served_files
    tensors, raw = load_tensors(rule)
    for bad in ("-1", "nan", '"x"', "true", "1" + "0" * 400, "1e308", "null", '"0.5"'):
        path = tmp_path / "bad.safetensors"
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), metadata={**raw, "wmark.beta": bad})
        served, _ = load_model("fmnist-mlp", weights, num_classes=10, input_shape=SHAPE)
        with pytest.raises(UsageError, match="is damaged .*beta"):
            load_tiebreak_rule(path, key=load_key(key), featurizer=penultimate_featurizer(served))
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), metadata={**raw, "wmark.skipped_leading": "1e999"})
    with pytest.raises(UsageError, match=r"is damaged \(skipped_leading inf\)"):
        load_tiebreak_rule(path, key=load_key(key), featurizer=penultimate_featurizer(served))
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), metadata={**raw, "wmark.input_shape": "[1e999]"})
    with pytest.raises(UsageError, match=r"is damaged \(input shape \[inf\]\)"):
        load_tiebreak_rule(path, key=load_key(key), featurizer=penultimate_featurizer(served))
