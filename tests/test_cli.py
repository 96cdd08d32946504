"""The command line end to end on scikit-learn's digits (seconds), plus every bad-input path."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from wmark.cli import main
from wmark.io import save_tensors


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A key, a base model and a marked model on digits, made through the CLI."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("cli")
    key, base, marked = d / "owner.key", d / "base.safetensors", d / "marked.safetensors"
    assert run("keygen", "--owner", "ACME Corp", "--out", str(key), "--input-shape", "1,8,8",
               "--triggers", "40")[0] == 0
    assert run("train", "--arch", "fmnist-cnn", "--data", "digits", "--epochs", "8", "--lr", "3e-3",
               "--out", str(base))[0] == 0
    code, out, _ = run("embed", "--key", str(key), "--arch", "fmnist-cnn", "--weights", str(base), "--data",
                       "digits", "--epochs", "15", "--lr", "3e-3", "--trigger-per-batch", "8", "--out", str(marked))
    assert code == 0, out
    return d


def test_keygen_prints_commitment_and_writes_private_file(tmp_path) -> None:
    path = tmp_path / "k.key"
    code, out, _ = run("keygen", "--owner", "ACME", "--out", str(path), "--json")
    doc = json.loads(out)
    assert code == 0 and len(doc["commitment"]) == 64 and "secret" not in doc
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    code, _, err = run("keygen", "--owner", "ACME", "--out", str(path))
    assert code == 2 and "refusing to overwrite" in err


def test_marked_model_verifies_and_metadata_has_no_secret(workdir) -> None:
    key_doc = json.loads((workdir / "owner.key").read_text())
    code, out, _ = run("verify", "file", "--key", str(workdir / "owner.key"), "--arch", "fmnist-cnn",
                       "--suspect", str(workdir / "marked.safetensors"), "--json")
    doc = json.loads(out)
    assert code == 0, out
    assert doc["decision"] == "detected" and doc["queries"] <= 20 and doc["alpha"] == 1e-6
    for field in ("log10_p", "p_value", "matches", "null", "kind"):
        assert field in doc
    assert key_doc["secret"] not in out
    code, out, _ = run("inspect", str(workdir / "marked.safetensors"))
    meta = json.loads(out)
    assert code == 0 and meta["format"] == "pt" and meta["schemes"] == ["trigger"]
    assert meta["commitment"] == key_doc["commitment"]
    assert key_doc["secret"] not in (workdir / "marked.safetensors").read_bytes().decode("latin-1")


def test_a_suspect_file_answers_on_the_named_device(workdir) -> None:
    args = ["verify", "file", "--key", str(workdir / "owner.key"), "--arch", "fmnist-cnn",
            "--suspect", str(workdir / "marked.safetensors"), "--json"]
    code, out, _ = run(*args, "--device", "cpu")
    assert code == 0 and json.loads(out)["decision"] == "detected"
    code, _, err = run(*args, "--device", "gpu0")
    assert code == 2 and "'gpu0' is not a device; use cpu, cuda" in err
    code, _, err = run(*args, "--with-scores")  # the trigger set reads labels: scores would change nothing
    assert code == 2 and "No such option '--with-scores'" in err
    code, _, err = run("verify", "file", "--key", str(workdir / "owner.key"), "--suspect",
                       str(workdir / "marked.safetensors"), "--whitebox", "--reference",
                       str(workdir / "marked.safetensors"), "--device", "cpu")
    assert code == 2 and err.strip() == ("error: --device does not apply to --whitebox (it reads weights, it asks "
                                         "no queries).")
    code, _, err = run("verify", "extraction", "--key", str(workdir / "owner.key"), "--suspect",
                       "http://127.0.0.1:9", "--rule", "r.safetensors", "--device", "cpu")
    assert code == 2 and err.strip() == "error: --device does not apply to an API suspect."


def test_base_model_is_not_detected_and_exit_code_is_1(workdir) -> None:
    code, out, _ = run("verify", "file", "--key", str(workdir / "owner.key"), "--arch", "fmnist-cnn",
                       "--suspect", str(workdir / "base.safetensors"), "--fixed")
    assert code == 1 and out.startswith("not_detected")


@pytest.mark.parametrize("kind,extra", [
    ("finetune", ["--data", "digits", "--epochs", "2"]),
    ("prune", ["--sparsity", "0.5", "--data", "digits"]),
    ("quantize", ["--bits", "8"]),
])
def test_attacks_write_copies_that_still_verify(workdir, kind, extra) -> None:
    out_path = workdir / f"{kind}.safetensors"
    code, out, _ = run("attack", kind, "--arch", "fmnist-cnn", "--weights", str(workdir / "marked.safetensors"),
                       "--out", str(out_path), *extra)
    assert code == 0, out
    assert json.loads(run("inspect", str(out_path))[1])["attack"]["kind"] == kind
    code, out, _ = run("verify", "file", "--key", str(workdir / "owner.key"), "--arch", "fmnist-cnn",
                       "--suspect", str(out_path))
    assert code == 0, out


def test_bad_inputs_give_one_sentence_and_exit_2(workdir, tmp_path) -> None:
    key, marked = str(workdir / "owner.key"), str(workdir / "marked.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 10)
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("{")
    other_key = tmp_path / "five.key"
    run("keygen", "--owner", "X", "--out", str(other_key), "--classes", "5", "--input-shape", "1,8,8")
    save_tensors({"fc9.weight": torch.ones(2)}, tmp_path / "alien.safetensors")
    cases = [
        (["verify", "file", "--key", str(tmp_path / "none.key"), "--arch", "fmnist-cnn", "--suspect", marked], "keygen"),
        (["verify", "file", "--key", str(bad_key), "--arch", "fmnist-cnn", "--suspect", marked], "not valid JSON"),
        (["verify", "file", "--key", key, "--arch", "fmnist-cnn", "--suspect", str(corrupt)], "not a readable safetensors"),
        (["verify", "file", "--key", str(other_key), "--arch", "fmnist-cnn", "--suspect", marked],
         "The key is for 5-class models but the weights in"),
        (["verify", "file", "--key", key, "--arch", "fmnist-cnn", "--suspect", str(tmp_path / "alien.safetensors")],
         "do not fit this architecture"),
        (["verify", "file", "--key", key, "--arch", "resnet-9000", "--suspect", marked], "Unknown architecture"),
        (["train", "--arch", "fmnist-cnn", "--data", f"fashion-mnist:{tmp_path}/nowhere", "--out",
          str(tmp_path / "o.safetensors")], "apt-get install dataset-fashion-mnist"),
        (["embed", "--key", str(other_key), "--arch", "fmnist-cnn", "--weights", marked, "--data", "digits",
          "--out", str(tmp_path / "o.safetensors")], "a key for 10 classes"),
    ]
    for args, message in cases:
        code, out, err = run(*args)
        assert code == 2, (args, out, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_nan_model_is_a_runtime_error_without_traceback(workdir, tmp_path) -> None:
    from wmark.io import load_tensors

    tensors, _meta = load_tensors(workdir / "marked.safetensors")
    tensors["fc2.bias"] = torch.full_like(tensors["fc2.bias"], float("nan"))
    save_tensors(tensors, tmp_path / "nan.safetensors", metadata={})
    proc = subprocess.run([sys.executable, "-m", "wmark.cli", "verify", "file", "--key", str(workdir / "owner.key"),
                           "--arch", "fmnist-cnn", "--suspect", str(tmp_path / "nan.safetensors")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 3 and "NaN" in proc.stderr and "Traceback" not in proc.stderr


def test_help_documents_exit_codes() -> None:
    code, out, _ = run("verify", "file", "--help")
    assert code == 0 and "not detected" in out and "usage error" in out


def test_every_command_help_renders_and_says_what_each_option_does() -> None:
    """--epochs, --lr, --seed, --batch-size and --layers of train, embed and the attacks showed only a default."""
    import click

    def walk(cmd: click.Command, path: list[str]):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    for path, cmd in walk(main, []):
        code, out, _ = run(*path, "--help")
        assert code == 0 and "Usage:" in out, path
        assert [p.name for p in cmd.params if isinstance(p, click.Option) and not p.help] == [], path


def test_each_verify_workflow_lists_and_takes_only_its_own_options(workdir) -> None:
    key, marked = str(workdir / "owner.key"), str(workdir / "marked.safetensors")
    helps = {name: run("verify", name, "--help")[1] for name in ("file", "api", "extraction")}
    assert "--transcript" not in helps["file"] and "--log" not in helps["file"] and "--whitebox" in helps["file"]
    assert "--arch" not in helps["api"] and "--whitebox" not in helps["api"] and "--transcript" in helps["api"]
    assert "--rule" in helps["extraction"] and "--whitebox" not in helps["extraction"]
    for name in ("file", "api", "extraction"):
        assert "--mode " not in helps[name] and "--api-key" not in helps[name] and "--served-arch" not in helps[name]
    code, _, err = run("verify", "file", "--key", key, "--suspect", marked, "--arch", "fmnist-cnn", "--transcript", "t")
    assert code == 2 and "No such option '--transcript'" in err
    code, _, err = run("verify", "file", "--key", key, "--suspect", marked, "--whitebox", "--reference", marked,
                       "--budget", "5")
    assert code == 2 and err.strip() == ("error: --budget does not apply to --whitebox (it reads weights, it asks no "
                                         "queries).")
    code, _, err = run("verify", "file", "--key", key, "--suspect", marked, "--arch", "fmnist-cnn", "--anchor", marked)
    assert code == 2 and err.strip() == "error: --anchor does not apply without --whitebox."
    code, _, err = run("verify", "api", "--key", key, "--suspect", marked)
    assert code == 2 and "not an http(s) URL; for a model file use `wmark verify file`" in err
    code, out, _ = run("verify", "file", "--key", key, "--suspect", marked, "--arch", "fmnist-cnn", "--fixed",
                       "--budget", "30", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["queries"] == 30 and doc["tests"][0]["details"]["mode"] == "fixed"
