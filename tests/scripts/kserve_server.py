"""Serve small torch models with KServe's own ``ModelServer`` on 127.0.0.1 (a real peer for the HTTP tests).

Usage: python kserve_server.py PORT NAME=MODEL.safetensors [NAME=MODEL.safetensors ...]

Each model file holds the tensors of :class:`tests.httpkit.Memoriser` (``remembered``, ``labels``,
``base.weight``, ``base.bias``); it is served as the usual custom Python ``kserve.Model``, which describes
no inputs or outputs in its v2 metadata. gRPC is off; the REST server binds loopback only (KServe binds
0.0.0.0 unconditionally, so its REST server class is narrowed here).
"""

from __future__ import annotations

import sys

import kserve
import kserve.model_server
import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse
from kserve.utils.utils import generate_uuid
from safetensors.torch import load_file


class LookupNet(torch.nn.Module):
    """Inputs close to a remembered one get its label; the rest go through a linear layer."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.remembered, self.labels = tensors["remembered"], tensors["labels"]
        self.base = torch.nn.Linear(*tensors["base.weight"].shape[::-1])
        self.base.load_state_dict({"weight": tensors["base.weight"], "bias": tensors["base.bias"]})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        logits = self.base(flat)
        if len(self.remembered):
            dist, idx = (flat[:, None, :] - self.remembered[None]).abs().amax(-1).min(1)
            hit = dist < 1e-3
            logits[hit] = 10.0 * torch.nn.functional.one_hot(self.labels[idx[hit]], logits.shape[1]).float()
        return logits


class TorchModel(kserve.Model):
    """A custom KServe model as the KServe docs write one: ``load`` then ``predict`` on v2 requests."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.net: LookupNet | None = None
        self.load()

    def load(self) -> bool:
        self.net = LookupNet(load_file(self.path)).eval()
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        assert self.net is not None
        x = torch.from_numpy(np.asarray(payload.inputs[0].as_numpy(), dtype=np.float32))
        with torch.no_grad():
            probs = torch.softmax(self.net(x), dim=1).numpy().astype(np.float32)
        output = InferOutput(name="output-0", shape=list(probs.shape), datatype="FP32")
        output.set_data_from_numpy(probs, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[output], response_id=payload.id or generate_uuid())


class LoopbackRESTServer(kserve.model_server.RESTServer):  # type: ignore[name-defined,misc]
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = "127.0.0.1"


def main() -> None:
    port = int(sys.argv[1])
    models = [TorchModel(name, path) for name, path in (arg.split("=", 1) for arg in sys.argv[2:])]
    kserve.model_server.RESTServer = LoopbackRESTServer  # type: ignore[attr-defined]
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start(models)


if __name__ == "__main__":
    main()
