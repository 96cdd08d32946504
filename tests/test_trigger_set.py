import math
import re

import numpy as np
import pytest
import torch
from keykit import seeded_key

from wmark.embed import Watermarker
from wmark.errors import RuntimeFailure, UsageError
from wmark.keys import generate_key, load_key, save_key
from wmark.schemes.trigger_set import TriggerMixingDataset, generate_triggers
from wmark.suspects import Answers, LocalSuspect
from wmark.training import accuracy, make_loader
from wmark.verify import trigger_set_test, verify_blackbox


def test_triggers_regenerate_identically_from_the_key_file(tmp_path, fmnist_key) -> None:
    save_key(fmnist_key, tmp_path / "k.key")
    a, b = generate_triggers(fmnist_key), generate_triggers(load_key(tmp_path / "k.key"))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert np.array_equal(a.order, b.order)
    assert a.inputs.shape == (50, 1, 28, 28)
    assert float(a.inputs.min()) >= 0.0 and float(a.inputs.max()) <= 1.0
    other = generate_triggers(generate_key(owner="Test Owner", num_triggers=50))
    assert not torch.equal(a.inputs, other.inputs)


def test_loader_mixes_triggers_into_every_batch(digits_key) -> None:
    base = make_loader(torch.rand(70, 1, 8, 8), torch.zeros(70, dtype=torch.long), batch_size=32)
    wm = Watermarker(digits_key, trigger_per_batch=3, trigger_lookahead=0)
    _, _, loader = wm.attach(model=torch.nn.Linear(1, 1), data_loader=base)
    sizes = [len(x) for x, _ in loader]
    assert sizes == [35, 35, 9]
    assert len(loader) == 3 and loader.batch_size == 32
    with pytest.raises(UsageError, match="already attached"):
        wm.attach(model=torch.nn.Linear(1, 1), data_loader=base)
    wm.detach()
    wm.attach(model=torch.nn.Linear(1, 1), data_loader=base)


def test_loader_refuses_mismatched_shapes_and_dict_batches_work(digits_key) -> None:
    wm = Watermarker(digits_key, trigger_lookahead=0)
    _, _, loader = wm.attach(model=torch.nn.Linear(1, 1), data_loader=[(torch.rand(4, 1, 28, 28), torch.zeros(4))])
    with pytest.raises(UsageError, match="input shape matches the model"):
        next(iter(loader))
    wm.detach()
    batch = {"pixel_values": torch.rand(4, 1, 8, 8), "labels": torch.zeros(4, dtype=torch.long)}
    _, _, loader = wm.attach(model=torch.nn.Linear(1, 1), data_loader=[batch])
    out = next(iter(loader))
    assert out["pixel_values"].shape[0] == 12 and out["labels"].shape[0] == 12


def test_detach_releases_the_mixing_loader_so_a_second_attach_mixes_its_triggers_once(digits_key) -> None:
    """The loader attach() returned kept mixing triggers after detach(), and attaching again with it mixed them
    twice into every batch."""
    base = make_loader(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long), batch_size=8)
    wm = Watermarker(digits_key, trigger_mixing=True, trigger_per_batch=3)
    _, _, loader = wm.attach(model=torch.nn.Linear(1, 1), data_loader=base)
    assert [len(x) for x, _ in loader] == [11]
    wm.detach()
    assert [len(x) for x, _ in loader] == [8]
    _, _, again = wm.attach(model=torch.nn.Linear(1, 1), data_loader=loader)
    assert [len(x) for x, _ in again] == [11]


def test_mixing_refuses_dict_batches_of_another_shape_than_the_triggers(digits_key) -> None:
    """A dict batch of images of another shape failed inside torch.cat ("Sizes of tensors must match"); (x, y) pairs
    were already refused."""
    wm = Watermarker(digits_key, trigger_mixing=True)
    batch = {"pixel_values": torch.rand(4, 3, 16, 16), "labels": torch.zeros(4, dtype=torch.long)}
    _, _, loader = wm.attach(model=torch.nn.Linear(1, 1), data_loader=[batch])
    with pytest.raises(UsageError, match=r"^Batches hold inputs of shape \(3, 16, 16\) but the key's triggers are "
                                         r"\(1, 8, 8\); make a key whose input shape matches the model's\.$"):
        next(iter(loader))


