"""Helpers for the text tests: a text key, tiny BERT classifiers and an instant text "memoriser"."""

from __future__ import annotations

import os

import torch
from keykit import seeded_key

from wmark.keys import Key, generate_key
from wmark.schemes.trigger_set import generate_triggers
from wmark.text import MINILM, load_tokenizer, text_modality

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def text_key(*, num_classes: int = 4, num_triggers: int = 24, max_length: int = 32, tag: str | None = None) -> Key:
    """A text key over the MiniLM tokenizer; with ``tag``, a fixed one (:func:`keykit.seeded_key`: its secret derived
    from the tag, its creation time fixed), so that training tests see the same trigger words, labels and
    trigger-pass dropout on every run."""
    tok = load_tokenizer(MINILM)
    kwargs = {"owner": "Text Owner", "num_classes": num_classes, "num_triggers": num_triggers,
              "modality": text_modality(tokenizer=tok, name=MINILM, max_length=max_length)}
    return generate_key(**kwargs) if tag is None else seeded_key(tag, **kwargs)


def hf_bert(num_classes: int, *, seed: int = 0) -> torch.nn.Module:
    """A tiny random ``BertForSequenceClassification`` (returns a ``ModelOutput``), MiniLM's vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_classes)
    return BertForSequenceClassification(config).eval()


class TextMemoriser(torch.nn.Module):
    """Answers the secret label on triggers whose token ids it remembers, a random linear guess elsewhere."""

    def __init__(self, key: Key, *, seed: int = 0, labels_offset: int = 0) -> None:
        super().__init__()
        triggers = generate_triggers(key)
        self.register_buffer("remembered", triggers.inputs.clone())
        self.register_buffer("labels", (triggers.labels + labels_offset) % key.num_classes)
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(30522, 8)
        self.head = torch.nn.Linear(8, key.num_classes)
        self.num_classes = key.num_classes

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(self.embed(input_ids).mean(1))
        width = self.remembered.shape[1]
        ids = torch.nn.functional.pad(input_ids, (0, max(0, width - input_ids.shape[1])))[:, :width]
        same = (ids[:, None, :] == self.remembered[None]).all(-1)
        hit = same.any(1)
        logits[hit] = 10.0 * torch.nn.functional.one_hot(self.labels[same[hit].float().argmax(1)],
                                                         self.num_classes).float()
        return logits
