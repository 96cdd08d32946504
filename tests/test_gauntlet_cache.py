"""The gauntlet's model cache: a model is reused only for the configuration that made it (no training here)."""

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gauntlet
from gauntlet_families import family


def _shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **plan: Any) -> gauntlet.Workshop:
    monkeypatch.setattr(gauntlet, "CACHE", tmp_path)
    fam = family("cnn", 1)
    shop = gauntlet.Workshop(fam, dataclasses.replace(fam.plan(True), **plan), seed=0, quick=True)

    def get(config: dict[str, Any], make: Any) -> tuple[Path, dict[str, Any]]:
        return shop.path(config), {}  # the file the configuration maps to, never made

    monkeypatch.setattr(shop, "get", get)
    return shop


def test_an_embedded_model_is_keyed_by_its_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = _shop(tmp_path, monkeypatch)
    two = _shop(tmp_path, monkeypatch, base_epochs=one.plan.base_epochs + 1)
    assert one.base() != two.base()
    assert one.marked(("trigger",))[0] != two.marked(("trigger",))[0]
    assert one.marked(("trigger",))[0] == _shop(tmp_path, monkeypatch).marked(("trigger",))[0]


def test_every_model_is_keyed_by_its_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = _shop(tmp_path, monkeypatch), _shop(tmp_path, monkeypatch)
    two.fam = dataclasses.replace(two.fam, owner="data-999-99.safetensors@owner",
                                  attacker="data-999-99.safetensors@attacker")
    assert one.base() != two.base()
    assert one.null_model("fmnist-cnn", 101, 3000, 1)[0] != two.null_model("fmnist-cnn", 101, 3000, 1)[0]
    # a slice file is keyed by its name, not by where the cache lies
    moved = _shop(tmp_path, monkeypatch)
    moved.fam = dataclasses.replace(moved.fam, owner="/elsewhere/data-999-99.safetensors@owner",
                                    attacker="/elsewhere/data-999-99.safetensors@attacker")
    assert moved.base() == two.base()