@pytest.mark.parametrize(("batch", "message"), [
    ({"pixel_values": torch.rand(4, 1, 8, 8), "labels": torch.zeros(4, dtype=torch.long), "idx": torch.arange(4),
      "weight": torch.ones(4)},
     ("The dict batch holds per-sample 'idx', 'weight', which trigger mixing cannot extend to the triggers; drop them "
     "from the batch or embed with lookahead (the default).")),
    ((torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), torch.ones(4)),
     ("Batches of 3 elements cannot be mixed with triggers, only (inputs, labels) pairs; embed with lookahead (the "
     "default) instead of trigger mixing.")),
])
def test_mixing_refuses_per_sample_values_it_cannot_extend(digits_key, batch, message) -> None:
    """They came out with the batch's rows while inputs and labels grew by the triggers (or, in a tuple, were
    dropped), so a loss weighting by them paired rows wrongly or the loop's unpacking failed."""
    wm = Watermarker(digits_key, trigger_lookahead=0)
    _, _, loader = wm.attach(model=torch.nn.Linear(1, 1), data_loader=[batch])
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        next(iter(loader))
    wm.detach()
    shared = {"pixel_values": torch.rand(4, 1, 8, 8), "labels": torch.zeros(4, dtype=torch.long),
              "temperature": torch.tensor(2.0)}
    _, _, loader = wm.attach(model=torch.nn.Linear(1, 1), data_loader=[shared])
    out = next(iter(loader))
    assert out["pixel_values"].shape[0] == out["labels"].shape[0] > 4 and float(out["temperature"]) == 2.0


def test_dataset_wrapper_appends_triggers(digits_key) -> None:
    base = torch.utils.data.TensorDataset(torch.rand(10, 1, 8, 8), torch.zeros(10, dtype=torch.long))
    ds = Watermarker(digits_key, trigger_lookahead=0).wrap_dataset(base, repeats=2)
    assert isinstance(ds, TriggerMixingDataset) and len(ds) == 10 + 2 * 40
    x, y = ds[10]
    triggers = generate_triggers(digits_key)
    assert torch.equal(x, triggers.inputs[0]) and int(y) == int(triggers.labels[0])



def test_dataset_wrapper_refuses_a_repeat_count_below_1_and_items_of_another_shape(digits_key) -> None:
    """repeats=0 appended no trigger at all, silently, and -1 failed in len(); items of another shape than the key's
    triggers failed in the collator's torch.stack on the first batch holding a trigger, naming neither."""
    wm = Watermarker(digits_key, trigger_lookahead=0)
    base = torch.utils.data.TensorDataset(torch.rand(10, 1, 8, 8), torch.zeros(10, dtype=torch.long))
    for repeats in (0, -1):
        with pytest.raises(UsageError, match=f"repeats must be an integer of at least 1, got {repeats}"):
            wm.wrap_dataset(base, repeats=repeats)
    wide = torch.utils.data.TensorDataset(torch.rand(10, 3, 32, 32), torch.zeros(10, dtype=torch.long))
    with pytest.raises(UsageError, match=r"inputs of shape \(3, 32, 32\) but the key's triggers are \(1, 8, 8\)"):
        wm.wrap_dataset(wide)
    with pytest.raises(UsageError, match=r"inputs of shape \(3, 32, 32\)"):
        wm.wrap_dataset([{"pixel_values": torch.rand(3, 32, 32), "labels": 0}])  # type: ignore[arg-type]

def test_unknown_scheme_is_refused(digits_key) -> None:
    with pytest.raises(UsageError, match="Unknown scheme"):
        Watermarker(digits_key, schemes=("nope",))


def test_marked_model_is_detected_quickly_and_independent_is_not(marked_digits, digits) -> None:
    key, marked, independent = marked_digits
    assert accuracy(marked, digits.x_test, digits.y_test) > 0.85
    verdict = verify_blackbox(key=key, suspect=LocalSuspect(marked, input_shape=(1, 8, 8), expose_scores=False))
    doc = verdict.to_dict()
    assert doc["decision"] == "detected" and doc["kind"] == "copy"
    assert doc["queries"] <= 20 and doc["log10_p"] <= -6
    assert doc["null"]["p0"] == pytest.approx(0.1)
    innocent = verify_blackbox(key=key, suspect=LocalSuspect(independent, input_shape=(1, 8, 8)))
    assert innocent.decision == "not_detected" and innocent.kind == "none"
    assert innocent.to_dict()["queries"] == 40


