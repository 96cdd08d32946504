import gzip
import struct

import numpy as np
import pytest
import torch

from wmark.data import load_dataset
from wmark.errors import UsageError
from wmark.io import save_tensors


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for stem, shape, compress in [("train-images-idx3-ubyte", (20, 28, 28), True),
                                  ("train-labels-idx1-ubyte", (20,), True),
                                  ("t10k-images-idx3-ubyte", (5, 28, 28), False),
                                  ("t10k-labels-idx1-ubyte", (5,), False)]:
        array = rng.integers(0, 10 if len(shape) == 1 else 256, shape)
        _write_idx(tmp_path / (stem + (".gz" if compress else "")), array, compress)
    return tmp_path


def test_idx_files_load_gzipped_or_plain(idx_dir) -> None:
    ds = load_dataset(f"fashion-mnist:{idx_dir}")
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and 0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1
    assert ds.y_train.dtype == torch.int64 and ds.num_classes == 10


def test_truncated_idx_is_refused(idx_dir) -> None:
    path = idx_dir / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UsageError, match="truncated"):
        load_dataset(f"fashion-mnist:{idx_dir}")


def test_missing_directory_says_how_to_install(tmp_path) -> None:
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(f"fashion-mnist:{tmp_path / 'nowhere'}")


def test_owner_and_attacker_halves_are_disjoint_and_fixed() -> None:
    owner, attacker = load_dataset("digits@owner"), load_dataset("digits@attacker")
    assert len(owner.x_train) + len(attacker.x_train) == len(load_dataset("digits").x_train)
    flat_owner = {tuple(r.tolist()) for r in owner.x_train.flatten(1)}
    overlap = sum(tuple(r.tolist()) in flat_owner for r in attacker.x_train.flatten(1))
    full = load_dataset("digits").x_train.flatten(1)
    duplicates = len(full) - len({tuple(r.tolist()) for r in full})
    assert overlap <= duplicates
    assert torch.equal(load_dataset("digits@owner").x_train, owner.x_train)
    with pytest.raises(UsageError, match="@owner or @attacker"):
        load_dataset("digits@thief")


def test_safetensors_dataset(tmp_path) -> None:
    path = tmp_path / "d.safetensors"
    save_tensors({"x": torch.rand(10, 1, 4, 4), "y": torch.arange(10) % 3}, path)
    ds = load_dataset(str(path))
    assert len(ds.x_train) == 8 and len(ds.x_test) == 2 and ds.num_classes == 3
    save_tensors({"inputs": torch.rand(3)}, path)
    with pytest.raises(UsageError, match="'x' and 'y'"):
        load_dataset(str(path))


def test_unknown_spec() -> None:
    with pytest.raises(UsageError, match="Unknown dataset"):
        load_dataset("imagenet")


@pytest.mark.parametrize("tensors,match", [
    ({"x": torch.rand(0, 4), "y": torch.zeros(0, dtype=torch.int64)}, "no training examples"),
    ({"x": torch.rand(10, 4), "y": -torch.ones(10, dtype=torch.int64)}, "non-negative integer class label"),
    ({"x": torch.rand(10, 4), "y": torch.zeros(10, 1, dtype=torch.int64)}, r"per row \(shape N\), got \(10, 1\)"),
    ({"x": torch.rand(10, 4), "y": torch.full((10,), 0.7)}, "integer class label"),
    ({"x": torch.rand(10, 4), "y": torch.zeros(10, dtype=torch.int64), "x_test": torch.rand(3, 4)}, "only one of"),
    ({"x": torch.rand(10, 4), "y": torch.zeros(10, dtype=torch.int64), "x_test": torch.rand(3, 5),
      "y_test": torch.zeros(3, dtype=torch.int64)}, "x_test is"),
])
def test_unusable_safetensors_data_is_refused(tmp_path, tensors, match) -> None:
    """These failed in training as unexpected errors (or x_test was silently dropped) instead of one sentence."""
    path = tmp_path / "d.safetensors"
    save_tensors(tensors, path)
    with pytest.raises(UsageError, match=match):
        load_dataset(str(path))


def test_safetensors_labels_of_any_integer_dtype_load(tmp_path) -> None:
    path = tmp_path / "d.safetensors"
    save_tensors({"x": torch.rand(10, 4), "y": torch.tensor([0, 1] * 5, dtype=torch.bool),
                  "x_test": torch.rand(2, 4), "y_test": torch.tensor([2.0, 0.0])}, path)
    ds = load_dataset(str(path))
    assert ds.y_train.dtype == torch.int64 and ds.num_classes == 3 and len(ds.x_train) == 10


def test_digits_refuses_an_argument_it_would_ignore() -> None:
    """`digits:/some/dir` loaded the bundled digits, as if the directory had been read."""
    with pytest.raises(UsageError, match=r"^digits takes no argument \(got 'digits:/nonexistent'\); it is bundled"):
        load_dataset("digits:/nonexistent")


def test_a_data_file_under_a_path_holding_an_at_sign_loads_and_splits(tmp_path) -> None:
    """The first "@" was taken as the split, so a file in a directory named "a@b" was refused as split 'b/...'."""
    folder = tmp_path / "a@b"
    folder.mkdir()
    path = folder / "d.safetensors"
    save_tensors({"x": torch.rand(20, 1, 4, 4), "y": torch.arange(20) % 2}, path)
    assert len(load_dataset(str(path)).x_train) == 16
    assert len(load_dataset(f"{path}@owner").x_train) + len(load_dataset(f"{path}@attacker").x_train) == 16
    with pytest.raises(UsageError, match=r"^Unknown split 'nope' in "):
        load_dataset(f"{path}@nope")
    with pytest.raises(UsageError, match=r"^'digits@owner@owner' names two splits; give one, @owner or @attacker.$"):
        load_dataset("digits@owner@owner")
