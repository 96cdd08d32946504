"""Output files: unwritable paths are refused in one sentence that names them, before any work, leaving nothing."""

from __future__ import annotations

import dataclasses
import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from wmark import api
from wmark.cli import main
from wmark.errors import RuntimeFailure, UsageError
from wmark.io import atomic_write, atomic_writes, load_tensors
from wmark.keys import generate_key, load_key, save_key
from wmark.schemes.querylog import MarkLog


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stderr


def _deny_new_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only directory as a non-root user sees it (the tests run as root, which may write anywhere)."""
    def refuse(*_args: Any, **_kwargs: Any) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/.x.tmp")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def _must_not_run(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("the work ran before its output path was checked")


@pytest.fixture()
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "owner.key"
    save_key(generate_key(owner="Test Owner", num_classes=10, input_shape=(1, 8, 8), num_triggers=10), path)
    return path


# D1: permission errors name the real path, never a temporary file


def test_a_read_only_directory_names_the_file_not_a_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _deny_new_files(monkeypatch)
    with (pytest.raises(UsageError, match=rf"^Cannot write {tmp_path / 'k.key'}: permission denied; choose a writable"),
          atomic_write(tmp_path / "k.key")):
        pass


def test_keygen_into_a_read_only_directory_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _deny_new_files(monkeypatch)
    code, err = _cli("keygen", "--owner", "A", "--out", str(tmp_path / "k.key"))
    assert code == 2
    assert err == f"error: Cannot write {tmp_path / 'k.key'}: permission denied; choose a writable directory.\n"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_a_runtime_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with (pytest.raises(RuntimeFailure, match=rf"^Cannot write {tmp_path / 'out.bin'}: No space left on device"),
          atomic_write(tmp_path / "out.bin") as tmp):
        Path(tmp).write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_key_is_a_usage_error(key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*_args: Any, **_kwargs: Any) -> str:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(UsageError, match=rf"^Cannot read key file {key_file}: permission denied"):
        load_key(key_file)


def test_a_model_in_an_unsearchable_directory_is_a_usage_error(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*_args: Any, **_kwargs: Any) -> bool:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "is_file", denied)
    with pytest.raises(UsageError, match="^Cannot read model file .*m.safetensors: permission denied"):
        load_tensors(tmp_path / "m.safetensors")


# D2: every output path is checked before the work; files that belong together appear together


def test_train_into_a_missing_directory_stops_before_training(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "train", _must_not_run)
    code, err = _cli("train", "--arch", "fmnist-mlp", "--data", "digits", "--out", str(tmp_path / "no" / "m.st"))
    assert (code, err) == (2, f"error: Directory {tmp_path / 'no'} does not exist; create it first.\n")


def test_verify_api_checks_its_report_before_sending_a_query(key_file: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "verify_remote", _must_not_run)
    code, err = _cli("verify", "api", "--key", str(key_file), "--suspect", "http://127.0.0.1:9", "--budget", "10",
                     "--report", str(tmp_path / "no" / "r.html"))
    assert (code, err) == (2, f"error: Directory {tmp_path / 'no'} does not exist; create it first.\n")


def test_a_directory_where_the_report_twin_goes_is_refused_first(key_file: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rep.json").mkdir()
    monkeypatch.setattr(api, "verify", _must_not_run)
    code, err = _cli("verify", "file", "--key", str(key_file), "--arch", "fmnist-mlp", "--suspect",
                     str(tmp_path / "s.safetensors"), "--report", str(tmp_path / "rep.html"))
    assert (code, err) == (2, f"error: Cannot write {tmp_path / 'rep.json'}: it is a directory; give a file path.\n")
    assert not (tmp_path / "rep.html").exists()


def test_a_refused_option_is_named_before_its_path_is_checked(key_file: Path, tmp_path: Path) -> None:
    code, err = _cli("verify", "extraction", "--key", str(key_file), "--suspect", str(tmp_path / "s.safetensors"),
                     "--rule", str(tmp_path / "r.safetensors"), "--transcript", str(tmp_path / "no" / "t.sqlite"))
    assert code == 2
    assert "--transcript does not apply to a model-file suspect" in err


def test_files_written_together_appear_together_or_not_at_all(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.replace

    def second_fails(src: str, dst: Any) -> None:
        if str(dst).endswith(".json"):
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with (pytest.raises(UsageError, match="r.json: it is a directory"),
          atomic_writes(tmp_path / "r.html", tmp_path / "r.json") as tmps):
        for tmp in tmps:
            Path(tmp).write_text("x")
    assert list(tmp_path.iterdir()) == []
    # over an older pair, a failed second rename puts the older first file back: the old pair stays whole
    (tmp_path / "r.html").write_text("old page")
    (tmp_path / "r.json").write_text("old twin")
    with (pytest.raises(UsageError, match="r.json: it is a directory"),
          atomic_writes(tmp_path / "r.html", tmp_path / "r.json") as tmps):
        for tmp in tmps:
            Path(tmp).write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json"]
    assert (tmp_path / "r.html").read_text() == "old page" and (tmp_path / "r.json").read_text() == "old twin"


def test_ctrl_c_while_writing_exits_130_in_one_line_and_leaves_nothing(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import wmark.io

    def interrupted(_tensors: Any, tmp: str, **_kwargs: Any) -> None:
        Path(tmp).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(wmark.io, "save_file", interrupted)
    code, err = _cli("train", "--arch", "fmnist-mlp", "--data", "digits", "--epochs", "1", "--max-samples", "64",
                     "--out", str(tmp_path / "m.safetensors"))
    assert (code, err) == (130, "interrupted (Ctrl-C); no output was left half-written.\n")
    assert list(tmp_path.iterdir()) == []


# D3: a refused mark leaves no log behind, and never deletes one that was there


def test_a_refused_flip_log_for_a_text_key_leaves_no_file(tmp_path: Path) -> None:
    key = generate_key(owner="A", num_classes=4, input_shape=(1, 8, 8), num_triggers=10)
    text_key = dataclasses.replace(key, modality={"kind": "text"})
    with pytest.raises(UsageError, match="flip mark serves image classifiers"):
        MarkLog(tmp_path / "q.sqlite", key=text_key, rate=0.1, candidates=2)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_existing_log_is_kept(tmp_path: Path) -> None:
    owner = generate_key(owner="A", num_classes=4, input_shape=(1, 8, 8), num_triggers=10)
    other = generate_key(owner="B", num_classes=4, input_shape=(1, 8, 8), num_triggers=10)
    MarkLog(tmp_path / "q.sqlite", key=owner, rate=0.1, candidates=2).close()
    with pytest.raises(UsageError, match="another key"):
        MarkLog(tmp_path / "q.sqlite", key=other, rate=0.1, candidates=2)
    assert (tmp_path / "q.sqlite").is_file()


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    from wmark.io import save_model
    from wmark.models import build_model

    path = tmp_path / "m.safetensors"
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=(1, 8, 8)), path,
               metadata={"num_classes": 10, "input_shape": [1, 8, 8]})
    return path


@pytest.mark.parametrize(("extra", "message"), [
    (["--rate", "2"], "The marking rate must be in (0, 1), got 2.0."),
    (["--policy", "missing.json"], "missing.json"),
])
def test_serve_refused_before_serving_leaves_no_log(tmp_path: Path, key_file: Path, weights: Path, extra: list[str],
                                                    message: str) -> None:
    code, err = _cli("serve", "--name", "s", "--arch", "fmnist-mlp", "--weights", str(weights), "--mark", "flip",
                     "--key", str(key_file), "--log", str(tmp_path / "q.sqlite"), *extra)
    assert code == 2
    assert message in err
    assert not (tmp_path / "q.sqlite").exists()


def test_serve_refused_before_serving_leaves_no_alarm_log_or_state(tmp_path: Path, weights: Path) -> None:
    import json
    import socket

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": {"quota": {"total": 1000}}}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, err = _cli("serve", "--name", "s", "--arch", "fmnist-mlp", "--weights", str(weights),
                         "--port", str(busy.getsockname()[1]), "--policy", str(policy),
                         "--alarm-log", str(tmp_path / "alarms.jsonl"), "--monitor-state", str(tmp_path / "st.json"))
    assert code == 2 and err.count("\n") == 1
    assert not (tmp_path / "alarms.jsonl").exists() and not (tmp_path / "st.json").exists()
    (tmp_path / "bad-state.json").write_text("[]")
    code, err = _cli("serve", "--name", "s", "--arch", "fmnist-mlp", "--weights", str(weights), "--policy",
                     str(policy), "--alarm-log", str(tmp_path / "alarms.jsonl"), "--monitor-state",
                     str(tmp_path / "bad-state.json"))
    assert code == 2 and "is not a wmark state file" in err
    assert not (tmp_path / "alarms.jsonl").exists() and (tmp_path / "bad-state.json").read_text() == "[]"


def test_attack_extract_refused_before_querying_leaves_no_log(tmp_path: Path, key_file: Path, weights: Path) -> None:
    code, err = _cli("attack", "extract", "--victim-arch", "fmnist-mlp", "--victim", str(weights), "--arch",
                     "no-such-arch", "--data", "digits", "--out", str(tmp_path / "s.safetensors"), "--mark", "flip",
                     "--key", str(key_file), "--log", str(tmp_path / "q.sqlite"))
    assert code == 2 and "no-such-arch" in err
    assert not (tmp_path / "q.sqlite").exists()