def test_fixed_mode_uses_exact_binomial_tail(marked_digits) -> None:
    from wmark.stats import binomial_log10_sf

    key, marked, _ = marked_digits
    result = trigger_set_test(key=key, suspect=LocalSuspect(marked, input_shape=(1, 8, 8)), mode="fixed",
                              max_queries=30)
    assert result.queries == 30
    assert result.log10_p == pytest.approx(binomial_log10_sf(result.matches, 30, 0.1))


class _Scripted:
    """A suspect that answers from a script: lets tests control every answer."""

    description = "scripted"
    input_shape = (1, 8, 8)

    def __init__(self, labels_for, num_classes: int = 10) -> None:
        self.labels_for = labels_for
        self.num_classes = num_classes
        self.asked = 0

    def query(self, inputs: np.ndarray) -> Answers:
        out = np.array([self.labels_for(self.asked + i) for i in range(len(inputs))])
        self.asked += len(inputs)
        return Answers(labels=out)


def test_abstentions_never_count_as_matches(digits_key) -> None:
    verdict = verify_blackbox(key=digits_key, suspect=_Scripted(lambda i: -1))
    assert verdict.decision == "not_detected" and verdict.status == "inconclusive"
    assert verdict.tests[0].abstentions == 40 and verdict.tests[0].matches == 0


def test_budget_smaller_than_trigger_set_is_inconclusive(digits_key) -> None:
    verdict = verify_blackbox(key=digits_key, suspect=_Scripted(lambda i: 0), max_queries=5)
    assert verdict.status == "inconclusive" and "raise the query budget" in verdict.message


@pytest.mark.parametrize("mode", ["sequential", "fixed"])
def test_a_key_too_small_for_alpha_says_so_even_for_a_perfect_copy(mode) -> None:
    """A 3-trigger key (best p = 10**-3) used to report a perfect copy as plainly `not_detected`, which reads as
    innocent; the verdict now says that no answer could have reached alpha and what to change."""
    key = seeded_key("three-triggers", num_classes=10, input_shape=(1, 8, 8), num_triggers=3)
    triggers = generate_triggers(key)
    def perfect() -> _Scripted:
        return _Scripted(lambda i: int(triggers.labels[triggers.order[i]]))

    verdict = verify_blackbox(key=key, suspect=perfect(), mode=mode)
    assert verdict.decision == "not_detected" and verdict.tests[0].matches == 3
    assert verdict.status == "inconclusive" and verdict.message == (
        "Even a suspect that answered every one of the 3 triggers asked with its secret label could not reach "
        "alpha = 1e-06 here; verify with a key of more triggers, a larger budget or a larger alpha.")
    assert verify_blackbox(key=key, suspect=perfect(), mode=mode, alpha=1e-2).detected


def test_a_perfect_copy_of_a_key_large_enough_is_detected_without_a_note(digits_key) -> None:
    triggers = generate_triggers(digits_key)
    verdict = verify_blackbox(key=digits_key, suspect=_Scripted(lambda i: int(triggers.labels[triggers.order[i]])))
    assert verdict.detected and verdict.status == "complete" and verdict.message == ""
    assert verify_blackbox(key=digits_key, suspect=_Scripted(lambda i: 0)).status == "complete"


def test_key_for_other_classes_is_refused(digits_key) -> None:
    with pytest.raises(UsageError, match="10-class models but the suspect answers over 3"):
        verify_blackbox(key=digits_key, suspect=_Scripted(lambda i: 0, num_classes=3))


def test_nan_outputs_are_a_runtime_failure(digits_key) -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.fill_(math.nan)
    with pytest.raises(RuntimeFailure, match="NaN"):
        verify_blackbox(key=digits_key, suspect=LocalSuspect(model, input_shape=(1, 8, 8)))


