"""A dishonest accuser: transferable adversarial "triggers" and key search never make wmark accuse an
independent model, while a naive verifier that tests the accuser's own inputs does (scikit-learn digits)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from keykit import seeded_key
from sigkit import save_marked, signing_pair

from wmark.models import build_model
from wmark.schemes.trigger_set import generate_triggers
from wmark.signing import EvidenceError, check_key_provenance, sign_model
from wmark.stats import binomial_log10_sf
from wmark.suspects import LocalSuspect
from wmark.transcript import input_sha256
from wmark.verify import trigger_set_test, verify_blackbox

SHAPE = (1, 8, 8)
ALPHA = 1e-6
pytestmark = pytest.mark.slow  # trains 13 small digits models (about 11 s of CPU)


def _train(x: torch.Tensor, y: torch.Tensor, *, arch: str, seed: int, steps: int = 150) -> torch.nn.Module:
    model = build_model(arch, num_classes=10, input_shape=SHAPE, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=g)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def arena(digits):
    """The accuser's three models (its half of the data), ten independent models (the other half) and the
    accuser's adversarial "triggers": targeted PGD on its own ensemble toward labels it picked."""
    torch.manual_seed(0)
    half = len(digits.x_train) // 2
    xa, ya, xb, yb = digits.x_train[:half], digits.y_train[:half], digits.x_train[half:], digits.y_train[half:]
    accuser = [_train(xa, ya, arch=a, seed=s) for a, s in (("fmnist-mlp", 1), ("fmnist-cnn", 2), ("fmnist-mlp", 3))]
    independents = [_train(xb, yb, arch=("fmnist-mlp", "fmnist-cnn")[i % 2], seed=100 + i) for i in range(10)]
    rng = np.random.default_rng(0)
    x, y = digits.x_test[:100], digits.y_test[:100]
    target = torch.from_numpy((y.numpy() + rng.integers(1, 10, len(y))) % 10)
    adv, eps = x.clone(), 0.3
    for _ in range(40):
        adv.requires_grad_(True)
        logp = torch.stack([torch.log_softmax(m(adv), 1) for m in accuser]).mean(0)
        (grad,) = torch.autograd.grad(torch.nn.functional.nll_loss(logp, target), adv)
        adv = (adv.detach() - 0.02 * grad.sign()).clamp(x - eps, x + eps).clamp(0.0, 1.0)
    return independents, adv.detach(), target


def test_adversarial_triggers_fool_a_naive_verifier_but_never_wmark(arena):
    independents, adv, target = arena
    key = seeded_key("dishonest accuser", input_shape=SHAPE, num_triggers=100)
    asked = {input_sha256(t) for t in generate_triggers(key).inputs.numpy()}
    assert not asked & {input_sha256(a) for a in adv.numpy()}  # wmark never asks the accuser's inputs
    naive, ours = [], []
    for model in independents:
        with torch.no_grad():
            matches = int((model(adv).argmax(1) == target).sum())
        naive.append(binomial_log10_sf(matches, len(target), 0.1))
        suspect = LocalSuspect(model, input_shape=SHAPE)
        for mode in ("sequential", "fixed"):
            ours.append(verify_blackbox(key=key, suspect=suspect, mode=mode).log10_p)
    assert sum(p <= math.log10(ALPHA) for p in naive) >= 5, naive  # transfer: the naive verifier accuses
    assert max(ours) <= 0.0 and min(ours) > math.log10(ALPHA), ours  # wmark: 0 of 10, both modes


def test_key_search_is_bounded_and_the_best_key_is_refused_by_the_signed_release(arena, tmp_path):
    independents, _, _ = arena
    committed = seeded_key("committed at release", input_shape=SHAPE, num_triggers=100)
    private, public = signing_pair(tmp_path)
    release = save_marked(independents[0], committed, tmp_path / "release.safetensors")
    sign_model(path=release, private_key=private)
    suspect = LocalSuspect(independents[1], input_shape=SHAPE)
    keys = [seeded_key(f"search {i}", input_shape=SHAPE, num_triggers=100) for i in range(60)]
    scores = [trigger_set_test(key=k, suspect=suspect, mode="fixed").log10_p for k in keys]
    best = int(np.argmin(scores))
    # Best of N is at most N p in probability: corrected for the search, the best key is unremarkable.
    assert scores[best] + math.log10(len(keys)) > -3
    with pytest.raises(EvidenceError, match="not the one .* was signed with"):
        check_key_provenance(key=keys[best], model=release, public_key=public)
    assert check_key_provenance(key=committed, model=release, public_key=public)["commitment"] == committed.commitment()


def test_over_http_the_server_sees_only_the_keys_triggers_never_the_accusers_inputs(arena):
    from wmark.serve import build_app, serve_in_background
    from wmark.suspects.http import HttpOptions, open_http_suspect

    independents, adv, _ = arena
    key = seeded_key("dishonest accuser", input_shape=SHAPE, num_triggers=100)
    received: list[str] = []
    app = build_app(model=independents[0], name="m", num_classes=10, input_shape=SHAPE, labels_only=True,
                    on_infer=lambda x: received.extend(input_sha256(v) for v in np.asarray(x, dtype=np.float32)))
    with serve_in_background(app) as server:
        suspect = open_http_suspect(url=server.url, protocol="v2", model_name="m", num_classes=10, input_shape=SHAPE,
                                    token=None, options=HttpOptions(backoff=0.01))
        verdict = verify_blackbox(key=key, suspect=suspect, mode="fixed")
        suspect.close()
    assert verdict.decision == "not_detected" and len(received) == 100
    assert set(received) == {input_sha256(t) for t in generate_triggers(key).inputs.numpy()}
    assert not set(received) & {input_sha256(a) for a in adv.numpy()}
