"""Bad input found by a sweep: an open key file, impossible keygen values, a missing data file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from wmark.cli import main
from wmark.data import load_dataset
from wmark.errors import UsageError
from wmark.keys import ALLOW_OPEN_KEY_ENV, generate_key, load_key, save_key


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stderr


@pytest.fixture()
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "owner.key"
    save_key(generate_key(owner="Test Owner", num_classes=10, input_shape=(1, 8, 8), num_triggers=10), path)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused(key_file: Path, mode: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_OPEN_KEY_ENV, raising=False)
    key_file.chmod(mode)
    with pytest.raises(UsageError, match=rf"accessible by other users \(mode {mode:04o}\); restrict it with "
                                         rf"`chmod 600 {key_file}`"):
        load_key(key_file)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_key_file_loads(key_file: Path, mode: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_OPEN_KEY_ENV, raising=False)
    key_file.chmod(mode)
    assert load_key(key_file).owner == "Test Owner"


def test_the_escape_hatch_reads_an_open_key(key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file.chmod(0o644)
    monkeypatch.setenv(ALLOW_OPEN_KEY_ENV, "1")
    assert load_key(key_file).owner == "Test Owner"
    monkeypatch.setenv(ALLOW_OPEN_KEY_ENV, "yes")
    with pytest.raises(UsageError, match="chmod 600"):
        load_key(key_file)


def test_an_open_key_file_stops_the_cli_with_exit_2(key_file: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_OPEN_KEY_ENV, raising=False)
    key_file.chmod(0o644)
    code, err = _cli("verify", "file", "--key", str(key_file), "--arch", "fmnist-mlp", "--suspect",
                     str(tmp_path / "any.safetensors"))
    assert code == 2
    assert err.strip() == (f"error: Key file {key_file} is accessible by other users (mode 0644); restrict it with "
                           f"`chmod 600 {key_file}` (or set {ALLOW_OPEN_KEY_ENV}=1 for read-only media).")


def test_keygen_writes_a_private_key(tmp_path: Path) -> None:
    out = tmp_path / "k.key"
    code, _ = _cli("keygen", "--owner", "ACME", "--out", str(out), "--input-shape", "3,32,32")
    assert code == 0 and (os.name != "posix" or out.stat().st_mode & 0o777 == 0o600)
    assert load_key(out).input_shape == (3, 32, 32)


@pytest.mark.parametrize(("args", "message"), [
    (["--input-shape", "0,0,0"], "Input shape 0,0,0 must be 1 to 4 positive sizes, e.g. 1,28,28."),
    (["--input-shape", "1,-28,28"], "Input shape 1,-28,28 must be 1 to 4 positive sizes"),
    (["--input-shape", "1,2,3,4,5"], "Input shape 1,2,3,4,5 must be 1 to 4 positive sizes"),
    (["--input-shape", "a,b"], "--input-shape 'a,b' is not a comma-separated list of sizes, e.g. 1,28,28."),
    (["--input-shape", ""], "--input-shape '' is not a comma-separated list of sizes"),
    (["--classes", "1"], "A key needs at least 2 classes, got 1."),
    (["--classes", "-3"], "A key needs at least 2 classes, got -3."),
    (["--triggers", "0"], "A key needs at least one trigger, got 0."),
    (["--triggers", "-2", "--message", "ACME 2026"], "A key needs at least one trigger, got -2."),
    (["--max-length", "32"], "--max-length does not apply to an image key (give --modality text for a text key)."),
    (["--modality", "text", "--tokenizer", "all-MiniLM-L6-v2", "--input-shape", "1,8,8"],
     "--input-shape does not apply to a text key (its inputs are token sequences of at most --max-length)."),
])
def test_bad_keygen_values_exit_2_with_one_sentence(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "k.key"
    code, err = _cli("keygen", "--owner", "ACME", "--out", str(out), *args)
    assert code == 2
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "unexpected" not in err
    assert not out.exists()


def test_keygen_onto_an_existing_key_names_the_cli_option(tmp_path: Path) -> None:
    out = tmp_path / "k.key"
    assert _cli("keygen", "--owner", "ACME", "--out", str(out))[0] == 0
    before = out.read_text()
    code, err = _cli("keygen", "--owner", "ACME", "--out", str(out))
    assert code == 2 and err == (f"error: {out} already exists; refusing to overwrite a key (`--force`, or "
                                 "overwrite=True in Python, replaces it).\n")
    assert out.read_text() == before
    assert _cli("keygen", "--owner", "ACME", "--out", str(out), "--force")[0] == 0 and out.read_text() != before


def test_no_command_writes_over_a_key_file(tmp_path: Path) -> None:
    key = tmp_path / "owner.key"
    assert _cli("keygen", "--owner", "ACME", "--out", str(key), "--input-shape", "1,8,8")[0] == 0
    model = tmp_path / "m.safetensors"
    assert _cli("train", "--arch", "fmnist-mlp", "--data", "digits", "--epochs", "1", "--max-samples", "64",
                "--out", str(model))[0] == 0
    secret = key.read_text()
    code, err = _cli("attack", "noise", "--arch", "fmnist-mlp", "--weights", str(model), "--out", str(key))
    assert code == 2 and err == (f"error: {key} is a wmark key file; writing there would destroy its secret, so "
                                 "choose another path.\n")
    code, err = _cli("verify", "file", "--key", str(key), "--arch", "fmnist-mlp", "--suspect", str(model),
                     "--report", str(key))
    assert code == 2 and "is a wmark key file" in err
    assert key.read_text() == secret


def test_a_missing_data_file_is_named_as_data(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(UsageError, match=rf"^Data file not found: {missing};"):
        load_dataset(str(missing))
    code, err = _cli("train", "--arch", "fmnist-mlp", "--data", str(missing), "--out", str(tmp_path / "m.safetensors"))
    assert code == 2 and err.startswith(f"error: Data file not found: {missing}") and "Model file" not in err


@pytest.mark.parametrize(("meta", "message"), [
    ({"num_classes": "ten", "input_shape": [1, 8, 8]}, r"records an unreadable wmark.num_classes \('ten'\)"),
    ({"num_classes": 1, "input_shape": [1, 8, 8]}, r"records an unreadable wmark.num_classes \(1\)"),
    ({"num_classes": 10, "input_shape": ["a"]}, r"records an unreadable wmark.input_shape \(\['a'\]\)"),
])
def test_a_model_file_with_unreadable_sizes_is_refused(tmp_path: Path, meta: dict, message: str) -> None:
    from wmark.io import save_model
    from wmark.models import build_model, load_model

    path = tmp_path / "m.safetensors"
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=(1, 8, 8)), path, metadata=meta)
    with pytest.raises(UsageError, match=message):
        load_model("fmnist-mlp", path)
    # verification sizes the suspect by the key: a suspect's unreadable metadata cannot block it
    key = tmp_path / "k.key"
    save_key(generate_key(owner="o", num_classes=10, input_shape=(1, 8, 8), num_triggers=10), key)
    code, err = _cli("verify", "file", "--key", str(key), "--arch", "fmnist-mlp", "--suspect", str(path))
    assert code == 1 and err == ""


def test_a_key_of_the_other_kind_than_the_architecture_names_the_key_to_use(tmp_path: Path) -> None:
    from textkit import text_key

    from wmark.io import save_model
    from wmark.models import build_model

    image_key, txt_key = tmp_path / "image.key", tmp_path / "text.key"
    save_key(generate_key(owner="o", num_classes=8, input_shape=(64,), num_triggers=10), image_key)
    save_key(text_key(num_classes=8, max_length=64), txt_key)
    bow, mlp = tmp_path / "bow.safetensors", tmp_path / "mlp.safetensors"
    save_model(build_model("text-bow", num_classes=8, input_shape=(64,)), bow,
               metadata={"num_classes": 8, "input_shape": [64]})
    save_model(build_model("fmnist-mlp", num_classes=8, input_shape=(1, 8, 8)), mlp,
               metadata={"num_classes": 8, "input_shape": [1, 8, 8]})
    code, err = _cli("verify", "file", "--key", str(image_key), "--arch", "text-bow", "--suspect", str(bow))
    assert code == 2 and err == ("error: text-bow is a text model but the key is an image key; use a text key made "
                                 "for it (`wmark keygen --modality text`).\n")
    code, err = _cli("verify", "file", "--key", str(txt_key), "--arch", "fmnist-mlp", "--suspect", str(mlp))
    assert code == 2 and err == "error: fmnist-mlp takes images but the key is a text key; use an image key made for it.\n"


def _digits_suspect(path: Path, *, classes: int, meta: dict) -> None:
    from wmark.io import save_model
    from wmark.models import build_model

    save_model(build_model("fmnist-mlp", num_classes=classes, input_shape=(1, 8, 8), seed=0), path, metadata=meta)


_CLASSES_NOTE = ("records {shown} classes (wmark.num_classes) while the key is for 10-class models; it was verified "
                 "anyway, as the 10-class model its weights fit.")
_SHAPE_NOTE = ("records inputs shaped {shown} (wmark.input_shape) while the key's are (1, 8, 8); it was verified "
               "anyway, on the key's inputs.")


@pytest.mark.parametrize(("meta", "note"), [
    ({"arch": "fmnist-mlp", "num_classes": 3, "input_shape": [1, 8, 8]}, _CLASSES_NOTE.format(shown="3")),
    ({"num_classes": "ten\x1b[2J"}, _CLASSES_NOTE.format(shown=r"'ten\x1b[2J'")),
    ({"num_classes": 10, "input_shape": [3, 32, 32]}, _SHAPE_NOTE.format(shown="[3, 32, 32]")),
    ({"num_classes": 10, "input_shape": "big\x07"}, _SHAPE_NOTE.format(shown=r"'big\x07'")),
    # not a list of plain ints, so not the key's (1, 8, 8), however it reads; infinity must not stop the verdict
    ({"num_classes": 10, "input_shape": [float("inf"), 8, 8]}, _SHAPE_NOTE.format(shown="[inf, 8, 8]")),
    ({"num_classes": 10, "input_shape": [1.9, 8.7, 8.2]}, _SHAPE_NOTE.format(shown="[1.9, 8.7, 8.2]")),
    ({"num_classes": 10, "input_shape": "188"}, _SHAPE_NOTE.format(shown="188")),
    ({"num_classes": 10, "input_shape": [True, 8, 8]}, _SHAPE_NOTE.format(shown="[True, 8, 8]")),
    ({"num_classes": 10, "input_shape": [1, 8, 8]}, None),
])
def test_a_suspect_whose_file_records_another_class_count_or_shape_is_verified_with_a_note(
        key_file: Path, tmp_path: Path, meta: dict, note: str | None) -> None:
    """A thief who writes another class count or input shape into a stolen file cannot block `verify file`; the
    verdict says what the file records (nothing when it agrees with the key)."""
    import json

    suspect = tmp_path / "stolen.safetensors"
    _digits_suspect(suspect, classes=10, meta=meta)
    result = CliRunner().invoke(main, ["verify", "file", "--key", str(key_file), "--arch", "fmnist-mlp",
                                       "--suspect", str(suspect), "--json"])
    assert result.exit_code in (0, 1) and result.stderr == "", result.output
    assert json.loads(result.stdout)["message"] == ("" if note is None else f"The model file {suspect} {note}")


@pytest.mark.parametrize("name", ["wmark.num_classes", "wmark.modality", "wmark.notes"])
def test_a_suspect_whose_metadata_nests_too_deep_for_json_is_still_verified(
        key_file: Path, tmp_path: Path, name: str) -> None:
    """Metadata the JSON parser cannot follow (it recurses) is the thief's to write: it must not stop `verify file`."""
    from safetensors.torch import load_file, save_file

    from wmark.io import save_model, wmark_metadata
    from wmark.models import build_model

    deep = "[" * 100_000 + "]" * 100_000
    assert wmark_metadata({name: deep}) == {name.removeprefix("wmark."): deep}  # kept as written, as other non-JSON
    suspect = tmp_path / "stolen.safetensors"
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=(1, 8, 8), seed=0), suspect)
    save_file(load_file(str(suspect)), str(suspect), metadata={"wmark.num_classes": "10", name: deep})
    result = CliRunner().invoke(main, ["verify", "file", "--key", str(key_file), "--arch", "fmnist-mlp",
                                       "--suspect", str(suspect), "--budget", "5"])
    assert result.exit_code in (0, 1) and result.stderr == "", result.output


