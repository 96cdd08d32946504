"""Model architectures by name, and loading weights from safetensors into them.

``--arch`` takes a built-in name (see :data:`BUILTIN_ARCHS`) or an importable ``package.module:factory``;
a factory is called as ``factory(num_classes=C, input_shape=(1, 28, 28))`` and returns an ``nn.Module``.

Example:
    >>> model = build_model("fmnist-cnn", num_classes=10, input_shape=(1, 28, 28))
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import importlib
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from wmark.contract import forward_logits, model_device, to_device
from wmark.errors import UsageError
from wmark.io import load_tensors
from wmark.text import shown_claim
from wmark.text_models import TEXT_ARCHS


class ConvNet(nn.Module):
    """Two conv/ReLU/max-pool blocks and a two-layer classifier head."""

    def __init__(self, *, num_classes: int, input_shape: tuple[int, ...], channels: tuple[int, int] = (16, 32),
                 hidden: int = 128) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise UsageError(f"A CNN needs inputs shaped C×H×W, got {tuple(input_shape)}.")
        if min(input_shape[1:]) < 4:
            # two 2×2 poolings leave nothing of a smaller image: its forward failed with a raw RuntimeError
            raise UsageError(f"A CNN needs images of at least 4×4 pixels (it pools twice), got {tuple(input_shape)}; "
                             "use fmnist-mlp for smaller inputs.")
        c1, c2 = channels
        self.conv1 = nn.Conv2d(input_shape[0], c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        h, w = input_shape[1] // 4, input_shape[2] // 4
        self.fc1 = nn.Linear(c2 * h * w, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    """A flatten → 256 → 128 → classes perceptron."""

    def __init__(self, *, num_classes: int, input_shape: tuple[int, ...], hidden: tuple[int, int] = (256, 128)) -> None:
        super().__init__()
        d = 1
        for s in input_shape:
            d *= int(s)
        self.fc1 = nn.Linear(d, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


def _cnn(*, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return ConvNet(num_classes=num_classes, input_shape=input_shape)


def _cnn_wide(*, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return ConvNet(num_classes=num_classes, input_shape=input_shape, channels=(32, 64), hidden=256)


def _mlp(*, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return MLP(num_classes=num_classes, input_shape=input_shape)


def _resnet(*, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    from wmark.resnet import ResNet

    return ResNet(num_classes=num_classes, input_shape=input_shape)


BUILTIN_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet-small": _resnet,
    "fmnist-cnn": _cnn,
    "fmnist-cnn-wide": _cnn_wide,
    "fmnist-mlp": _mlp,
    **TEXT_ARCHS,
}


def resolve_arch(arch: str) -> Callable[..., nn.Module]:
    """The factory for a built-in name or a ``package.module:factory`` path."""
    if arch in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[arch]
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"Cannot import architecture {arch!r} ({exc}).") from None
        if not callable(factory):
            raise UsageError(f"{arch!r} is not callable; point the architecture at a function that returns an nn.Module.")
        return factory
    raise UsageError(
        f"Unknown architecture {arch!r}; use one of {', '.join(sorted(BUILTIN_ARCHS))} or package.module:factory."
    )


def build_model(arch: str, *, num_classes: int, input_shape: tuple[int, ...], seed: int | None = None) -> nn.Module:
    """Instantiate an architecture; ``seed`` makes its initialisation reproducible.

    Raises:
        UsageError: For fewer than 2 classes or an input dimension below 1 (such a model was built, trained and
            written, e.g. from a data file whose labels are all 0, and its file refused only when read back).
    """
    factory = resolve_arch(arch)
    if isinstance(num_classes, bool) or num_classes < 2:
        raise UsageError(f"A classifier needs at least 2 classes, got {num_classes}; check the data's labels.")
    if any(int(d) < 1 for d in input_shape):
        raise UsageError(f"Every input dimension must be at least 1, got {tuple(input_shape)}.")
    if seed is not None:
        torch.manual_seed(seed)
    model = factory(num_classes=num_classes, input_shape=tuple(input_shape))
    if not isinstance(model, nn.Module):
        raise UsageError(f"Architecture {arch!r} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, str]:
    """Load a safetensors state dict into ``model`` (any float or int8 dtype is cast); return its metadata.

    Raises:
        UsageError: If the file is unreadable or its tensors do not fit the architecture.
    """
    tensors, metadata = load_tensors(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors) if tuple(expected[n].shape) != tuple(tensors[n].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong:
            n = wrong[0]
            parts.append(f"{n} is {tuple(tensors[n].shape)} but the architecture needs {tuple(expected[n].shape)}")
        raise UsageError(f"The weights in {path} do not fit this architecture ({'; '.join(parts)}); check the architecture.")
    model.load_state_dict({n: tensors[n].to(expected[n].dtype) for n in expected})
    return metadata


def load_model(arch: str, path: str | os.PathLike[str], *, num_classes: int | None = None,
               input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, dict[str, str]]:
    """Build ``arch`` and load weights into it.

    ``num_classes`` and ``input_shape`` default to the ``wmark.num_classes`` / ``wmark.input_shape`` metadata
    that wmark writes into every model file.

    Raises:
        UsageError: When the file records neither and they are not given (nothing is guessed).
    """
    from wmark.io import read_metadata, wmark_metadata

    meta = wmark_metadata(read_metadata(path))
    missing = [name for name, given in (("num_classes", num_classes), ("input_shape", input_shape))
               if given is None and name not in meta]
    if missing:
        raise UsageError(f"The model file {path} records no wmark.{' or wmark.'.join(missing)} (it was not written by "
                         "wmark); give its number of classes and input shape, e.g. from the key.")
    c = num_classes if num_classes is not None else recorded_classes(meta, path)
    try:
        shape = input_shape if input_shape is not None else tuple(int(d) for d in meta["input_shape"])
    except (TypeError, ValueError):
        raise UsageError(f"The model file {path} records an unreadable wmark.input_shape "
                         f"({meta['input_shape']!r}); give the input shape, e.g. from the key.") from None
    model = build_model(arch, num_classes=c, input_shape=shape)
    metadata = load_weights(model, path)
    model.eval()
    return model, metadata


def check_key_fits_arch(modality: dict[str, Any] | None, arch: str) -> None:
    """Refuse a built-in architecture of the other input kind than a key's (``modality``: the key's, None for
    images) before its model is built, where the mismatch would surface as a shape or dtype error.

    Raises:
        UsageError: Naming the kind of key to use.
    """
    if arch in TEXT_ARCHS and modality is None:
        raise UsageError(f"{arch} is a text model but the key is an image key; use a text key made for it "
                         "(`wmark keygen --modality text`).")
    if arch in BUILTIN_ARCHS and arch not in TEXT_ARCHS and modality is not None:
        raise UsageError(f"{arch} takes images but the key is a text key; use an image key made for it.")


def _as_count(value: Any) -> int | None:
    # A class count as metadata decodes it: an int (or a string of one) of at least 2, never a JSON true.
    try:
        count = int(value)
    except (TypeError, ValueError):
        return None
    return None if count < 2 or isinstance(value, bool) else count


def recorded_classes(meta: dict[str, Any], path: str | os.PathLike[str]) -> int:
    """The ``wmark.num_classes`` a model file records (``meta``: its decoded metadata), checked to be a count."""
    value = meta["num_classes"]
    count = _as_count(value)
    if count is None:
        raise UsageError(f"The model file {path} records an unreadable wmark.num_classes ({value!r}); the file is "
                         "damaged, or give the number of classes (e.g. from the key).")
    return count


def recorded_classes_note(meta: dict[str, Any], num_classes: int, *, what: str) -> str:
    """A sentence for a verdict when a suspect's model file records another class count than the key's ("" if not).

    Called once the suspect's weights have loaded into a ``num_classes``-class model: its metadata is its holder's
    claim, and a thief who could block verification by writing another ``wmark.num_classes`` into a stolen file
    would. The note tells the reader of the verdict what the file claims.

    Args:
        meta: The suspect file's decoded ``wmark.*`` metadata.
        num_classes: The key's number of classes, which the suspect was loaded and verified with.
        what: The suspect, to start the sentence (e.g. ``"The model file stolen.safetensors"``).
    """
    value = meta.get("num_classes")
    # an unreadable count disagrees with the key too, and is shown as written
    if value is None or _as_count(value) == num_classes:
        return ""
    return (f"{what} records {shown_claim(str(value), 40)} classes (wmark.num_classes) while the key is for "
            f"{num_classes}-class models; it was verified anyway, as the {num_classes}-class model its weights fit.")


def recorded_shape_note(meta: dict[str, Any], input_shape: tuple[int, ...], *, what: str) -> str:
    """A sentence for a verdict when a suspect's model file records another input shape than the key's ("" if not).

    Like :func:`recorded_classes_note`: the file's metadata is its holder's claim, the suspect was asked the key's
    inputs (the forward's answers are checked when it answers), and the note tells the verdict's reader what the
    file claims.
    """
    value = meta.get("input_shape")
    # only a list of plain ints is a shape: "188", [1.9, 8.7, 8.2] or [true, 8, 8] are not the key's (1, 8, 8),
    # and [1e999, 8, 8] must not stop verification
    if value is None or (isinstance(value, list) and all(type(d) is int for d in value)
                         and tuple(value) == tuple(input_shape)):
        return ""
    return (f"{what} records inputs shaped {shown_claim(str(value), 40)} (wmark.input_shape) while the key's are "
            f"{tuple(input_shape)}; it was verified anyway, on the key's inputs.")


def fitted_classes(arch: str, path: str | os.PathLike[str], *, input_shape: tuple[int, ...],
                   other_than: int) -> int | None:
    """The number of classes, other than ``other_than``, of the ``arch`` model whose shapes the file's weights have.

    Read off the weights, not the file's metadata (a suspect's holder writes that): a tensor that a model built for
    ``other_than`` classes has ``other_than`` rows of (the output layer) proposes its row count in the file, which
    counts only if an ``arch`` model built for that many classes has exactly the file's tensor names and shapes.
    ``None`` when no such count exists (the weights differ from the architecture elsewhere).
    """
    tensors, _ = load_tensors(path)
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    expected = build_model(arch, num_classes=other_than, input_shape=input_shape).state_dict()
    if set(expected) != set(shapes):
        return None
    counts = {shapes[n][0] for n, t in expected.items()
              if t.ndim and t.shape[0] == other_than and shapes[n] and shapes[n][0] != other_than}
    if len(counts) != 1:  # an output layer's weight and bias agree on one count; anything else is not a count
        return None
    count = counts.pop()
    built = build_model(arch, num_classes=count, input_shape=input_shape).state_dict()
    return count if {n: tuple(t.shape) for n, t in built.items()} == shapes else None


def model_metadata(*, arch: str, num_classes: int, input_shape: tuple[int, ...], **extra: Any) -> dict[str, Any]:
    """The ``wmark.*`` metadata every model file written by wmark carries."""
    return {"arch": arch, "num_classes": num_classes, "input_shape": list(input_shape), **extra}


class PenultimateFeaturizer:
    """Features = the input of the model's last ``nn.Linear`` layer, read by one forward hook it owns.

    Callable as ``featurizer(x) -> features`` (float32 NumPy on the CPU, batched by ``batch_size``), and
    :meth:`logits_and_features` gives the logits and the features of one batch from the *same* forward pass,
    so a marked API built on these features runs the model once per request. The hook stays on the layer
    for the featurizer's life (:meth:`close` removes it) and records only the calls this featurizer makes, on
    the thread that makes them: featurizers and plain inference can run concurrently on one model.

    Args:
        model: Any classifier of :mod:`wmark.contract` ending in an ``nn.Linear`` (run on its own device).
        batch_size: Inputs per forward pass when called on an array.
        encode: Turns a slice of inputs into the model's batch (e.g. :meth:`wmark.text.TextInputs.encode` for
            strings); by default inputs are float32 tensors.

    Raises:
        UsageError: On a model without an ``nn.Linear`` layer.
    """

    def __init__(self, model: torch.nn.Module, *, batch_size: int = 1024,
                 encode: Callable[[Any], Any] | None = None) -> None:
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        if not last:
            raise UsageError("The featurizer model has no nn.Linear layer; pass a model that ends in one.")
        self.model, self.batch_size, self.encode = model, batch_size, encode
        self._local = threading.local()
        local = self._local

        def record(_module: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            captured = getattr(local, "captured", None)
            if captured is not None:
                captured.append(inp[0].detach().flatten(1))

        self._handle: Any = last[-1].register_forward_hook(record)
        weakref.finalize(self, self._handle.remove)

    def close(self) -> None:
        """Remove the hook from the model (the featurizer cannot be used afterwards)."""
        self._handle.remove()
        self._handle = None

    def logits_and_features(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the features of one model batch (on the model's device), from one forward pass.

        Raises:
            UsageError: After :meth:`close`, or when the last ``nn.Linear`` does not run exactly once per forward
                pass (its input is then no per-example feature).
        """
        if self._handle is None:
            raise UsageError("This featurizer was closed; make a new one with penultimate_featurizer(model).")
        captured: list[torch.Tensor] = []
        self._local.captured = captured
        try:
            logits = forward_logits(self.model, to_device(batch, model_device(self.model)))
        finally:
            self._local.captured = None
        if len(captured) != 1 or len(captured[0]) != len(logits):
            raise UsageError(f"The model's last nn.Linear ran {len(captured)} times in one forward pass; features are "
                             "read from a final linear head that runs once per example, so give a model ending in one.")
        return logits, captured[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.model.eval()
        chunks: list[np.ndarray] = []
        with torch.no_grad():
            for i in range(0, len(x), self.batch_size):
                chunk = x[i:i + self.batch_size]
                batch = (self.encode(chunk) if self.encode is not None
                         else torch.as_tensor(np.asarray(chunk, dtype=np.float32)))
                chunks.append(self.logits_and_features(batch)[1].float().cpu().numpy())
        return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 0), np.float32)


def penultimate_featurizer(model: torch.nn.Module, *, batch_size: int = 1024,
                           encode: Callable[[Any], Any] | None = None) -> PenultimateFeaturizer:
    """Features = the input of the model's last ``nn.Linear`` layer (e.g. the owner's served model).

    The tie-break API mark (:mod:`wmark.schemes.tiebreak`) places its keyed
    rules in this space: it groups inputs the way a trained network already does, which is what makes a rule
    there learnable by a surrogate. Any classifier of :mod:`wmark.contract` works, on its own device; features
    come back as float32 NumPy on the CPU. See :class:`PenultimateFeaturizer`.

    Args:
        encode: Turns a slice of inputs into the model's batch (e.g. :meth:`wmark.text.TextInputs.encode` for
            strings); by default inputs are float32 tensors.
    """
    return PenultimateFeaturizer(model, batch_size=batch_size, encode=encode)