def test_null_is_exact_for_models_that_never_saw_the_key(digits) -> None:
    """Matches of a key-independent model over random keys follow Binomial(n, 1/C) (chi-square check)."""
    from scipy import stats as sps

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    suspect = LocalSuspect(model, input_shape=(1, 8, 8))
    n, keys = 20, 300
    counts = []
    for i in range(keys):
        key = seeded_key(f"trigger/null/{i}", owner="x", num_classes=10, input_shape=(1, 8, 8),
                         num_triggers=n)
        counts.append(trigger_set_test(key=key, suspect=suspect, mode="fixed").matches)
    observed = np.bincount(counts, minlength=n + 1)
    expected = sps.binom.pmf(np.arange(n + 1), n, 0.1) * keys
    # pool the tail so every expected cell is >= 5
    obs = np.append(observed[:5], observed[5:].sum())
    exp = np.append(expected[:5], expected[5:].sum())
    assert sps.chisquare(obs, exp).pvalue > 1e-3


def test_a_sequential_test_combined_with_others_runs_to_the_level_holm_needs(marked_digits) -> None:
    """Stopping at 1/alpha and then correcting for three tests would leave a found copy undetected."""
    from wmark.verify import TestResult, alpha_share, decide

    key, marked, _ = marked_digits
    suspect = LocalSuspect(marked, input_shape=(1, 8, 8), expose_scores=False)
    silent = TestResult(name="api-tiebreak", evidence_of="extracted", null={}, log10_p=0.0, queries=1000, matches=0)
    alone = trigger_set_test(key=key, suspect=suspect, alpha=1e-6)
    combined = trigger_set_test(key=key, suspect=suspect, alpha=1e-6, share=alpha_share(1.0, [1.0, 1.0, 1.0]))
    assert -7.0 < alone.log10_p <= -6.0 and combined.log10_p <= -6.0 - math.log10(3)
    assert combined.queries > alone.queries and combined.details["alpha_share"] == pytest.approx(1 / 3)
    assert combined.details["stops_at_log10_p"] == pytest.approx(-6.0 - math.log10(3))
    assert not decide(key=key, tests=[alone, silent, silent], alpha=1e-6, suspect="copy").detected
    verdict = decide(key=key, tests=[combined, silent, silent], alpha=1e-6, suspect="copy")
    assert verdict.detected and verdict.kind == "copy" and verdict.to_dict()["correction"] == "holm"
    # next to the tie-break log test (weight 8) the trigger set gets a tenth of alpha, and runs on to 10/alpha
    logged = TestResult(name="api-tiebreak-log", evidence_of="extracted", null={}, log10_p=0.0, queries=1000,
                        matches=0, weight=8.0)
    tenth = trigger_set_test(key=key, suspect=suspect, alpha=1e-6, share=alpha_share(1.0, [1.0, 1.0, 8.0]))
    doc = decide(key=key, tests=[tenth, silent, logged], alpha=1e-6, suspect="copy").to_dict()
    assert tenth.log10_p <= -7.0 and (doc["decision"], doc["kind"], doc["correction"]) == ("detected", "copy",
                                                                                          "weighted holm")
    assert doc["tests"][0]["adjusted_log10_p"] == pytest.approx(tenth.log10_p + 1.0)
    assert [t["weight"] for t in doc["tests"]] == [1.0, 1.0, 8.0]
    with pytest.raises(UsageError, match=r"share .* must be in \(0, 1\]"):
        trigger_set_test(key=key, suspect=suspect, alpha=1e-6, share=0.0)


def test_the_weighted_verdict_judges_the_log_test_at_most_of_alpha(fmnist_key) -> None:
    """Weighted Holm over trigger set (1), committed inputs (1) and log test (8): the log test alone at
    p = 0.85 alpha is not enough, at 0.75 alpha it is; with equal weights it would need alpha / 3."""
    from wmark.verify import TestResult, decide

    def result(name: str, log10_p: float, weight: float = 1.0) -> TestResult:
        return TestResult(name=name, evidence_of="copy" if name == "trigger-set" else "extracted", null={},
                          log10_p=log10_p, queries=10, matches=0, weight=weight)

    def verdict(log10_p: float, weight: float) -> str:
        tests = [result("trigger-set", -0.2), result("api-tiebreak", -3.0), result("api-tiebreak-log", log10_p, weight)]
        return decide(key=fmnist_key, tests=tests, alpha=1e-6, suspect="s").kind

    assert verdict(-6 + math.log10(0.85), 8.0) == "none"
    assert verdict(-6 + math.log10(0.75), 8.0) == "extracted"
    assert verdict(-6 + math.log10(0.75), 1.0) == "none"
    assert verdict(-6 - math.log10(3) - 0.01, 1.0) == "extracted"
