"""Inputs of the wrong kind or under the wrong name: every trigger path and the contract refuse them in one sentence."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from textkit import hf_bert, text_key
from torch import nn

from wmark.contract import forward_logits
from wmark.embed import Watermarker
from wmark.errors import UsageError
from wmark.keys import Key, generate_key
from wmark.suspects import LocalSuspect
from wmark.training import train_epochs


class _DictImages(nn.Module):
    """An image classifier whose forward takes the whole dict batch and reads its images by key."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(batch["pixel_values"].flatten(1))


class _NamedImages(nn.Module):
    """An image classifier whose forward names its input ``pixel_values``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(pixel_values.flatten(1))


def _image_key() -> Key:
    return generate_key(owner="Inputs", num_classes=4, input_shape=(1, 8, 8), num_triggers=8)


def _fit(key: Key, model: nn.Module, batches: list[Any], **options: Any) -> Watermarker:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wm = Watermarker(key, **options)
    model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=batches)
    assert optimizer is not None
    train_epochs(model, loader, epochs=1, optimizer=optimizer, device=torch.device("cpu"))
    return wm


_IMAGES = (torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,)))


@pytest.mark.parametrize("options", [{"trigger_margin": 3.0}, {"trigger_lookahead": 0.05}, {"trigger_mixing": True}])
def test_a_text_key_on_an_image_model_is_refused_on_every_trigger_path(options: dict[str, Any]) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    with pytest.raises(UsageError, match="text key but the batches hold float inputs; use a key made for"):
        _fit(text_key(), model, [_IMAGES], **options)


@pytest.mark.parametrize("options", [{"trigger_margin": 3.0}, {}, {"trigger_mixing": True}])
def test_an_image_key_on_token_batches_is_refused_on_every_trigger_path(options: dict[str, Any]) -> None:
    model = nn.Sequential(nn.Embedding(100, 4), nn.Flatten(), nn.Linear(4 * 6, 4))
    tokens = (torch.randint(0, 100, (4, 6)), torch.randint(0, 4, (4,)))
    with pytest.raises(UsageError, match="integer inputs .* but the key's triggers are images"):
        _fit(_image_key(), model, [tokens], **options)


class _RecordingDictImages(_DictImages):
    """Records what each forward call receives; reads a bare tensor too, so that only the record shows the form."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Any] = []

    def forward(self, batch: Any) -> torch.Tensor:  # type: ignore[override]
        self.calls.append(batch)
        images = batch["pixel_values"] if isinstance(batch, Mapping) else batch
        return self.fc(images.flatten(1))


def test_a_model_that_takes_the_dict_batch_gets_its_triggers_under_the_batch_key() -> None:
    model = _RecordingDictImages()
    natural = [{"pixel_values": torch.rand(4, 1, 8, 8), "labels": torch.randint(0, 4, (4,))} for _ in range(2)]
    wm = _fit(_image_key(), model, natural)  # the default: lookahead, the triggers in their own pass
    assert wm.trigger_lookahead > 0 and wm.trigger_per_batch == 4
    # Each step: the natural batch's forward, then the trigger pass's in the optimizer step pre-hook.
    assert len(model.calls) == 4
    for step, (seen, passed) in enumerate(zip(model.calls[::2], model.calls[1::2])):
        assert isinstance(seen, Mapping) and torch.equal(seen["pixel_values"], natural[step]["pixel_values"])
        assert isinstance(passed, Mapping), f"the triggers reached the model as {type(passed).__name__}, not a dict"
        assert set(passed) == {"pixel_values"}
        triggers = passed["pixel_values"]
        assert triggers.shape == (4, 1, 8, 8) and triggers.dtype == torch.float32
        # the key's triggers in its cycle order: 0-3 at the first step, 4-7 at the second
        assert torch.equal(triggers, wm.triggers.inputs[4 * step:4 * step + 4])


@pytest.mark.parametrize("options", [{"trigger_margin": 3.0}, {"trigger_mixing": True}])
def test_a_text_key_on_dict_image_batches_is_refused_as_the_wrong_key_not_a_misnamed_input(
        options: dict[str, Any]) -> None:
    # the batch holds pixel_values, not the text key's input_ids: the fix is another key, not input_key=
    batches = [{"pixel_values": _IMAGES[0], "labels": _IMAGES[1]}]
    with pytest.raises(UsageError, match=r"^The key is a text key but the batches hold float inputs; use a key made "
                                         r"for this model's inputs\.$"):
        _fit(text_key(), _NamedImages(), batches, **options)


def test_a_dict_batch_without_the_inputs_key_is_refused_on_the_trigger_pass() -> None:
    with pytest.raises(UsageError, match=r"dict batch has no 'pixel_values' \(it holds 'image'\); name the inputs' "
                                         r"key when attaching \(input_key=\)"):
        _fit(_image_key(), _NamedImages(), [{"image": _IMAGES[0], "labels": _IMAGES[1]}])


def test_a_forward_naming_pixel_values_is_not_handed_a_dict_without_them() -> None:
    with pytest.raises(UsageError, match=r"^The batch has no 'pixel_values' \(it holds 'image'\); name the model's"):
        forward_logits(_NamedImages(), {"image": _IMAGES[0]})
    assert forward_logits(_NamedImages(), {"pixel_values": _IMAGES[0]}).shape == (4, 4)


class _TwoInputs(torch.nn.Module):
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(ids), 4) + mask.sum()


