"""Text classifiers for ``--arch``: MiniLM with a linear head, a tiny BERT from scratch, a bag of words.

All take token ids (N×L, right-padded with the tokenizer's pad id) as a tensor, or ``input_ids`` /
``attention_mask`` by keyword, and return logits. A batch is trimmed to its longest real sequence before
the encoder runs, so padding to the key's maximum length costs nothing.

Example:
    >>> model = build_text_model("tiny-bert", num_classes=4, input_shape=(16,))
    >>> model(torch.tensor([[101, 2023, 102, 0]])).shape
    torch.Size([1, 4])
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from wmark.errors import UsageError

MINILM_VOCAB = 30522
PAD_ID = 0


class TextClassifier(nn.Module):
    """A Hugging Face encoder, masked mean pooling and a linear head.

    Args:
        encoder: A ``transformers`` encoder returning ``last_hidden_state``.
        num_classes: Output classes.
        pad_token_id: The id that marks padding when no attention mask is given.
    """

    def __init__(self, encoder: nn.Module, *, num_classes: int, pad_token_id: int = PAD_ID) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_token_id = pad_token_id
        config: Any = encoder.config
        hidden = int(config.hidden_size)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids, mask = _trim(input_ids, attention_mask, self.pad_token_id)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


class BagOfWords(nn.Module):
    """Mean of learned token embeddings, a hidden layer and a linear head (no word order)."""

    def __init__(self, *, num_classes: int, vocab_size: int = MINILM_VOCAB, dim: int = 64,
                 pad_token_id: int = PAD_ID) -> None:
        super().__init__()
        self.pad_token_id = pad_token_id
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table (the Hugging Face convention, so its vocabulary can be checked)."""
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids, mask = _trim(input_ids, attention_mask, self.pad_token_id)
        embedded = self.embed(ids)
        weights = mask.unsqueeze(-1).to(embedded.dtype)
        pooled = (embedded * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(torch.relu(self.hidden(pooled)))


def _trim(ids: torch.Tensor, mask: torch.Tensor | None, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    if ids.is_floating_point():
        raise UsageError("A text model takes integer token ids, not floats; tokenize the text first.")
    ids = ids.long()
    mask = (ids != pad).long() if mask is None else mask.long()
    width = max(int(mask.sum(1).max().item()) if len(mask) else 1, 1)
    return ids[:, :width], mask[:, :width]


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_classifier(*, num_classes: int, input_shape: tuple[int, ...] = (64,)) -> nn.Module:
    """MiniLM-L6 (all-MiniLM-L6-v2, loaded offline from its PyPI package) + mean pooling + a linear head."""
    _offline()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from wmark.text import minilm_dir

    hf_logging.disable_progress_bar()  # a bar per model load would clutter the CLI's output
    encoder = AutoModel.from_pretrained(minilm_dir(), local_files_only=True)
    return TextClassifier(encoder, num_classes=num_classes)


def tiny_bert(*, num_classes: int, input_shape: tuple[int, ...] = (64,), hidden: int = 32, layers: int = 2) -> nn.Module:
    """A randomly initialised 2-layer BERT (hidden 32) over MiniLM's vocabulary, for training from scratch."""
    _offline()
    from transformers import BertConfig, BertModel

    length = max(int(input_shape[-1]) if input_shape else 64, 8)
    config = BertConfig(vocab_size=MINILM_VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=max(length, 64), pad_token_id=PAD_ID)
    return TextClassifier(BertModel(config, add_pooling_layer=False), num_classes=num_classes)


def bag_of_words(*, num_classes: int, input_shape: tuple[int, ...] = (64,)) -> nn.Module:
    """A bag-of-words classifier over MiniLM's vocabulary."""
    return BagOfWords(num_classes=num_classes)


TEXT_ARCHS = {"minilm-classifier": minilm_classifier, "tiny-bert": tiny_bert, "text-bow": bag_of_words}


def build_text_model(arch: str, *, num_classes: int, input_shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    """One of :data:`TEXT_ARCHS` by name."""
    if arch not in TEXT_ARCHS:
        raise UsageError(f"Unknown text architecture {arch!r}; use one of {', '.join(TEXT_ARCHS)}.")
    return TEXT_ARCHS[arch](num_classes=num_classes, input_shape=input_shape, **kwargs)
