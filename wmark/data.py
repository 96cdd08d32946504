"""Datasets: Fashion-MNIST from Debian's ``dataset-fashion-mnist``, scikit-learn's digits, or a file.

Nothing is ever downloaded. A dataset spec is one of:

* ``fashion-mnist`` or ``fashion-mnist:DIR`` — the four IDX files (``.gz`` or not) in DIR, default
  ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``);
* ``fashion-mnist-rgb32[:DIR]`` — the same images as 3×32×32 (padded by 2, grey replicated into three
  channels), a stand-in for RGB inputs (e.g. ``--arch resnet-small``);
* ``digits`` — scikit-learn's bundled 8×8 digits (1,797 images), split 80/20 with a fixed seed;
* ``PATH.safetensors`` — tensors ``x`` (N×…) and ``y`` (N,), optional ``x_test``/``y_test``;
* ``fortunes`` or ``fortunes:DIR`` — 8-class text classification over Debian's fortune quotes
  (:mod:`wmark.text_data`): token ids (N×64, MiniLM's tokenizer) with the texts kept beside them. Its
  ``@owner`` / ``@attacker`` parts are two of three fixed thirds chosen by a hash of each text; the third
  third is the test set of every part (so ``fortunes`` alone trains on two thirds).

Any spec may end in ``@owner`` or ``@attacker``: the training set is then split once, with a fixed seed,
into two disjoint halves (the test set is shared), so an owner and an attacker never train on the same
images — e.g. ``fashion-mnist@attacker``.

Images are float32 in [0, 1] with a channel dimension (N×1×H×W); labels are int64.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmark.errors import UsageError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors of one dataset.

    Attributes:
        name: The spec it was loaded from.
        x_train: Float32 inputs, N×C×H×W (or N×D), values in [0, 1]; int64 token ids for text.
        y_train: Int64 labels.
        x_test: Held-out inputs.
        y_test: Held-out labels.
        num_classes: Number of classes.
        texts_train: The training texts, for a text dataset.
        texts_test: The test texts, for a text dataset.
        class_names: Class names, when the data has them.
        tokenizer: For a text dataset, the tokenizer its token ids were made with (``{"name", "vocab_sha256"}``,
            as a text key records it), so a key made with another tokenizer can be refused.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    texts_train: tuple[str, ...] | None = None
    texts_test: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None
    tokenizer: dict[str, str] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def modality(self) -> dict[str, Any] | None:
        """The modality a model trained on these token ids records, as a text key does (``None`` for images).

        Written into the model file, it lets the file be served as text and lets ``embed`` refuse a key made with
        another tokenizer than the one the model learnt its token ids from.
        """
        if self.tokenizer is None:
            return None
        return {"kind": "text", "tokenizer": dict(self.tokenizer), "max_length": int(self.input_shape[0])}

    def subset(self, *, max_samples: int | None) -> Dataset:
        """The first ``max_samples`` training examples (the test set is kept whole).

        Raises:
            UsageError: If ``max_samples`` is below 1 (a negative one would silently drop the *last* examples).
        """
        if max_samples is not None and max_samples < 1:
            raise UsageError(f"The training-sample limit (max_samples) must be at least 1, got {max_samples}.")
        if max_samples is None or max_samples >= len(self.x_train):
            return self
        texts = None if self.texts_train is None else self.texts_train[:max_samples]
        return dataclasses.replace(self, x_train=self.x_train[:max_samples], y_train=self.y_train[:max_samples],
                                   texts_train=texts)

    def split(self, *, owner_fraction: float = 0.5, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Split the training set once into an owner's part and an attacker's part (test set shared)."""
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.x_train), generator=gen)
        cut = round(owner_fraction * len(order))
        parts = []
        for idx in (order[:cut], order[cut:]):
            texts = None if self.texts_train is None else tuple(self.texts_train[int(i)] for i in idx)
            parts.append(dataclasses.replace(self, x_train=self.x_train[idx], y_train=self.y_train[idx],
                                             texts_train=texts))
        return parts[0], parts[1]


def load_dataset(spec: str) -> Dataset:
    """Load a dataset from a spec string (see the module docstring).

    Raises:
        UsageError: If the data is not on this machine, with the command that installs it.
    """
    base, at, part = spec.rpartition("@")
    if not at or (part not in ("owner", "attacker") and ("/" in part or part.endswith(".safetensors"))):
        base, part = spec, ""  # no split: a file path may hold "@" itself (a user's directory, say)
    if part and base.rpartition("@")[2] in ("owner", "attacker"):
        raise UsageError(f"{spec!r} names two splits; give one, @owner or @attacker.")
    if base.partition(":")[0] == "fortunes":
        return _load_fortunes(spec, base.partition(":")[2], part)
    if part:
        if part not in ("owner", "attacker"):
            raise UsageError(f"Unknown split {part!r} in {spec!r}; use @owner or @attacker.")
        owner, attacker = load_dataset(base).split(owner_fraction=0.5, seed=0)
        chosen = owner if part == "owner" else attacker
        return Dataset(spec, chosen.x_train, chosen.y_train, chosen.x_test, chosen.y_test, chosen.num_classes)
    name, _, arg = spec.partition(":")
    if name == "fashion-mnist":
        return _load_fashion_mnist(Path(arg) if arg else FASHION_MNIST_DIR, spec)
    if name == "fashion-mnist-rgb32":
        gray = _load_fashion_mnist(Path(arg) if arg else FASHION_MNIST_DIR, spec)
        return Dataset(spec, _rgb32(gray.x_train), gray.y_train, _rgb32(gray.x_test), gray.y_test, 10)
    if name == "digits":
        if arg:
            # digits is bundled with scikit-learn: an argument would be ignored, and the user meant other data
            raise UsageError(f"digits takes no argument (got {spec!r}); it is bundled with scikit-learn.")
        return _load_digits()
    if spec.endswith(".safetensors"):
        return _load_file(Path(spec))
    raise UsageError(
        f"Unknown dataset {spec!r}; use fashion-mnist[:DIR], fashion-mnist-rgb32[:DIR], digits, fortunes[:DIR], or a "
        ".safetensors file with x and y."
    )


