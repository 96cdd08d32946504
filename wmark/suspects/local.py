"""A suspect that is a model in this process (white-box access, used black-box here)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from wmark.errors import RuntimeFailure, UsageError
from wmark.suspects.base import Answers
from wmark.training import default_device


class LocalSuspect:
    """Queries an ``nn.Module`` directly.

    Args:
        model: The suspect model.
        input_shape: Shape of one input.
        description: Name for reports (e.g. the file it was loaded from).
        expose_scores: Whether to return softmax scores (False imitates a label-only API).
    """

    def __init__(self, model: nn.Module, *, input_shape: tuple[int, ...], description: str = "local model",
                 expose_scores: bool = True, device: torch.device | None = None) -> None:
        self.model = model.eval()
        self.device = device or default_device()
        self.model.to(self.device)
        self.input_shape = tuple(input_shape)
        self.description = description
        self.expose_scores = expose_scores
        with torch.no_grad():
            probe = self.model(torch.zeros(1, *self.input_shape, device=self.device))
        if probe.ndim != 2:
            raise UsageError(f"The suspect returns outputs shaped {tuple(probe.shape)}; expected batch × classes.")
        self.num_classes: int | None = int(probe.shape[1])

    @torch.no_grad()
    def query(self, inputs: np.ndarray) -> Answers:
        x = torch.as_tensor(np.asarray(inputs, dtype=np.float32), device=self.device)
        logits = self.model(x).float()
        if not torch.isfinite(logits).all():
            raise RuntimeFailure(
                f"The suspect {self.description} produced NaN or infinite outputs; its weights are corrupt or it "
                "was saved in a precision it cannot run in."
            )
        scores = torch.softmax(logits, dim=1).cpu().numpy()
        return Answers(labels=scores.argmax(1).astype(np.int64), scores=scores if self.expose_scores else None)
