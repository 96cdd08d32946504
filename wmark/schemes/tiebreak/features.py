"""The feature maps a tie-break rule reads its keyed shift from, by the name the rule file records.

* :data:`SERVED` (the default): the served model's own penultimate features, read from the same forward pass
  as its answer.
* :data:`PUBLIC_MINILM` (text keys over MiniLM's tokenizer): the mean-pooled features of the public
  all-MiniLM-L6-v2 encoder, the input of ``minilm-classifier``'s head. A thief fine-tuning the same encoder has
  these features from its first step. For a served model fine-tuned from that encoder, at the same bound on
  honest cost, the evidence against such a thief was stronger on average but no more thieves were caught, at a
  second encoder forward per request (docs/extraction.md, "Text classifiers").

Both maps are key-free, so the test's null stays exact under either: which one to read is the owner's trade of
cost against evidence. A rule of the public map records the encoder's weight digest, so it is served and
verified only with the encoder it was built from.
"""

from __future__ import annotations

import torch

from wmark.contract import model_device
from wmark.errors import UsageError
from wmark.io import tensors_digest
from wmark.keys import Key
from wmark.models import PenultimateFeaturizer, build_model, penultimate_featurizer
from wmark.schemes.tiebreak.serving import BETA_GRID
from wmark.text import MINILM, TextInputs, load_tokenizer, vocab_sha256

SERVED = "served-penultimate"
PUBLIC_MINILM = f"public-encoder:{MINILM}"
SPACES = (SERVED, PUBLIC_MINILM)
COST_GRIDS = {SERVED: BETA_GRID, PUBLIC_MINILM: tuple(round(0.05 * i, 2) for i in range(1, 31))}
"""The scales ``max_cost`` searches, per map: up to the default 1 for the served map; up to 1.5 for the public
encoder's, which costs less per unit of scale, so a cost bound can afford more (the grid it was measured on)."""
CHOICES = {"served": SERVED, "public": PUBLIC_MINILM}
"""What ``wmark tiebreak build --features`` (``features=`` in :func:`wmark.api.build_tiebreak`) names each space."""


def chosen_space(choice: str, *, key: Key) -> str:
    """The feature space an owner's ``choice`` (``served`` or ``public``) names, checked against ``key``.

    Raises:
        UsageError: For another choice, or ``public`` for an image key or a text key over another tokenizer
            than the public encoder's (its features of another vocabulary's ids would be of other words).
    """
    if choice not in CHOICES:
        raise UsageError(f"Unknown feature map {choice!r}; use served or public.")
    if choice == "public":
        if key.modality is None:
            raise UsageError(f"The public encoder's features ({MINILM}) read texts but the key is an image key; "
                             "build its rule with the served model's features (--features served).")
        name = str(key.modality["tokenizer"]["name"])
        if name != MINILM:
            raise UsageError(f"The public encoder {MINILM} reads its own tokenizer's ids but the key's tokenizer is "
                             f"{name}; use --features served, or a key made with --tokenizer {MINILM}.")
    return CHOICES[choice]


def rule_featurizer(space: str, *, served_model: torch.nn.Module, text: TextInputs | None,
                    device: torch.device | str | None = None) -> tuple[PenultimateFeaturizer, str]:
    """The featurizer of the feature space ``space`` and the digest of the weights it reads besides the served
    model's (empty for :data:`SERVED`, which reads only the served model).

    Args:
        space: :data:`SERVED` or :data:`PUBLIC_MINILM`.
        served_model: The served model.
        text: For a text key, its tokenization (the featurizer then takes strings).
        device: Where the public encoder runs (default: the served model's device); its inputs follow it.

    Raises:
        UsageError: For an unknown space, or the public encoder without MiniLM's tokenizer.
    """
    encode = None if text is None else text.encode
    if space == SERVED:
        return penultimate_featurizer(served_model, encode=encode), ""
    if space != PUBLIC_MINILM:
        raise UsageError(f"Unknown tie-break feature space {space!r}; use {SERVED} or {PUBLIC_MINILM}.")
    if text is None or vocab_sha256(text.tokenizer) != vocab_sha256(load_tokenizer(MINILM)):
        raise UsageError(f"The public encoder's features ({MINILM}) need texts tokenized with {MINILM}; use the "
                         "served model's features for this key.")
    encoder, digest = public_encoder(device=model_device(served_model) if device is None else device)
    return penultimate_featurizer(encoder, encode=encode), digest


def public_encoder(*, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, str]:
    """The public MiniLM encoder with a linear head (in eval mode, on ``device``) and the digest of its encoder's
    weights (:func:`wmark.io.tensors_digest`; the head is left out: its input, the mean-pooled encoder output,
    is the feature, whatever the head's weights)."""
    # build_model's seed would reset the caller's global generator; the head's draw must not move it either
    with torch.random.fork_rng(devices=[]):
        model = build_model("minilm-classifier", num_classes=2, input_shape=(64,), seed=0)
    digest = tensors_digest({n: t for n, t in model.state_dict().items() if not n.startswith("head.")})
    return model.eval().to(device), digest
