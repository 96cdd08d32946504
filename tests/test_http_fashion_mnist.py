"""End to end on real Fashion-MNIST: a fine-tuned stolen copy served label-only over v2 is detected at
alpha = 1e-6 within 20 trigger queries; an independently trained model served the same way is not."""

from __future__ import annotations

import pytest

from wmark import api
from wmark.models import load_model
from wmark.serve import build_app, serve_in_background

pytestmark = pytest.mark.slow


def test_stolen_fashion_mnist_copy_over_http(tmp_path):
    from wmark.data import FASHION_MNIST_DIR

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    key = tmp_path / "owner.key"
    api.keygen(owner="ACME", out=key)
    small = {"data": "fashion-mnist", "max_samples": 10000}
    api.train(arch="fmnist-cnn", out=tmp_path / "base.safetensors", epochs=1, seed=0, **small)
    api.embed(key=key, arch="fmnist-cnn", weights=tmp_path / "base.safetensors", out=tmp_path / "marked.safetensors",
              epochs=3, trigger_per_batch=32, **small)
    # The thief fine-tunes every layer on its own data at a typical fine-tuning rate.
    api.attack(kind="finetune", arch="fmnist-cnn", weights=tmp_path / "marked.safetensors", epochs=2, lr=1e-4,
               seed=5, out=tmp_path / "stolen.safetensors", **small)
    api.train(arch="fmnist-cnn", out=tmp_path / "independent.safetensors", epochs=1, seed=1, **small)
    verdicts = {}
    for name in ("stolen", "independent"):
        model, _ = load_model("fmnist-cnn", tmp_path / f"{name}.safetensors")
        app = build_app(model=model, name=name, num_classes=10, input_shape=(1, 28, 28), labels_only=True)
        with serve_in_background(app) as server:
            verdicts[name] = api.verify_remote(key=key, url=server.url, model_name=name, alpha=1e-6,
                                               transcript=tmp_path / f"{name}.sqlite")
    assert verdicts["stolen"].detected and verdicts["stolen"].tests[0].queries <= 20
    assert verdicts["stolen"].tests[0].details["probe"]["answers_with_scores"] == 0
    assert verdicts["independent"].decision == "not_detected"
