"""A small, explicit training loop used by the CLI, the attacks and the benchmarks.

Users embed watermarks in their *own* loops (see :mod:`wmark.embed`); this one exists so the toolkit can
train base models, reference models and attackers' copies reproducibly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from wmark.contract import Batch, batch_len, forward_logits, model_device, slice_batch, split_batch
from wmark.errors import UsageError


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device a user named (``cpu``, ``cuda``, ``cuda:1``, ``mps``), or :func:`default_device` for None.

    Raises:
        UsageError: If the name is not a device, or names an accelerator this machine does not have.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{name!r} is not a device; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"Device {name!r} is not available here (CUDA devices: {torch.cuda.device_count()}); "
                         "use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("MPS is not available here; use --device cpu.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{name!r} is not a device wmark serves on; use cpu, cuda, cuda:N or mps.")
    return device


def _training_device(model: nn.Module) -> torch.device:
    """Where a model trains when no device is given: where it already is if that is an accelerator (a model the
    caller placed on ``cuda:1`` or MPS stays there), else :func:`default_device`."""
    here = model_device(model)
    return here if here.type != "cpu" else default_device()


def check_schedule(*, epochs: int, lr: float, batch_size: int | None = None) -> None:
    """Refuse training settings no run can use, before any data is loaded or a file written.

    Without this an epoch count below 1 writes the untouched model as if it were trained, and a bad learning
    rate or batch size fails deep inside PyTorch with a message that names no option.

    Raises:
        UsageError: For fewer than 1 epoch, a learning rate that is not a positive finite number, a batch
            size below 1.
    """
    if epochs < 1:
        raise UsageError(f"Training needs at least 1 epoch, got {epochs}.")
    if not (0 < lr < math.inf):
        raise UsageError(f"The learning rate must be a positive finite number, got {lr}.")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"The batch size must be at least 1, got {batch_size}.")


def make_loader(x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 64, seed: int = 0,
                shuffle: bool = True) -> DataLoader:
    """A shuffling DataLoader over in-memory tensors with a seeded order."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def train_epochs(model: nn.Module, loader: Iterable, *, epochs: int, optimizer: torch.optim.Optimizer,
                 device: torch.device | None = None, progress: bool = False, desc: str = "train",
                 stop: Callable[[nn.Module], bool] | None = None) -> int:
    """Plain supervised training with cross-entropy; batches are ``(x, y)`` pairs or dicts with ``labels``.

    Args:
        stop: Called with the model (in eval mode) after each epoch; training ends early when it returns True.

    Returns:
        The number of epochs trained.
    """
    device = device or _training_device(model)
    model.to(device).train()
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        batches: Iterator = iter(loader)
        with _bar(loader, progress, f"{desc} {epoch + 1}/{epochs}") as bar:
            for batch in batches:
                x, y = split_batch(batch)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(forward_logits(model, x), y.to(device, non_blocking=True))
                loss.backward()
                optimizer.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if stop is not None:
            model.eval()
            if stop(model):
                return epoch + 1
            model.train()
    model.eval()
    return epochs


@contextlib.contextmanager
def _bar(loader: Iterable, enabled: bool, desc: str) -> Iterator[tqdm]:
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="batch", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


@torch.no_grad()
def predict_logits(model: nn.Module, x: Batch, *, batch_size: int = 1024,
                   device: torch.device | None = None) -> torch.Tensor:
    """Logits for every row of ``x`` (a tensor or a dict batch), returned on CPU.

    ``device`` moves the model there first; by default it runs where it is.
    """
    if device is not None:
        model.to(device)
    model.eval()
    n = batch_len(x)
    out = [forward_logits(model, slice_batch(x, i, i + batch_size)).float().cpu() for i in range(0, n, batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def accuracy(model: nn.Module, x: Batch, y: torch.Tensor, *, device: torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    return (predict_logits(model, x, device=device).argmax(1) == torch.as_tensor(y).cpu()).float().mean().item()


def agreement(a: nn.Module, b: nn.Module, x: Batch) -> float:
    """Fraction of inputs on which two models give the same top-1 label."""
    return (predict_logits(a, x).argmax(1) == predict_logits(b, x).argmax(1)).float().mean().item()
