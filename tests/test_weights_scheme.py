"""The weight watermark scheme: payload, projection null, embedding through an optimizer step pre-hook."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _whitebox_helpers import task_data, tiny_key, tiny_model, train
from scipy import stats

from wmark.embed import Watermarker
from wmark.errors import UsageError
from wmark.keys import generate_key
from wmark.schemes.weights import (
    WeightsEmbedder,
    decode_message,
    extract_bits,
    payload_bits,
    projection,
    scheme_params,
)


def test_payload_is_key_derived_and_deterministic() -> None:
    key, other = tiny_key(), tiny_key()
    assert np.array_equal(payload_bits(key), payload_bits(key))
    assert not np.array_equal(payload_bits(key), payload_bits(other))
    assert set(np.unique(payload_bits(key))) <= {0, 1}
    assert torch.equal(projection(key, 100), projection(key, 100))


def test_message_round_trips_through_repetition_code_even_with_bit_errors() -> None:
    # A fixed key (the flipped positions are fixed too): with fresh keys these 20 flips defeat the 8-fold
    # majority for 40 of 2000 keys, which failed a clean-clone run of the suite.
    key = tiny_key(bits=256, message="ACME", seed=7)
    bits = payload_bits(key)
    assert decode_message(key, bits) == "ACME"
    flipped = bits.copy()
    rng = np.random.default_rng(0)
    flipped[rng.choice(256, 20, replace=False)] ^= 1  # 8 % bit errors, 8 copies of each message bit
    assert decode_message(key, flipped) == "ACME"
    assert decode_message(tiny_key(), bits) is None


def test_message_too_long_for_payload_is_refused() -> None:
    with pytest.raises(UsageError, match="shorten the message"):
        payload_bits(tiny_key(bits=64, message="far too long a message"))


def test_keys_without_weights_params_use_the_defaults() -> None:
    key = generate_key(owner="Old", schemes={"trigger": {"version": 1, "pattern": "lowfreq-noise", "n": 10}})
    assert scheme_params(key)["bits"] == 256


def test_bits_of_unmarked_weights_are_fair_coins() -> None:
    # Null: weights independent of the key. Pool 40 keys x 64 bits and compare with Binomial(n, 1/2).
    model = tiny_model(3)
    weights = [model.conv1.weight, model.conv2.weight, model.fc1.weight]
    matches = sum(int(np.sum(extract_bits(k, weights) == payload_bits(k))) for k in (tiny_key(seed=j) for j in range(40)))
    n = 40 * 64
    assert stats.binomtest(matches, n, 0.5).pvalue > 1e-3


def test_embedding_gives_zero_bit_errors_and_small_change() -> None:
    key = tiny_key(seed=1)
    model = tiny_model(0)
    emb = WeightsEmbedder(key, model)
    assert emb.chain == ["conv1.weight", "conv2.weight", "fc1.weight"]
    assert emb.bit_errors() > 10
    plain = train(tiny_model(0), steps=80, seed=1)
    train(model, steps=80, seed=1, embedder=emb)
    assert emb.bit_errors() == 0
    assert emb.loss().item() == 0.0
    x, y = task_data(9)
    acc_plain = (plain(x).argmax(1) == y).float().mean().item()
    acc_marked = (model(x).argmax(1) == y).float().mean().item()
    assert acc_marked > acc_plain - 0.1


def test_embedding_works_with_sgd_and_a_named_layer() -> None:
    key = tiny_key(bits=16, seed=2)
    model = tiny_model(1)
    emb = WeightsEmbedder(key, model, layer="conv2", strength=50.0)
    assert emb.layer == "conv2.weight" and emb.chain == ["conv1.weight", "conv2.weight"]
    x, y = task_data(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    optimizer.register_step_pre_hook(emb.hook)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
        optimizer.step()
    assert emb.bit_errors() == 0


def test_layer_choice_errors_are_clear() -> None:
    with pytest.raises(UsageError, match="is not the weight of a conv/linear layer"):
        WeightsEmbedder(tiny_key(), tiny_model(0), layer="pool")
    with pytest.raises(UsageError, match="too few for 256 bits"):
        WeightsEmbedder(tiny_key(bits=256), tiny_model(0))
    with pytest.raises(UsageError, match="no conv/linear layer before its head"):
        WeightsEmbedder(tiny_key(), torch.nn.Sequential(torch.nn.Linear(4, 2)))


def test_watermarker_owns_its_hook_and_records_metadata_without_secret() -> None:
    key = tiny_key()
    model = tiny_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    wm = Watermarker(key, schemes=("weights",))
    with pytest.raises(UsageError, match="needs optimizer="):
        wm.attach(model=model)
    wm.attach(model=model, optimizer=optimizer)
    assert len(optimizer._optimizer_step_pre_hooks) == 1
    with pytest.raises(UsageError, match="already attached"):
        wm.attach(model=model, optimizer=optimizer)
    wm.detach()
    assert len(optimizer._optimizer_step_pre_hooks) == 0
    meta = wm.metadata()
    assert meta["weights"]["layer"] == "fc1.weight"
    assert meta["weights"]["shape"] == [32, 256]
    assert meta["weights"]["chain_shapes"][0] == [4, 1, 3, 3]
    assert key.secret.hex() not in json.dumps(meta)


def test_a_weights_only_watermarker_records_no_trigger_settings() -> None:
    """A weights-only file recorded trigger_per_batch and the default trigger_lookahead, as if triggers were embedded."""
    meta = Watermarker(tiny_key(), schemes=("weights",)).metadata()
    assert meta["schemes"] == ["weights"]
    assert not [name for name in meta if name.startswith("trigger")]


def test_trigger_and_weights_together() -> None:
    import dataclasses
    import hashlib

    from wmark.models import build_model
    from wmark.training import make_loader, train_epochs

    fmnist_key = dataclasses.replace(generate_key(owner="Test Owner", num_triggers=50),
                                     secret=hashlib.sha256(b"wmark-test-key/fmnist").digest())

    model = build_model("fmnist-mlp", num_classes=10, input_shape=(1, 28, 28), seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = make_loader(torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,)), batch_size=32)
    wm = Watermarker(fmnist_key, schemes=("trigger", "weights"))
    model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=loader)
    train_epochs(model, loader, epochs=15, optimizer=optimizer, device=torch.device("cpu"))
    wm.detach()
    assert wm.metadata()["weights"]["bit_errors_at_save"] == 0
    assert wm.metadata()["schemes"] == ["trigger", "weights"]


def test_keygen_message_is_committed_written_into_the_weights_and_read_back(tmp_path) -> None:
    import dataclasses

    from click.testing import CliRunner

    from wmark.cli import main
    from wmark.io import save_model
    from wmark.keys import load_key
    from wmark.whitebox.verify import verify_whitebox

    runner = CliRunner()
    made = runner.invoke(main, ["keygen", "--owner", "ACME", "--out", str(tmp_path / "k.key"),
                                "--message", "ACME Corp 2026", "--json"])
    assert made.exit_code == 0, made.output
    key = load_key(tmp_path / "k.key")
    # 14 bytes = 112 bits; three copies need 336, rounded up to 384 payload bits.
    assert scheme_params(key)["message"] == "ACME Corp 2026" and scheme_params(key)["bits"] == 384
    assert json.loads(made.stdout)["commitment"] == key.commitment()
    forged = dataclasses.replace(key, schemes={**key.schemes, "weights": {**key.schemes["weights"], "message": "EVIL"}})
    assert forged.commitment() != key.commitment()

    torch.manual_seed(0)
    # 2000 inputs: 384 bits at margin 1.5 are well inside the capacity of a unit vector (about 0.3 bits per dim).
    model = torch.nn.Sequential(torch.nn.Linear(2000, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    emb = WeightsEmbedder(key, model)
    optimizer = torch.optim.Adam([model[0].weight], lr=5e-3)
    for _ in range(500):
        optimizer.zero_grad()
        loss = emb.loss()
        if loss.item() == 0.0:
            break
        loss.backward()
        optimizer.step()
    save_model(model, tmp_path / "m.safetensors", metadata={"weights": emb.metadata()})
    test = verify_whitebox(key=key, reference=tmp_path / "m.safetensors", suspect=tmp_path / "m.safetensors").tests[0]
    assert test.matches == 384 and test.details["decoded_message"] == "ACME Corp 2026"
    assert key.secret.hex() not in made.stdout


def test_keygen_rejects_an_empty_message(tmp_path) -> None:
    from click.testing import CliRunner

    from wmark.cli import main

    bad = CliRunner().invoke(main, ["keygen", "--owner", "ACME", "--out", str(tmp_path / "k.key"), "--message", ""])
    assert bad.exit_code == 2 and "owner message is empty" in bad.stderr
    assert not (tmp_path / "k.key").exists()