def test_a_forward_with_two_required_inputs_names_both_as_needed() -> None:
    # both are needed, so the message lists them ("no 'ids', 'mask'"), not as alternatives ("'ids' or 'mask'")
    with pytest.raises(UsageError, match=r"^The batch has no 'ids', 'mask' \(it holds 'input_ids'\); name the model"):
        forward_logits(_TwoInputs(), {"input_ids": torch.zeros(2, 3)})


def test_a_hugging_face_model_needs_its_main_input_in_a_dict_batch() -> None:
    model = hf_bert(4)
    ids, mask = torch.randint(1000, 2000, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(UsageError, match=r"^The batch has no 'input_ids' or 'inputs_embeds' \(it holds 'ids', "
                                         r"'attention_mask'\); name the model's inputs in the batch, or wrap the "
                                         r"model in a module whose forward takes the batch's keys\.$"):
        forward_logits(model, {"ids": ids, "attention_mask": mask})
    assert forward_logits(model, {"input_ids": ids, "attention_mask": mask}).shape == (2, 4)
    embeds = model.bert.embeddings.word_embeddings(ids)
    assert forward_logits(model, {"inputs_embeds": embeds}).shape == (2, 4)  # its other main input


def test_a_text_key_with_dict_batches_keyed_otherwise_is_refused_on_the_trigger_pass() -> None:
    batches = [{"ids": torch.randint(1000, 2000, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long),
                "labels": torch.randint(0, 4, (4,))}]
    with pytest.raises(UsageError, match=r"dict batch has no 'input_ids' \(it holds 'ids', 'attention_mask'\)"):
        _fit(text_key(), hf_bert(4), batches, trigger_margin=2.0)


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # torch on a string index, before it fails
def test_a_local_suspect_that_takes_dict_batches_needs_input_key() -> None:
    with pytest.raises(UsageError, match=r"fails on a tensor of shape \(1, 1, 8, 8\) \(IndexError: .*\); give "
                                         r"input_key= if its forward takes a dict batch"):
        LocalSuspect(_DictImages(), input_shape=(1, 8, 8))
    suspect = LocalSuspect(_DictImages(), input_shape=(1, 8, 8), input_key="pixel_values")
    assert suspect.num_classes == 4 and suspect.query(torch.rand(3, 1, 8, 8).numpy()).labels.shape == (3,)


class _PositionalText(nn.Module):
    """A text classifier whose forward takes its token ids and mask under names of its own, positionally."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(30522, 8, mode="sum")
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids, per_sample_weights=mask.float()))


class _Named(nn.Module):
    """Wraps a model so its forward takes the names a text suspect is asked under (the fix the message names)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids, attention_mask)


def test_a_text_suspect_whose_forward_names_its_inputs_otherwise_is_told_to_wrap_it() -> None:
    from wmark.text import TextInputs

    text = TextInputs.from_key(text_key())
    with pytest.raises(UsageError, match=r"^The suspect local model's forward takes \(ids, mask\), but text goes in "
                                         r"as input_ids and attention_mask; wrap the model in a module whose "
                                         r"forward\(input_ids, attention_mask\) calls it with them\.$"):
        LocalSuspect(_PositionalText(), input_shape=(32,), text=text)
    one_tensor = nn.Sequential(nn.Embedding(30522, 8), nn.Flatten(), nn.Linear(256, 4))  # forward(input): no dict
    with pytest.raises(UsageError, match=r"^The suspect local model fails on a dict of 'input_ids', 'attention_mask' "
                                         r"\(.*\); wrap the model in a module whose forward\(input_ids, attention_mask\)"):
        LocalSuspect(one_tensor, input_shape=(32,), text=text)
    suspect = LocalSuspect(_Named(_PositionalText()), input_shape=(32,), text=text)
    assert suspect.num_classes == 4
    assert suspect.query(np.asarray(["computers are fast", "people are kind"], dtype=object)).labels.shape == (2,)


def test_an_image_suspect_asked_under_another_input_key_is_told_which_to_give() -> None:
    with pytest.raises(UsageError, match=r"^The suspect local model's forward takes \(pixel_values\), not images "
                                         r"under 'image'; give input_key= the name it takes them by, or wrap"):
        LocalSuspect(_NamedImages(), input_shape=(1, 8, 8), input_key="image")
    assert LocalSuspect(_NamedImages(), input_shape=(1, 8, 8), input_key="pixel_values").num_classes == 4


def test_an_image_suspect_built_for_another_input_shape_is_refused_in_one_sentence() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))  # takes 1×8×8
    with pytest.raises(UsageError, match=r"^The suspect local model fails on an input of shape \(1, 28, 28\) "
                                         r"\(RuntimeError: mat1 and mat2 shapes cannot be multiplied.*\); use a key "
                                         r"whose input shape is the model's\.$"):
        LocalSuspect(model, input_shape=(1, 28, 28))


def test_a_local_suspect_asked_nothing_answers_nothing() -> None:
    from wmark.text import TextInputs

    text_suspect = LocalSuspect(_Named(_PositionalText()), input_shape=(32,), text=TextInputs.from_key(text_key()),
                                expose_scores=False)
    none = text_suspect.query(np.asarray([], dtype=object))
    assert none.labels.shape == (0,) and none.labels.dtype == np.int64 and none.scores is None
    image_suspect = LocalSuspect(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), input_shape=(1, 8, 8))
    assert image_suspect.query(np.zeros((0, 1, 8, 8), dtype=np.float32)).scores.shape == (0, 4)
