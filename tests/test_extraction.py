"""Extraction attacks on tiny synthetic victims, the extract CLI, and `wmark verify extraction` of a flip-mark log."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wmark.attacks.extract import accuracy_reached, extract, extraction_targets
from wmark.cli import main
from wmark.errors import RuntimeFailure, UsageError
from wmark.io import save_tensors
from wmark.keys import generate_key, save_key
from wmark.models import build_model, model_metadata
from wmark.suspects import Answers, LocalSuspect
from wmark.training import make_loader, train_epochs

SHAPE = (1, 6, 6)
C = 4


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=gen)
    y = (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long() * 2 + (x[:, 0, :, :3].mean((1, 2)) > 0.5).long()
    return x, y


@pytest.fixture(scope="module")
def victim() -> torch.nn.Module:
    x, y = _data(1500)
    model = build_model("fmnist-mlp", num_classes=C, input_shape=SHAPE, seed=0)
    train_epochs(model, make_loader(x, y, seed=0), epochs=8, optimizer=torch.optim.Adam(model.parameters(), 3e-3))
    return model


@pytest.mark.parametrize("labels", ["hard", "soft", "top1"])
def test_surrogates_agree_with_the_victim(victim, labels):
    xq, _ = _data(1000, seed=1)
    xt, _ = _data(500, seed=2)
    api = LocalSuspect(victim, input_shape=SHAPE)
    result = extract(api, x=xq, arch="fmnist-mlp", labels=labels, queries=800, epochs=8, seed=3)
    assert result.queries == result.answered == 800
    with torch.no_grad():
        agree = (result.model(xt).argmax(1) == victim(xt).argmax(1)).float().mean().item()
    assert agree > 0.8


def test_a_thief_can_stop_once_good_enough(victim):
    xq, _ = _data(1000, seed=1)
    xt, yt = _data(500, seed=2)
    api = LocalSuspect(victim, input_shape=SHAPE)
    seen = []

    def stop(model: torch.nn.Module) -> bool:
        seen.append(accuracy_reached(xt, yt, 0.0)(model) and not model.training)
        return len(seen) == 3

    result = extract(api, x=xq, arch="fmnist-mlp", queries=800, epochs=10, seed=3, stop=stop)
    assert result.epochs == 3 and seen == [True, True, True]
    assert extract(api, x=xq, arch="fmnist-mlp", queries=800, epochs=2, seed=3).epochs == 2
    never = extract(api, x=xq, arch="fmnist-mlp", queries=800, epochs=2, seed=3, stop=lambda model: False)
    assert never.epochs == 2
    with pytest.raises(UsageError, match=r"^The accuracy target is a fraction in \[0, 1\], got 1.01.$"):
        accuracy_reached(xt, yt, 1.01)
    first = extract(api, x=xq, arch="fmnist-mlp", queries=800, epochs=10, seed=3, stop=accuracy_reached(xt, yt, 0.0))
    assert first.epochs == 1


def test_top1_targets_round_the_confidence():
    scores = np.array([[0.123, 0.877, 0.0, 0.0]])
    t = extraction_targets(np.array([1]), scores, mode="top1", num_classes=4, decimals=1).numpy()
    assert t[0, 1] == pytest.approx(0.9) and t[0, 0] == pytest.approx(0.1 / 3)
    assert t.sum() == pytest.approx(1.0)


def test_extract_bad_input(victim):
    xq, _ = _data(50, seed=1)
    label_only = LocalSuspect(victim, input_shape=SHAPE, expose_scores=False)
    with pytest.raises(UsageError, match="needs a victim that returns scores"):
        extract(label_only, x=xq, arch="fmnist-mlp", labels="soft", epochs=1)
    with pytest.raises(UsageError, match="Unknown label mode"):
        extract(label_only, x=xq, arch="fmnist-mlp", labels="probs", epochs=1)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="inputs shaped"):
        extract(label_only, x=torch.rand(5, 1, 4, 4), arch="fmnist-mlp", epochs=1)

    class Refuser:
        description, num_classes, input_shape = "refuser", C, SHAPE

        def query(self, inputs):
            return Answers(labels=np.full(len(inputs), -1))

    with pytest.raises(RuntimeFailure, match="abstained on every query"):
        extract(Refuser(), x=xq, arch="fmnist-mlp", epochs=1)

    class Partial:  # abstains on every other query: those are dropped, the rest trains
        description, num_classes, input_shape = "partial", C, SHAPE

        def query(self, inputs):
            labels = label_only.query(inputs).labels.copy()
            labels[::2] = -1
            return Answers(labels=labels)

    assert extract(Partial(), x=xq, arch="fmnist-mlp", epochs=1).answered == 25


def test_cli_extract_through_marked_api_then_verify(victim, tmp_path):
    x, y = _data(1200, seed=4)
    xt, yt = _data(300, seed=5)
    data = tmp_path / "data.safetensors"
    save_tensors({"x": x, "y": y, "x_test": xt, "y_test": yt}, data)
    weights = tmp_path / "victim.safetensors"
    save_tensors(victim.state_dict(), weights,
                 metadata=model_metadata(arch="fmnist-mlp", num_classes=C, input_shape=SHAPE))
    key = tmp_path / "owner.key"
    save_key(generate_key(owner="Owner", num_classes=C, input_shape=SHAPE), key)
    log = tmp_path / "marks.sqlite"
    runner = CliRunner()
    out = tmp_path / "surrogate.safetensors"
    res = runner.invoke(main, ["attack", "extract", "--victim-arch", "fmnist-mlp", "--victim", str(weights),
                               "--arch", "fmnist-mlp", "--labels", "hard", "--queries", "1200", "--data", str(data),
                               "--out", str(out), "--epochs", "40", "--mark", "flip", "--key", str(key), "--log",
                               str(log), "--client", "thief", "--rate", "0.15", "--candidates", "all"])
    assert res.exit_code == 0, res.output
    assert "40 epoch(s)" in res.output and "agreement with the victim" in res.output
    quick = tmp_path / "quick.safetensors"
    res = runner.invoke(main, ["attack", "extract", "--victim-arch", "fmnist-mlp", "--victim", str(weights),
                               "--arch", "fmnist-mlp", "--queries", "1200", "--data", str(data), "--out", str(quick),
                               "--epochs", "40", "--until-accuracy", "0.0"])
    assert res.exit_code == 0 and "1 epoch(s)" in res.output, res.output
    extraction = ["verify", "extraction", "--key", str(key), "--arch", "fmnist-mlp", "--suspect", str(out)]
    res = runner.invoke(main, extraction + ["--log", str(log), "--client", "thief", "--fixed", "--json"])
    doc = json.loads(res.output)
    assert [t["name"] for t in doc["tests"]] == ["trigger-set", "api-mark"]
    assert doc["correction"] == "holm"
    # A 40-epoch surrogate of a 1200-query task memorises its marked answers: extracted. (At 600 queries a
    # fresh random key left too thin a margin: log10 p from -5.1 to -19; at 1200, -11 to -28 over 8 keys.)
    assert (res.exit_code, doc["kind"]) == (0, "extracted"), doc["tests"][1]
    res = runner.invoke(main, extraction + ["--log", str(log), "--client", "nobody"])
    assert res.exit_code == 2 and "no marked queries for client 'nobody'" in res.output
    res = runner.invoke(main, extraction + ["--client", "thief"])
    assert res.exit_code == 2 and "Give the query log your API wrote" in res.output
    res = runner.invoke(main, extraction + ["--log", str(log), "--client", "thief", "--rounds", "3"])
    assert res.exit_code == 2 and res.output.strip() == "error: --rounds does not apply without --rule (tie-break only)."
    res = runner.invoke(main, extraction + ["--log", str(log), "--client", "thief", "--with-scores"])
    assert res.exit_code == 2 and res.output.strip() == ("error: --with-scores does not apply without --rule "
                                                         "(tie-break only).")
    res = runner.invoke(main, extraction + ["--log", str(log), "--client", "thief", "--transcript", "t.sqlite"])
    assert res.exit_code == 2 and "--transcript does not apply to a model-file suspect" in res.output
    res = runner.invoke(main, ["verify", "extraction", "--key", str(key), "--suspect", "http://127.0.0.1:9/v2/models/m",
                               "--arch", "fmnist-mlp", "--log", str(log), "--client", "thief"])
    assert res.exit_code == 2 and "--arch does not apply to an API suspect" in res.output
    res = runner.invoke(main, ["attack", "extract", "--victim-arch", "fmnist-mlp", "--victim", str(weights),
                               "--arch", "fmnist-mlp", "--data", str(data), "--out", str(quick), "--rate", "0.1"])
    assert res.exit_code == 2 and "--rate does not apply without --mark" in res.output
    other_key = tmp_path / "other.key"
    save_key(generate_key(owner="Other", num_classes=C, input_shape=SHAPE), other_key)
    res = runner.invoke(main, ["verify", "extraction", "--key", str(other_key), "--arch", "fmnist-mlp", "--suspect",
                               str(out), "--log", str(log), "--client", "thief"])
    assert res.exit_code == 2 and "written under another key" in res.output