@pytest.mark.parametrize("meta", [{"num_classes": 10}, {"num_classes": 3}, {}])
def test_a_suspect_whose_output_layer_has_other_classes_is_refused_in_one_sentence(
        key_file: Path, tmp_path: Path, meta: dict) -> None:
    # whatever the file records (the key's count, the weights' or nothing), the weights decide
    suspect = tmp_path / "three.safetensors"
    _digits_suspect(suspect, classes=3, meta=meta)
    code, err = _cli("verify", "file", "--key", str(key_file), "--arch", "fmnist-mlp", "--suspect", str(suspect))
    assert code == 2 and err == (f"error: The key is for 10-class models but the weights in {suspect} are for 3 "
                                 "classes; use the key made for this model.\n")


def five_logits(*, num_classes: int, input_shape: tuple[int, ...]) -> torch.nn.Module:
    """An architecture that answers over 5 classes whatever it is asked to build (a factory for --arch)."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))


def test_a_suspect_whose_forward_answers_over_other_classes_is_refused_in_one_sentence(
        key_file: Path, tmp_path: Path) -> None:
    from wmark.io import save_model

    suspect = tmp_path / "five.safetensors"
    save_model(five_logits(num_classes=10, input_shape=(1, 8, 8)), suspect, metadata={"num_classes": 10})
    code, err = _cli("verify", "file", "--key", str(key_file), "--arch", f"{__name__}:five_logits",
                     "--suspect", str(suspect))
    assert code == 2 and err == ("error: The key is for 10-class models but the suspect answers over 5 classes; use "
                                 "the key made for this model.\n")


_BAD_SCHEDULES = [
    (["--lr", "nan"], "The learning rate must be a positive finite number, got nan."),
    (["--lr", "-1"], "The learning rate must be a positive finite number, got -1.0."),
    (["--lr", "inf"], "The learning rate must be a positive finite number, got inf."),
    (["--epochs", "0"], "Training needs at least 1 epoch, got 0."),
    (["--max-samples", "0"], "The training-sample limit (max_samples) must be at least 1, got 0."),
    (["--max-samples", "-5"], "The training-sample limit (max_samples) must be at least 1, got -5."),
]
_EXTRACT_ONLY = [
    (["--until-accuracy", "nan"], "The accuracy target is a fraction in [0, 1], got nan."),
    (["--until-accuracy", "2"], "The accuracy target is a fraction in [0, 1], got 2.0."),
]


@pytest.mark.parametrize(("command", "args", "message"), [
    *((command, args, message) for command in ("train", "embed", "finetune") for args, message in _BAD_SCHEDULES),
    # extract takes --queries, not a sample limit, and alone takes an accuracy target
    *(("extract", args, message) for args, message in _BAD_SCHEDULES + _EXTRACT_ONLY if args[0] != "--max-samples"),
])
def test_a_training_setting_no_run_can_use_exits_2_and_writes_nothing(
        key_file: Path, tmp_path: Path, command: str, args: list[str], message: str) -> None:
    """Zero epochs used to write the untouched model as trained, a negative sample limit to drop the last samples,
    a bad learning rate or batch size to fail inside PyTorch with exit 3, and an accuracy target no thief can
    reach to train to the epoch cap without a word."""
    from wmark.io import save_model
    from wmark.models import build_model

    model, out = tmp_path / "m.safetensors", tmp_path / "out.safetensors"
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=(1, 8, 8)), model,
               metadata={"num_classes": 10, "input_shape": [1, 8, 8]})
    base = {"train": ["train", "--arch", "fmnist-mlp", "--data", "digits"],
            "embed": ["embed", "--key", str(key_file), "--arch", "fmnist-mlp", "--weights", str(model), "--data",
                      "digits"],
            "finetune": ["attack", "finetune", "--arch", "fmnist-mlp", "--weights", str(model), "--data", "digits"],
            "extract": ["attack", "extract", "--victim-arch", "fmnist-mlp", "--victim", str(model), "--arch",
                        "fmnist-mlp", "--data", "digits", "--queries", "32"]}[command]
    code, err = _cli(*base, "--out", str(out), *args)
    assert (code, err) == (2, f"error: {message}\n")
    assert not out.exists()


@pytest.mark.parametrize("scheme", ["", ",", " , "])
def test_embed_with_no_scheme_exits_2_instead_of_writing_an_unmarked_model(key_file: Path, tmp_path: Path,
                                                                           scheme: str) -> None:
    """`--scheme ""` ran the unmarked baseline fine-tune and printed 'wrote OUT' as if the model were marked."""
    from wmark.io import save_model
    from wmark.models import build_model

    model, out = tmp_path / "m.safetensors", tmp_path / "out.safetensors"
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=(1, 8, 8)), model)
    code, err = _cli("embed", "--key", str(key_file), "--arch", "fmnist-mlp", "--weights", str(model), "--data",
                     "digits", "--scheme", scheme, "--out", str(out))
    assert code == 2
    assert err == f"error: --scheme {scheme!r} names no scheme; give trigger, weights or both, comma-separated.\n"
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["verify", "extraction", "--key", "{key}", "--suspect", "{model}", "--arch", "fmnist-mlp", "--rule", "{missing}"],
     "Tie-break rule {missing} does not exist; build one with `wmark tiebreak build`."),
    (["serve", "--name", "m", "--arch", "fmnist-mlp", "--weights", "{model}", "--monitor", "{missing}"],
     "Monitor profile {missing} does not exist; write one with `wmark monitor calibrate`."),
    (["monitor", "calibrate", "--arch", "fmnist-mlp", "--weights", "{model}", "--data", "digits", "--streams",
      "{missing}", "--out", "{out}"],
     "Stream file {missing} does not exist; give a .safetensors file with tensors x and stream."),
])
def test_a_missing_rule_profile_or_stream_file_is_named_for_what_it_is(key_file: Path, tmp_path: Path,
                                                                       args: list[str], message: str) -> None:
    """Each was refused as 'Model file PATH does not exist.', naming neither what the file is nor how to make it."""
    from wmark.io import save_model
    from wmark.models import build_model

    paths = {"key": key_file, "model": tmp_path / "m.safetensors", "missing": tmp_path / "nope.safetensors",
             "out": tmp_path / "out.safetensors"}
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=(1, 8, 8)), paths["model"],
               metadata={"num_classes": 10, "input_shape": [1, 8, 8]})
    code, err = _cli(*(a.format(**paths) for a in args))
    assert (code, err) == (2, f"error: {message.format(**paths)}\n")
    assert not paths["out"].exists()


def test_a_batch_size_below_1_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    code, err = _cli("train", "--arch", "fmnist-mlp", "--data", "digits", "--batch-size", "0", "--out", str(out))
    assert (code, err) == (2, "error: The batch size must be at least 1, got 0.\n") and not out.exists()


def test_a_cnn_on_images_too_small_to_pool_twice_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    """A 1×2×2 image failed in the CNN's forward with 'unexpected RuntimeError' (exit 3)."""
    from wmark.io import save_tensors

    data, out = tmp_path / "d.safetensors", tmp_path / "m.safetensors"
    save_tensors({"x": torch.rand(10, 1, 2, 2), "y": torch.arange(10) % 2}, data)
    result = CliRunner().invoke(main, ["train", "--arch", "fmnist-cnn", "--data", str(data), "--out", str(out),
                                       "--epochs", "1"])
    assert result.exit_code == 2 and "at least 4×4 pixels" in result.output and "unexpected" not in result.output
    assert not out.exists()


