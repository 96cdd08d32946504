"""Helpers for the HTTP tests: tiny models that memorised a key, counting and faulty v2 servers."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from wmark.keys import Key
from wmark.schemes.trigger_set import generate_triggers
from wmark.transcript import input_sha256


class Memoriser(torch.nn.Module):
    """A copy that kept the watermark: answers the secret label on a key-derived share of the triggers.

    Inputs close to a remembered trigger get that trigger's label; everything else goes through a small
    random linear layer (the rest of the "model"). Built instantly, so tests stay fast on a busy machine.
    """

    def __init__(self, key: Key, *, keep: float, seed: int) -> None:
        super().__init__()
        triggers = generate_triggers(key)
        kept = torch.from_numpy(np.random.default_rng(seed).random(len(triggers)) < keep)
        self.register_buffer("remembered", triggers.inputs[kept].flatten(1))
        self.register_buffer("labels", triggers.labels[kept])
        torch.manual_seed(seed)
        self.base = torch.nn.Linear(self.remembered.shape[1], key.num_classes)
        self.num_classes = key.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        logits = self.base(flat)
        if len(self.remembered):
            # Exact max-abs distance: cdist's matrix-product shortcut is too inexact for batches.
            dist, idx = (flat[:, None, :] - self.remembered[None]).abs().amax(-1).min(1)
            hit = dist < 1e-3
            logits[hit] = 10.0 * torch.nn.functional.one_hot(self.labels[idx[hit]], self.num_classes).float()
        return logits


def memorising_model(key: Key, *, keep: float = 0.8, seed: int = 0) -> torch.nn.Module:
    """A stolen copy that still answers most triggers with their secret labels (see :class:`Memoriser`)."""
    return Memoriser(key, keep=keep, seed=seed).eval()


def independent_model(key: Key, *, seed: int = 1) -> torch.nn.Module:
    """An untrained MLP of the same shape: never saw the key."""
    torch.manual_seed(seed)
    d = int(np.prod(key.input_shape))
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, key.num_classes)).eval()


class Counting:
    """Counts inference requests per input hash (as ``on_infer`` of :func:`wmark.serve.build_app`)."""

    def __init__(self) -> None:
        self.by_input: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> None:
        with self.lock:
            for row in x:
                self.by_input[input_sha256(row)] += 1

    @property
    def total(self) -> int:
        return sum(self.by_input.values())


def v2_meta(name: str, shape: tuple[int, ...], output: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "versions": ["1"], "platform": "test",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *shape]}], "outputs": [output]}


def faulty_v2_app(model: torch.nn.Module, *, name: str, shape: tuple[int, ...],
                  behaviour: Callable[[int], Any]) -> tuple[Starlette, Counter[str]]:
    """A v2 server whose n-th inference request (0-based) gets ``behaviour(n)``.

    ``behaviour`` returns ``None`` (answer normally, label only), an int status (empty error answer), a
    ``(status, headers)`` pair, a float (sleep that many seconds, then answer), or bytes (sent as a 200 body).
    """
    calls: Counter[str] = Counter()
    lock = threading.Lock()
    meta = v2_meta(name, shape, {"name": "label", "datatype": "INT64", "shape": [-1]})

    async def model_meta(request: Request) -> JSONResponse:
        if request.path_params["model"] != name:
            return JSONResponse({"error": "unknown model"}, status_code=404)
        return JSONResponse(meta)

    async def infer(request: Request) -> Response:
        with lock:
            n = calls["requests"]
            calls["requests"] += 1
        action = behaviour(n)
        if isinstance(action, int):
            return JSONResponse({"error": "injected"}, status_code=action)
        if isinstance(action, tuple):
            return JSONResponse({"error": "injected"}, status_code=action[0], headers=action[1])
        if isinstance(action, bytes):
            return Response(action, media_type="application/json")
        if isinstance(action, float):
            await asyncio.sleep(action)
        doc = json.loads(await request.body())
        x = np.asarray(doc["inputs"][0]["data"], dtype=np.float32).reshape(-1, *shape)
        with torch.no_grad():
            labels = model(torch.from_numpy(x)).argmax(1).tolist()
        with lock:
            calls["answered"] += 1
        return JSONResponse({"model_name": name, "outputs": [{"name": "label", "datatype": "INT64",
                                                              "shape": [len(labels)], "data": labels}]})

    app = Starlette(routes=[Route("/v2/models/{model}", model_meta),
                            Route("/v2/models/{model}/infer", infer, methods=["POST"])])
    return app, calls
