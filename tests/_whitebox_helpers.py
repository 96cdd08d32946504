"""Tiny conv/linear chains and quick marking for the weight-watermark tests (milliseconds each)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from keykit import seeded_key
from torch import nn

from wmark.io import save_model, save_tensors
from wmark.keys import Key, default_schemes, generate_key
from wmark.schemes.weights import WeightsEmbedder
from wmark.whitebox.verify import verify_whitebox


class TinyCNN(nn.Module):
    """conv1 (4) → pool → conv2 (16) → pool → flatten (16·4·4 = 256) → fc1 (32) → fc2 (10), on 1×16×16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def tiny_key(bits: int = 64, message: str | None = None, *, seed: int | None = None) -> Key:
    """A key for 1×16×16 inputs; with ``seed`` its secret is fixed, so tests that embed are deterministic."""
    schemes = default_schemes(10)
    schemes["weights"] = dict(schemes["weights"], bits=bits, message=message)
    kwargs = {"owner": "Test Owner", "input_shape": (1, 16, 16), "num_triggers": 10, "schemes": schemes}
    return generate_key(**kwargs) if seed is None else seeded_key(str(seed), **kwargs)


def tiny_model(seed: int) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN()


def task_data(seed: int = 0, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=gen)
    teacher = torch.randn(16, 10, generator=torch.Generator().manual_seed(1234))
    y = ((nn.functional.avg_pool2d(x, 4).flatten(1) - 0.5) @ teacher).argmax(1)
    return x, y


def train(model: nn.Module, *, steps: int, seed: int, embedder: WeightsEmbedder | None = None,
          lr: float = 3e-3, data: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """Adam on a small synthetic task (or ``data``); with an embedder, its step pre-hook marks the model on
    the way. Frozen parameters stay frozen; the model comes back in eval mode."""
    x, y = task_data(seed) if data is None else data
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    handle = optimizer.register_step_pre_hook(embedder.hook) if embedder is not None else None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    if handle is not None:
        handle.remove()
    return model.eval()


def marked_file(key: Key, path, *, seed: int = 0, steps: int = 60) -> tuple[nn.Module, WeightsEmbedder]:
    """Mark a tiny CNN with the key and save it with the metadata the verifier reads."""
    model = tiny_model(seed)
    emb = WeightsEmbedder(key, model)
    train(model, steps=steps, seed=seed, embedder=emb)
    save_model(model, path, metadata={"weights": emb.metadata(), "commitment": key.commitment()})
    return model, emb


def image_task(seed: int, n: int = 384, *, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random ``channels``×16×16 images labelled by a fixed linear teacher on their 4×4 average-pooled map."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, 16, 16, generator=gen)
    teacher = torch.randn(channels * 16, 10, generator=torch.Generator().manual_seed(7))
    return x, ((nn.functional.avg_pool2d(x, 4).flatten(1) - 0.5) @ teacher).argmax(1)


def train_on_images(model: nn.Module, seed: int, *, steps: int, embedder: WeightsEmbedder | None = None,
                    channels: int = 3) -> nn.Module:
    """:func:`train` on :func:`image_task`'s images of ``seed``: the small CNN tests' task."""
    return train(model, data=image_task(seed, channels=channels), steps=steps, seed=seed, embedder=embedder, lr=3e-3)


def mark_over_anchor(key: Key, base: nn.Module, d, train: Callable[..., nn.Module], *, steps: int = 80,
                     layer: str | None = None) -> tuple[nn.Module, WeightsEmbedder]:
    """Save ``base`` as ``d/anchor.safetensors``, mark a copy of it with ``train(model, 1, steps=, embedder=)`` and
    save that as ``d/ref.safetensors`` with the metadata the verifier reads: the layout of every anchored test."""
    save_model(base, d / "anchor.safetensors")
    model = copy.deepcopy(base)
    emb = WeightsEmbedder(key, model) if layer is None else WeightsEmbedder(key, model, layer=layer)
    train(model, 1, steps=steps, embedder=emb)
    save_model(model, d / "ref.safetensors", metadata={"weights": emb.metadata(), "commitment": key.commitment()})
    return model, emb


def train_gray(model: nn.Module, seed: int, *, steps: int, embedder: WeightsEmbedder | None = None) -> nn.Module:
    """:func:`train_on_images` on one-channel images (the squeeze-excitation tests' task)."""
    return train_on_images(model, seed, steps=steps, embedder=embedder, channels=1)


def mark_proj(base: nn.Module, d) -> tuple[Key, nn.Module]:
    """``base`` trained 30 steps (:func:`train_gray`) as the anchor and its ``proj`` layer marked over it with a
    32-bit key: the squeeze-excitation tests' set-up. One bit of that key sits near 0 in such a layer, so at most
    one bit is wrong."""
    key = tiny_key(32, seed=41)
    model, emb = mark_over_anchor(key, train_gray(base, 0, steps=30), d, train_gray, layer="proj")
    assert emb.bit_errors() <= 1
    return key, model


def check(key: Key, d, tensors: dict[str, torch.Tensor], name: str):
    """Verify ``tensors`` (saved as ``d/name.safetensors``) against ``d``'s reference and anchor files."""
    save_tensors(tensors, d / f"{name}.safetensors")
    return verify_whitebox(key=key, reference=d / "ref.safetensors", suspect=d / f"{name}.safetensors",
                           anchor=d / "anchor.safetensors")


def assert_reads_back(key: Key, d, model: nn.Module, permuted: Callable[[nn.Module, int], nn.Module], *,
                      seeds: Sequence[int] = (0, 1), at_least: int = 30) -> list[int]:
    """Verify ``permuted(model, seed)`` for each seed against ``d``'s files: detected, at least ``at_least`` bits
    matching, under the exact null; returns the matches."""
    results = []
    for seed in seeds:
        verdict = check(key, d, permuted(model, seed).state_dict(), f"attacked{seed}")
        results.append(verdict.tests[0].matches)
        assert verdict.detected and verdict.tests[0].matches >= at_least, results
        assert verdict.tests[0].null["exact_by_construction"]
    return results


def assert_twins_near_chance(key: Key, d, twins: dict[int, nn.Module],
                             permuted: Callable[[nn.Module, int], nn.Module]) -> list[int]:
    """Verify each independently trained twin (by seed), permuted with its seed: never detected, log10 p above -3;
    returns the matches."""
    results = []
    for seed, twin in twins.items():
        verdict = check(key, d, permuted(twin, seed).state_dict(), f"twin{seed}")
        results.append(verdict.tests[0].matches)
        assert not verdict.detected and verdict.tests[0].log10_p > -3, results
    return results


def guarded_aligner(d, sus: dict[str, torch.Tensor]):
    """An aligner from ``d``'s anchor to ``sus`` that fails the test if it ever reads the marked layer, run."""
    import json

    from wmark.io import load_tensors
    from wmark.whitebox.align import Aligner, plan_layers

    info = json.loads(dict(load_tensors(d / "ref.safetensors")[1])["wmark.weights"])
    layers, spaces, iters = plan_layers(info)
    src, _ = load_tensors(d / "anchor.safetensors")

    def source(name: str) -> torch.Tensor:
        assert name != layers[-1].name, "the marked layer was read"
        return src[name]

    aligner = Aligner(layers=layers, spaces=spaces, source=source,
                      suspect_shapes={n: tuple(t.shape) for n, t in sus.items()}, suspect=sus.__getitem__, iters=iters)
    aligner.run()
    return aligner, layers