def hf_text_classifier(*, num_classes: int, input_shape: tuple[int, ...]) -> torch.nn.Module:
    """A Hugging Face text classifier, whatever input shape it is asked for (a factory for --arch)."""
    from textkit import hf_bert

    return hf_bert(num_classes)


def test_a_hugging_face_text_model_asked_with_an_image_key_names_the_key_to_use(key_file: Path, tmp_path: Path) -> None:
    """Given the key's images as its token ids, a BertForSequenceClassification failed with 'unexpected ValueError: too
    many values to unpack' (exit 3)."""
    from wmark.io import save_model

    suspect, report = tmp_path / "bert.safetensors", tmp_path / "r.html"
    save_model(hf_text_classifier(num_classes=10, input_shape=(1, 8, 8)), suspect, metadata={"num_classes": 10})
    code, err = _cli("verify", "file", "--key", str(key_file), "--arch", f"{__name__}:hf_text_classifier",
                     "--suspect", str(suspect), "--report", str(report))
    assert (code, err) == (2, (f"error: The suspect {suspect}'s forward takes input_ids, so it is a text model, but it is "
                              "asked images; verify it with a text key (`wmark keygen --modality text`).\n"))
    assert not report.exists()


def short_vocabulary_bow(*, num_classes: int, input_shape: tuple[int, ...]) -> torch.nn.Module:
    """A bag of words over the first 30000 of MiniLM's 30522 token ids (a factory for --arch)."""
    from wmark.text_models import BagOfWords

    return BagOfWords(num_classes=num_classes, vocab_size=30000)


