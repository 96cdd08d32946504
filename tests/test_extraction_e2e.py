"""End to end on Fashion-MNIST: a surrogate extracted through the marked API is ``extracted``; an
independent model trained on the same attacker images with true labels is ``none``."""

from __future__ import annotations

import pytest
import torch

from wmark.attacks.extract import extract
from wmark.data import load_dataset
from wmark.keys import generate_key
from wmark.models import build_model
from wmark.schemes.api_mark import MarkedAPI, MarkLog, api_mark_test
from wmark.suspects import LocalSuspect
from wmark.training import accuracy, make_loader, train_epochs
from wmark.verify import decide

pytestmark = pytest.mark.slow


def test_surrogate_is_extracted_and_independent_is_not(tmp_path):
    torch.manual_seed(0)
    owner, attacker = load_dataset("fashion-mnist").split(owner_fraction=0.5, seed=0)
    victim = build_model("fmnist-cnn", num_classes=10, input_shape=(1, 28, 28), seed=0)
    train_epochs(victim, make_loader(owner.x_train[:8000], owner.y_train[:8000], seed=0), epochs=2,
                 optimizer=torch.optim.Adam(victim.parameters(), 1e-3))
    key = generate_key(owner="E2E")
    log = MarkLog(tmp_path / "marks.sqlite", key=key, rate=0.1, candidates=9)
    api = MarkedAPI(key=key, backend=LocalSuspect(victim, input_shape=(1, 28, 28)), rate=0.1, candidates="all",
                    log=log, client="thief")
    xq, yq = attacker.x_train[:3000], attacker.y_train[:3000]
    surrogate = extract(api, x=xq, arch="fmnist-cnn", labels="hard", epochs=25, seed=1).model
    independent = build_model("fmnist-cnn", num_classes=10, input_shape=(1, 28, 28), seed=2)
    train_epochs(independent, make_loader(xq, yq, seed=2), epochs=8,
                 optimizer=torch.optim.Adam(independent.parameters(), 1e-3))
    assert accuracy(surrogate, attacker.x_test, attacker.y_test) > 0.75
    kinds = {}
    for name, model in (("surrogate", surrogate), ("independent", independent)):
        suspect = LocalSuspect(model, input_shape=(1, 28, 28), expose_scores=False)
        test = api_mark_test(key=key, suspect=suspect, log=log, client="thief")
        assert test.queries > 200
        kinds[name] = decide(key=key, tests=[test], alpha=1e-6, suspect=name).kind
    assert kinds == {"surrogate": "extracted", "independent": "none"}
