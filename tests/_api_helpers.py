"""Helpers for the API-side mark tests: a tiny fixed model that never saw any key."""

from __future__ import annotations

from typing import Any

import numpy as np

from wmark.suspects import Answers


class LinearModel:
    """A fixed linear classifier on flat inputs (softmax scores); ``scale`` sharpens its confidence."""

    def __init__(self, seed: int, *, num_classes: int, dims: int, scale: float = 1.0) -> None:
        self.w = np.random.default_rng(seed).normal(size=(dims, num_classes)) * scale
        self.description, self.num_classes, self.input_shape = f"linear {seed}", num_classes, (dims,)

    def query(self, x: np.ndarray) -> Answers:
        z = np.asarray(x, dtype=np.float64) @ self.w
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return Answers(labels=p.argmax(1), scores=p)


class Follower:
    """A surrogate of a marked API: its label with probability ``q``, else the served top-1."""

    def __init__(self, api: Any, q: float, seed: int = 0) -> None:
        self.api, self.q, self.rng = api, q, np.random.default_rng(seed)
        self.description, self.num_classes, self.input_shape = "follower", api.num_classes, api.input_shape

    def query(self, x: np.ndarray) -> Answers:
        marked = self.api.query(x).labels
        plain = self.api.backend.query(x).labels
        return Answers(labels=np.where(self.rng.random(len(x)) < self.q, marked, plain))