def test_a_text_model_with_a_smaller_vocabulary_than_the_keys_tokenizer_is_refused_in_one_sentence(
        tmp_path: Path) -> None:
    """A trigger word past the model's vocabulary failed with 'unexpected IndexError: index out of range in self'
    (exit 3), and a served endpoint answered such a word with HTTP 500; the model is refused before any query."""
    from textkit import text_key

    from wmark.io import save_model
    from wmark.serve import build_app
    from wmark.text import TextInputs

    key, suspect, report = tmp_path / "text.key", tmp_path / "bow.safetensors", tmp_path / "r.html"
    save_key(text_key(num_classes=4, max_length=32), key)
    model = short_vocabulary_bow(num_classes=4, input_shape=(32,))
    save_model(model, suspect, metadata={"num_classes": 4, "input_shape": [32]})
    sentence = ("cannot take every token id of the tokenizer it is asked through: it embeds 30000 tokens but the "
                "tokenizer makes 30522; use a key made with the tokenizer the model was trained with.")
    code, err = _cli("verify", "file", "--key", str(key), "--arch", f"{__name__}:short_vocabulary_bow",
                     "--suspect", str(suspect), "--report", str(report))
    assert (code, err) == (2, f"error: The suspect {suspect} {sentence}\n") and not report.exists()
    with pytest.raises(UsageError, match=r"it embeds 30000 tokens but the tokenizer makes 30522"):
        build_app(model=model, name="m", num_classes=4, input_shape=(32,), text=TextInputs.from_key(load_key(key)))


class _UnnamedTable(torch.nn.Module):
    """A text model with no get_input_embeddings(): its vocabulary shows only by running it."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(30000, 8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(input_ids).mean(1))


def test_a_text_model_that_names_no_embedding_table_is_probed_with_the_tokenizers_largest_id() -> None:
    from textkit import text_key

    from wmark.suspects import LocalSuspect
    from wmark.text import TextInputs

    with pytest.raises(UsageError, match=r"^The suspect local model cannot take every token id of the tokenizer it is "
                                         r"asked through \(IndexError: index out of range in self\): its vocabulary is "
                                         r"smaller than the tokenizer's 30522 tokens; use a key made with the "
                                         r"tokenizer the model was trained with\.$"):
        LocalSuspect(_UnnamedTable(), input_shape=(32,), text=TextInputs.from_key(text_key()))