def _rgb32(x: torch.Tensor) -> torch.Tensor:
    """28×28 grey images as 3×32×32 (zero pad 2, channels replicated as a view: no copy until indexed)."""
    return torch.nn.functional.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise UsageError(f"Cannot read {path} ({exc}); reinstall with `apt-get install --reinstall dataset-fashion-mnist`.") from None
    if len(raw) < 4:
        raise UsageError(f"{path} is truncated.")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UsageError(f"{path} is not an unsigned-byte IDX file.")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UsageError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}.")
    return body.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"Fashion-MNIST file {stem} not found in {directory}; install it with "
        "`sudo apt-get install dataset-fashion-mnist` or pass fashion-mnist:DIR."
    )


def _load_fashion_mnist(directory: Path, spec: str) -> Dataset:
    xtr, ytr, xte, yte = _read_fashion_mnist(directory.resolve())
    return Dataset(spec, xtr, ytr, xte, yte, 10)


@functools.lru_cache(maxsize=2)
def _read_fashion_mnist(directory: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Decoding the gzipped IDX files takes seconds; benchmarks and tests load them many times per process.
    # Callers never modify the returned tensors in place.
    if not directory.is_dir():
        raise UsageError(
            f"Fashion-MNIST directory {directory} does not exist; install it with "
            "`sudo apt-get install dataset-fashion-mnist` or pass fashion-mnist:DIR."
        )
    arrays = [_read_idx(_find(directory, stem)) for stem in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    xtr, ytr, xte, yte = arrays

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    return images(xtr), torch.from_numpy(ytr.astype(np.int64)), images(xte), torch.from_numpy(yte.astype(np.int64))


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    tr, te = order[:cut], order[cut:]
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10)


def _load_file(path: Path) -> Dataset:
    from wmark.io import load_tensors

    if not path.is_file():
        raise UsageError(f"Data file not found: {path}; give an existing .safetensors file with tensors x and y.")
    tensors, _ = load_tensors(path)
    if "x" not in tensors or "y" not in tensors:
        raise UsageError(f"{path} must hold tensors named 'x' and 'y' (found {sorted(tensors)}).")
    if ("x_test" in tensors) != ("y_test" in tensors):
        raise UsageError(f"{path} holds only one of 'x_test' and 'y_test'; give both, or neither to hold out 20 % of x.")
    x, y = tensors["x"].float(), _labels(tensors["y"], path, "y")
    if len(x) != len(y):
        raise UsageError(f"{path}: x has {len(x)} rows but y has {len(y)}.")
    if "x_test" in tensors:
        xte, yte = tensors["x_test"].float(), _labels(tensors["y_test"], path, "y_test")
        if len(xte) != len(yte) or xte.shape[1:] != x.shape[1:]:
            raise UsageError(f"{path}: x_test is {tuple(xte.shape)} and y_test {tuple(yte.shape)}, which do not "
                             f"match each other or x's examples {tuple(x.shape[1:])}; write test tensors like x and y.")
    else:
        cut = int(0.8 * len(x))
        x, xte, y, yte = x[:cut], x[cut:], y[:cut], y[cut:]
    if not len(x):
        raise UsageError(f"{path} leaves no training examples (without x_test, 20 % of x is held out); write more rows.")
    num_classes = int(max(y.max().item(), yte.max().item() if len(yte) else 0)) + 1
    return Dataset(os.fspath(path), x, y, xte, yte, num_classes)


def _labels(t: torch.Tensor, path: Path, name: str) -> torch.Tensor:
    # Negative, fractional or N×1 labels were cast and passed on, to fail as an unexpected error in training.
    fractional = t.is_floating_point() and not torch.equal(t, t.trunc())
    if t.dim() != 1 or t.is_complex() or fractional or (len(t) and bool((t < 0).any())):
        raise UsageError(f"{path}: {name} must be one non-negative integer class label per row (shape N), got "
                         f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} values.")
    return t.long()


def _load_fortunes(spec: str, directory: str, part: str) -> Dataset:
    from wmark.text_data import FORTUNES_DIR, fortunes_texts, part_of, tokenize, tokenizer_identity

    if part and part not in ("owner", "attacker"):
        raise UsageError(f"Unknown split {part!r} in {spec!r}; use @owner or @attacker.")
    texts, labels, names = fortunes_texts(Path(directory) if directory else FORTUNES_DIR)
    parts = [part_of(t) for t in texts]
    train_parts = (part,) if part else ("owner", "attacker")
    train = [i for i, p in enumerate(parts) if p in train_parts]
    test = [i for i, p in enumerate(parts) if p == "test"]
    tr_texts, te_texts = tuple(texts[i] for i in train), tuple(texts[i] for i in test)
    y = torch.as_tensor(labels, dtype=torch.int64)
    return Dataset(spec, tokenize(tr_texts), y[train], tokenize(te_texts), y[test], len(names),
                   texts_train=tr_texts, texts_test=te_texts, class_names=names, tokenizer=tokenizer_identity())
