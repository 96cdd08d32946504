import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from wmark.errors import UsageError
from wmark.io import atomic_write, load_tensors, read_metadata, save_tensors, tensors_digest, wmark_metadata


def test_metadata_is_namespaced_and_json_encoded(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    save_tensors({"w": torch.arange(4.0)}, path, metadata={"scheme": "trigger", "n": 5, "wmark.arch": "x"})
    raw = read_metadata(path)
    assert raw["format"] == "pt"
    assert set(raw) == {"format", "wmark.scheme", "wmark.n", "wmark.arch"}
    assert wmark_metadata(raw) == {"scheme": "trigger", "n": 5, "arch": "x"}
    tensors, _ = load_tensors(path)
    assert torch.equal(tensors["w"], torch.arange(4.0))


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down (``1 == 1.0 == True`` would pass a plain ``==``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


ROUND_TRIP = [
    # strings that read as JSON came back as numbers, bools, None, lists and dicts
    "2024", "true", "false", "null", "[1]", "{}", '{"a": 1}', '"quoted"', " 5 ", "1e5", "-0", "NaN", "Infinity",
    # strings that do not, and other values
    "trigger", "", "ACME Corp 2026", "{not json", "[1,", "ünïcode ✓", "[" * 100_000,
    0, 2024, -7, 2**70, 0.5, -0.0, 1e300, float("inf"), float("nan"), True, False, None,
    [], [1, 1.0, True, None, "2024", "x"], {"n": 1, "s": "1", "b": [False, "false"], "d": {"f": 0.0, "z": None}},
]


@pytest.mark.parametrize("value", ROUND_TRIP, ids=lambda v: repr(v)[:30])
def test_metadata_values_come_back_as_the_same_value_and_type(tmp_path, value) -> None:
    path = tmp_path / "m.safetensors"
    save_tensors({"w": torch.zeros(1)}, path, metadata={"v": value})
    back = wmark_metadata(read_metadata(path))["v"]
    assert _same(back, value), (value, back)


@pytest.mark.parametrize(("raw", "decoded"), [
    ("trigger", "trigger"), ("5", 5), ("[\"trigger\"]", ["trigger"]), ("{\"c\": 2}", {"c": 2}), ("true", True),
    ("2024", 2024),  # bare, as the old writer left a string that reads as JSON: it decodes as it always did
])
def test_metadata_written_before_quoting_decodes_as_before(raw: str, decoded: object) -> None:
    assert _same(wmark_metadata({"wmark.v": raw, "format": "pt"}), {"v": decoded})


def test_a_plain_string_is_stored_as_it_is_for_other_tools(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    save_tensors({"w": torch.zeros(1)}, path, metadata={"owner": "ACME", "year": "2024"})
    raw = read_metadata(path)
    assert (raw["wmark.owner"], raw["wmark.year"]) == ("ACME", '"2024"')


def test_atomic_write_leaves_nothing_on_failure(tmp_path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        Path(tmp).write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_respect_the_umask(tmp_path) -> None:
    # the temporary file was chmod-ed to 0644 outright: a report written under umask 077 came out world-readable
    old = os.umask(0o077)
    try:
        with atomic_write(tmp_path / "r.json") as tmp:
            Path(tmp).write_text("{}")
        with atomic_write(tmp_path / "k.key", mode=0o600) as tmp:
            Path(tmp).write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode) == 0o600
    os.umask(0o022)
    try:
        with atomic_write(tmp_path / "r.json") as tmp:
            Path(tmp).write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o644


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an open file through /proc")
def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch) -> None:
    # nothing was fsync-ed: after a power cut a just-written key could be an empty file under its final name
    synced: list[tuple[str, bool]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.path.realpath(f"/proc/self/fd/{fd}"), (tmp_path / "k.key").exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_write(tmp_path / "k.key", mode=0o600) as tmp:
        Path(tmp).write_text("secret")
    assert (os.path.realpath(tmp), False) in synced
    assert (os.path.realpath(tmp_path), True) in synced


def test_a_file_name_near_the_length_limit_is_written(tmp_path) -> None:
    # the temporary name (".NAME.xxxxxxxx.tmp") outgrew 255 bytes: "File name too long; free space or choose another
    # directory" for a name the file system takes
    target = tmp_path / ("é" * 120 + ".key")
    with atomic_write(target, mode=0o600) as tmp:
        Path(tmp).write_text("{}")
    with atomic_write(target, mode=0o600) as tmp:  # over an existing file too (its backup link has such a name)
        Path(tmp).write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_corrupt_and_truncated_files_are_refused(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    save_tensors({"w": torch.ones(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        load_tensors(path)
    path.write_bytes(b"garbage")
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        read_metadata(path)
    with pytest.raises(UsageError, match="does not exist"):
        load_tensors(tmp_path / "nope.safetensors")


def test_digest_is_canonical() -> None:
    a = {"b": torch.ones(2), "a": torch.zeros(3)}
    b = {"a": torch.zeros(3), "b": torch.ones(2)}
    assert tensors_digest(a, {"x": "1", "y": "2"}) == tensors_digest(b, {"y": "2", "x": "1"})
    assert tensors_digest(a) != tensors_digest({"a": torch.zeros(3), "b": torch.ones(2).half()})


def test_digest_reads_zero_dim_tensors() -> None:
    # BatchNorm's num_batches_tracked is a 0-dim int64 buffer; it must count like any other tensor
    a = {"n": torch.tensor(3), "w": torch.ones(2)}
    assert tensors_digest(a) != tensors_digest({"n": torch.tensor(4), "w": torch.ones(2)})
    assert tensors_digest(a) == tensors_digest({"w": torch.ones(2), "n": torch.tensor(3)})


def test_tied_and_overlapping_tensors_are_saved_under_every_name(tmp_path) -> None:
    # a head tied to its embedding crashed save_model with safetensors' "Some tensors share memory"
    from wmark.io import save_model

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    save_model(model, tmp_path / "tied.safetensors")
    tensors, _ = load_tensors(tmp_path / "tied.safetensors")
    assert set(tensors) == {"0.weight", "1.weight"}
    assert torch.equal(tensors["0.weight"], tensors["1.weight"]) and torch.equal(tensors["1.weight"], model[1].weight)
    fused = torch.randn(12, 4)
    save_tensors({"fused": fused, "q": fused[:4], "k": fused[4:8]}, tmp_path / "views.safetensors")
    tensors, _ = load_tensors(tmp_path / "views.safetensors")
    assert torch.equal(tensors["fused"], fused) and torch.equal(tensors["k"], fused[4:8])


def test_metadata_as_stored_is_copied_verbatim(tmp_path) -> None:
    # load_tensors gives the stored text; saving it again (the paired verbs) must not quote it a second time, or a
    # copied file's JSON values (a weights plan, a key commitment list) come back as strings
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    values = {"plan": {"layer": "fc1.weight", "bits": 256}, "year": "2024", "owner": "ACME", "n": 3}
    save_tensors({"w": torch.zeros(1)}, first, metadata=values)
    tensors, stored = load_tensors(first)
    save_tensors(tensors, second, metadata=stored)
    assert read_metadata(second) == read_metadata(first)
    assert _same(wmark_metadata(read_metadata(second)), values)
