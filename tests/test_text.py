"""Text keys, text triggers, the model contract and trigger mixing for token batches (tiny models, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from textkit import TextMemoriser, hf_bert, text_key

from wmark.contract import forward_logits, logits_of, model_device, split_batch
from wmark.embed import Watermarker
from wmark.errors import UsageError
from wmark.keys import generate_key, load_key, save_key
from wmark.schemes.trigger_set import TriggerMixingLoader, generate_triggers
from wmark.suspects import LocalSuspect
from wmark.text import MINILM, TextInputs, load_tokenizer, text_modality, trigger_vocabulary
from wmark.verify import verify_blackbox


def test_text_key_round_trips_and_image_keys_keep_their_commitment(tmp_path):
    key = text_key()
    save_key(key, tmp_path / "t.key")
    again = load_key(tmp_path / "t.key")
    assert again.commitment() == key.commitment() and again.kind == "text"
    assert again.input_shape == (32,) and again.schemes["trigger"]["pattern"] == "words"
    image = generate_key(owner="Img", num_classes=3, input_shape=(1, 8, 8))
    assert "modality" not in image.public_params() and image.kind == "image"
    # An old key file (written before modalities) loads unchanged, with the commitment it was written with.
    save_key(image, tmp_path / "old.key")
    doc = json.loads((tmp_path / "old.key").read_text())
    assert "modality" not in doc
    assert load_key(tmp_path / "old.key").commitment() == doc["commitment"]


def test_editing_the_modality_breaks_the_commitment(tmp_path):
    save_key(text_key(), tmp_path / "t.key")
    doc = json.loads((tmp_path / "t.key").read_text())
    doc["modality"]["max_length"] = 512
    (tmp_path / "t.key").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="does not match its own commitment"):
        load_key(tmp_path / "t.key")


def test_text_triggers_are_whole_words_that_round_trip_with_uniform_keyed_labels():
    key = text_key(num_classes=4, num_triggers=400)
    tok = load_tokenizer(MINILM)
    triggers = generate_triggers(key)
    again = generate_triggers(key, tokenizer=tok)
    assert triggers.texts == again.texts and torch.equal(triggers.labels, again.labels)
    assert len(triggers) == 400 and triggers.inputs.shape == (400, 32)
    for text, ids, mask in zip(triggers.texts[:50], triggers.inputs, triggers.attention_mask):
        words = text.split()
        assert len(words) == 12 and all(w.isalpha() and w.isascii() for w in words)
        assert tok.decode(ids[mask.bool()], skip_special_tokens=True) == text
        assert tok(text)["input_ids"] == ids[mask.bool()].tolist()
    counts = np.bincount(triggers.labels.numpy(), minlength=4)
    assert counts.min() > 60  # uniform over 4 classes: 100 expected each
    other = generate_triggers(text_key(num_classes=4, num_triggers=400))
    assert other.texts != triggers.texts
    vocab = trigger_vocabulary(tok)
    assert "[CLS]" not in vocab and not any(w.startswith("##") for w in vocab)


def test_a_tokenizer_that_does_not_match_the_key_is_refused(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "apple", "banana", "cherry", "grape", "melon"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path / "tok")
    other = load_tokenizer(str(tmp_path / "tok"))
    key = text_key()
    with pytest.raises(UsageError, match="tokenizer does not match the key"):
        TextInputs.from_key(key, tokenizer=other)
    with pytest.raises(UsageError, match="tokenizer does not match the key"):
        generate_triggers(key, tokenizer=other)
    own = generate_key(owner="Fruit", num_classes=2, num_triggers=5,
                       modality=text_modality(tokenizer=other, name=str(tmp_path / "tok"), max_length=16))
    assert set(" ".join(generate_triggers(own).texts).split()) <= {"apple", "banana", "cherry", "grape", "melon"}


@pytest.mark.parametrize("content", ['{"x": 1}', '{"added_tokens": []}', "[]"])
def test_a_tokenizer_file_that_is_json_but_no_tokenizer_is_refused_in_one_sentence(tmp_path, content):
    """tokenizer.json holding JSON that is no tokenizer failed with 'unexpected KeyError' (or the tokenizers
    library's bare Exception, or a TypeError), exit 3, naming no fix."""
    from click.testing import CliRunner

    from wmark.cli import main

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(content)
    result = CliRunner().invoke(main, ["keygen", "--owner", "x", "--classes", "4", "--modality", "text",
                                       "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "k.key")])
    assert result.exit_code == 2, result.output
    assert "Cannot load a tokenizer from" in result.output and "tokenizer.json or vocab.txt" in result.output
    assert not (tmp_path / "k.key").exists()


@pytest.mark.parametrize("modality", ['{"kind": "text"}', '{not json', {"kind": "text", "max_length": 64},
                                      {"kind": "text", "tokenizer": {"name": MINILM}, "max_length": "64"}])
def test_a_served_files_broken_text_modality_is_refused_in_one_sentence(modality):
    """wmark serve read a text modality without its tokenizer as a KeyError, and one that is not JSON as a
    JSONDecodeError: 'unexpected' errors, exit 3, naming no fix."""
    from wmark.text_serving import text_inputs_of

    with pytest.raises(UsageError, match=r"^The model file's wmark.modality metadata is not a text modality .*"
                                         r"save the model again with wmark\.$"):
        text_inputs_of({"modality": modality})
    assert text_inputs_of({"modality": {"kind": "image"}}) is None


def test_text_longer_than_the_keys_maximum_is_refused():
    inputs = TextInputs.from_key(text_key(max_length=16))
    assert inputs is not None
    assert inputs.encode(["a short text"])["input_ids"].shape == (1, 5)
    with pytest.raises(UsageError, match="more than the key's maximum of 16"):
        inputs.encode(["word " * 40])
    with pytest.raises(UsageError, match="must be strings"):
        inputs.encode([3])  # type: ignore[list-item]


def test_a_lone_surrogate_is_refused_as_text_in_one_sentence():
    """It failed inside the tokenizer with a TypeError naming TextEncodeInput."""
    text = TextInputs.from_key(text_key())
    with pytest.raises(UsageError, match=r"^Text inputs must be valid Unicode text \(no lone surrogates\)\.$"):
        text.encode(["fine", "\ud800"])
    assert text.encode(["caf\u00e9"])["input_ids"].shape[0] == 1


def test_contract_reads_model_outputs_and_dict_batches():
    model = hf_bert(3)
    batch = {"input_ids": torch.tensor([[101, 2023, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "token_type_ids": torch.zeros(1, 3, dtype=torch.long)}
    assert forward_logits(model, batch).shape == (1, 3)
    assert logits_of((torch.zeros(2, 5), None)).shape == (2, 5)
    with pytest.raises(UsageError, match="batch × classes"):
        logits_of(torch.zeros(2, 3, 4))

    class TakesDict(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

        def forward(self, batch: dict) -> torch.Tensor:
            return self.fc(batch["features"])

    assert forward_logits(TakesDict(), {"features": torch.zeros(4, 2)}).shape == (4, 2)
    with pytest.raises(UsageError, match="batch has no 'input_ids'"):
        forward_logits(model, {"pixel_values": torch.zeros(1, 3)})
    with pytest.raises(UsageError, match="has no 'labels'"):
        split_batch({"input_ids": torch.zeros(1, 3)})
    assert model_device(model) == torch.device("cpu")


def test_local_suspect_leaves_the_model_where_it_is_and_asks_text():
    key = text_key()
    model = hf_bert(4)
    moved: list[object] = []
    original = model.to
    model.to = lambda *a, **k: moved.append(a) or original(*a, **k)  # type: ignore[method-assign]
    suspect = LocalSuspect(model, input_shape=(32,), text=TextInputs.from_key(key))
    answers = suspect.query(np.asarray(["hello world", "a fortune"], dtype=object))
    assert answers.labels.shape == (2,) and suspect.num_classes == 4 and not moved
    with pytest.raises(UsageError, match="ask it strings"):
        suspect.query(np.zeros((1, 32), dtype=np.float32))


def test_verifying_a_text_model_detects_a_copy_and_clears_an_independent_one():
    key = text_key(num_classes=4, num_triggers=40)
    text = TextInputs.from_key(key)
    copy = LocalSuspect(TextMemoriser(key), input_shape=(32,), text=text, expose_scores=False)
    verdict = verify_blackbox(key=key, suspect=copy, alpha=1e-6)
    assert verdict.detected and verdict.tests[0].queries <= 20
    for seed in range(3):
        innocent = LocalSuspect(hf_bert(4, seed=seed), input_shape=(32,), text=text, expose_scores=False)
        assert not verify_blackbox(key=key, suspect=innocent, alpha=1e-6, mode="fixed").detected


def _dict_batches(n_batches: int, width: int, *, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1000, 5000, (6, width), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                    "labels": torch.randint(0, 4, (6,), generator=gen)})
    return out


def test_trigger_mixing_pads_token_batches_and_never_casts_images_to_tokens():
    key = text_key()
    triggers = generate_triggers(key)
    mixed = next(iter(TriggerMixingLoader(_dict_batches(1, 40), triggers, per_batch=4)))
    assert mixed["input_ids"].shape == (10, 40) and mixed["attention_mask"].shape == (10, 40)
    assert mixed["token_type_ids"].shape == (10, 40)
    assert torch.equal(mixed["labels"][6:], triggers.labels[:4])
    assert mixed["attention_mask"][6:].sum(1).tolist() == triggers.attention_mask[:4].sum(1).tolist()
    narrow = next(iter(TriggerMixingLoader(_dict_batches(1, 5), triggers, per_batch=2)))
    assert narrow["input_ids"].shape == (8, 14) and narrow["attention_mask"][:6, 5:].sum() == 0
    image_triggers = generate_triggers(generate_key(owner="Img", num_classes=4, input_shape=(1, 8, 8)))
    with pytest.raises(UsageError, match="integer inputs"):
        next(iter(TriggerMixingLoader([(torch.zeros(2, 1, 8, 8).long(), torch.zeros(2).long())], image_triggers)))
    with pytest.raises(UsageError, match="float inputs"):
        next(iter(TriggerMixingLoader([(torch.zeros(2, 32), torch.zeros(2).long())], triggers)))
    with pytest.raises(UsageError, match="has no 'input_ids'"):
        next(iter(TriggerMixingLoader([{"text": torch.zeros(2, 3).long(), "labels": torch.zeros(2).long()}],
                                      triggers)))


def test_a_margin_trains_a_bert_on_its_triggers_in_their_own_pass_with_dict_batches():
    from wmark.training import train_epochs

    key = text_key(num_classes=4, num_triggers=16, tag="text/own-pass")
    model = hf_bert(4, seed=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    wm = Watermarker(key, schemes=("trigger",), trigger_margin=3.0, trigger_per_batch=8)
    model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=_dict_batches(4, 20))
    assert [len(b["labels"]) for b in loader] == [6] * 4  # the batches stay the user's
    torch.manual_seed(0)
    train_epochs(model, loader, epochs=12, optimizer=optimizer, device=torch.device("cpu"))
    wm.detach()
    suspect = LocalSuspect(model, input_shape=(32,), text=TextInputs.from_key(key), expose_scores=False)
    assert verify_blackbox(key=key, suspect=suspect, alpha=1e-6, mode="fixed").detected
    assert wm.metadata()["trigger_margin"] == 3.0


def test_attach_with_dict_batches_trains_a_bert_that_answers_the_triggers():
    from wmark.training import train_epochs

    # a fixed key: with random ones this 48-step toy run misses some triggers about one time in fifteen
    key = text_key(num_classes=4, num_triggers=16, tag="attach-dict-batches")
    model = hf_bert(4, seed=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    wm = Watermarker(key, schemes=("trigger",), trigger_per_batch=8, trigger_mixing=True)
    model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=_dict_batches(4, 20))
    assert [len(b["labels"]) for b in loader] == [14] * 4  # 8 triggers join each batch
    torch.manual_seed(0)
    train_epochs(model, loader, epochs=12, optimizer=optimizer, device=torch.device("cpu"))
    wm.detach()
    suspect = LocalSuspect(model, input_shape=(32,), text=TextInputs.from_key(key), expose_scores=False)
    assert verify_blackbox(key=key, suspect=suspect, alpha=1e-6, mode="fixed").detected
    assert wm.metadata()["modality"] == key.modality


def test_wrap_dataset_yields_dicts_a_padding_collator_accepts():
    from transformers import DataCollatorWithPadding

    key = text_key(num_triggers=8)
    tok = load_tokenizer(MINILM)
    texts = ["what a day", "computers are fast", "to be or not to be", "the cookie crumbles"]
    items = [dict(tok(t), labels=i % 4) for i, t in enumerate(texts)]
    wrapped = Watermarker(key, tokenizer=tok, trigger_mixing=True).wrap_dataset(items, repeats=2)  # type: ignore[arg-type]
    assert len(wrapped) == 4 + 16
    trigger_item = wrapped[4]
    assert set(trigger_item) == set(items[0]) and isinstance(trigger_item["input_ids"], list)
    batch = DataCollatorWithPadding(tok)([wrapped[i] for i in (0, 4, 5, 2)])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].tolist()[0] == 0
    with pytest.raises(UsageError, match="have no 'labels'"):
        Watermarker(key, tokenizer=tok, trigger_mixing=True).wrap_dataset([dict(tok("x"), label=0)])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="not through the dataset.*trigger_mixing=True"):
        Watermarker(key, tokenizer=tok, trigger_margin=3.0).wrap_dataset(items)  # type: ignore[arg-type]


def _other_tokenizer_key(path, *, num_classes: int, max_length: int):
    """A text key whose recorded vocabulary is not MiniLM's (as made with a tokenizer of two swapped words)."""
    import dataclasses

    key = text_key(num_classes=num_classes, max_length=max_length)
    other = dict(key.modality, tokenizer={"name": "/tok/other", "vocab_sha256": "0" * 64})
    save_key(dataclasses.replace(key, modality=other), path)


def test_embed_refuses_a_key_made_with_another_tokenizer(tmp_path):
    from click.testing import CliRunner

    from wmark.cli import main
    from wmark.io import save_model
    from wmark.models import build_model

    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "computers").write_text("computers are fast\n%\nthe disk is full\n%\nbits and bytes\n")
    (fortunes / "people").write_text("people are kind\n%\nsome people are not\n%\nfriends help\n")
    _other_tokenizer_key(tmp_path / "other.key", num_classes=2, max_length=64)
    base = tmp_path / "base.safetensors"
    save_model(build_model("text-bow", num_classes=2, input_shape=(64,)), base,
               metadata={"arch": "text-bow", "num_classes": 2, "input_shape": [64]})
    out = tmp_path / "marked.safetensors"
    embed = CliRunner().invoke(main, ["embed", "--key", str(tmp_path / "other.key"), "--arch", "text-bow", "--weights",
                                      str(base), "--data", f"fortunes:{fortunes}", "--epochs", "1", "--out", str(out)])
    assert embed.exit_code == 2 and not out.exists()
    assert "is tokenized with all-MiniLM-L6-v2" in embed.stderr and "/tok/other" in embed.stderr


def test_wmark_train_records_the_datas_tokenizer_in_a_text_model_file(tmp_path):
    from click.testing import CliRunner

    from wmark.cli import main
    from wmark.data import Dataset
    from wmark.io import read_metadata, wmark_metadata
    from wmark.text import recorded_tokenizer
    from wmark.text_serving import text_inputs_of

    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "computers").write_text("computers are fast\n%\nthe disk is full\n%\nbits and bytes\n")
    (fortunes / "people").write_text("people are kind\n%\nsome people are not\n%\nfriends help\n")
    out = tmp_path / "trained.safetensors"
    result = CliRunner().invoke(main, ["train", "--arch", "text-bow", "--data", f"fortunes:{fortunes}", "--epochs", "1",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = wmark_metadata(read_metadata(out))
    assert meta["modality"] == text_key(max_length=64).modality  # what a MiniLM key over 64 tokens records
    assert recorded_tokenizer(meta)["name"] == MINILM and text_inputs_of(meta).max_length == 64  # servable as text
    images = Dataset("images", torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 1, 4, 4),
                     torch.zeros(1, dtype=torch.int64), num_classes=2)
    assert images.modality is None  # an image model's file records no modality, as before


def test_verify_file_verifies_a_suspect_recording_another_tokenizer_and_notes_it(tmp_path):
    """A thief who writes another tokenizer into a stolen file cannot block `verify file`; the report says so."""
    import html

    from click.testing import CliRunner

    from wmark.cli import main
    from wmark.io import save_model
    from wmark.models import build_model

    key = text_key(num_classes=4, max_length=64, tag="recorded-tokenizer")
    save_key(key, tmp_path / "k.key")
    # the copy: a bag of words that learnt the key's triggers (a few dozen full-batch steps, well under a second)
    triggers = generate_triggers(key)
    model = build_model("text-bow", num_classes=4, input_shape=(64,), seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(triggers.inputs, triggers.attention_mask), triggers.labels).backward()
        optimizer.step()
    stolen = tmp_path / "stolen.safetensors"
    claimed = dict(key.modality, tokenizer={"name": "/tok/thief\x1b[2J", "vocab_sha256": "f" * 64})
    save_model(model, stolen, metadata={"arch": "text-bow", "num_classes": 4, "input_shape": [64], "modality": claimed})
    report = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["verify", "file", "--key", str(tmp_path / "k.key"), "--arch", "text-bow",
                                       "--suspect", str(stolen), "--fixed", "--json", "--report", str(report)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    note = (f"The model file {stolen} records the tokenizer '/tok/thief\\x1b[2J' (vocabulary ffffffffffff…) while "
            f"the key's is {MINILM} (vocabulary {key.modality['tokenizer']['vocab_sha256'][:12]}…); it was verified "
            "anyway, on the key's triggers tokenized with the key's tokenizer.")
    assert doc["decision"] == "detected" and doc["queries"] == 24 and doc["message"] == note
    assert json.loads(report.with_suffix(".json").read_text())["verdict"]["message"] == note
    assert f"<p class='note'>{html.escape(note)}</p>" in report.read_text()
    # the owner's own file, recording the key's tokenizer, gets no note
    save_model(model, stolen, metadata={"arch": "text-bow", "num_classes": 4, "input_shape": [64],
                                        "modality": key.modality})
    again = CliRunner().invoke(main, ["verify", "file", "--key", str(tmp_path / "k.key"), "--arch", "text-bow",
                                      "--suspect", str(stolen), "--fixed", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["message"] == ""


@pytest.mark.parametrize(("which", "message"), [
    ("long", "The key's texts are at most 128 tokens but the data's are 64; make a key with --max-length 64."),
    ("image", "The key is an image key but the data are texts; make a key with --modality text for them."),
])
def test_a_key_of_another_length_or_kind_than_the_data_names_the_fix(tmp_path, which, message):
    from wmark.api import embed

    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "computers").write_text("computers are fast\n%\nthe disk is full\n")
    (fortunes / "people").write_text("people are kind\n%\nfriends help\n")
    key = (text_key(num_classes=2, max_length=128) if which == "long"
           else generate_key(owner="o", num_classes=2, input_shape=(64,)))
    save_key(key, tmp_path / "k.key")
    with pytest.raises(UsageError, match=rf"^{message.replace('.', '[.]')}$"):
        embed(key=tmp_path / "k.key", arch="text-bow", weights=tmp_path / "none.safetensors",
              data=f"fortunes:{fortunes}", out=tmp_path / "m.safetensors")
