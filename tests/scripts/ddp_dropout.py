"""Train a dropout model under DDP with the watermark attached, ranks seeded differently (torchrun
--nproc_per_node=2); write the largest parameter difference between the ranks after every step.

Usage: torchrun --nproc_per_node=2 ddp_dropout.py KEY OUT_JSON
"""

import gc
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from wmark.embed import Watermarker
from wmark.keys import load_key
from wmark.training import make_loader

SETTINGS = {"lookahead": {}, "margin": {"trigger_lookahead": 0.0, "trigger_margin": 1.0},
            "mixing": {"trigger_mixing": True}}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(32, 10))


def _drift(key, rank: int, settings: dict) -> list[float]:
    model = DistributedDataParallel(_model())
    torch.manual_seed(1000 + rank)  # as launches that seed each rank by its rank do
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
    y = x.flatten(1)[:, :10].argmax(1)
    wm = Watermarker(key, trigger_per_batch=4, **settings)
    model, optimizer, loader = wm.attach(model=model, optimizer=optimizer,
                                         data_loader=make_loader(x, y, batch_size=16, seed=rank))
    drift = []
    for bx, by in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(bx), by).backward()
        optimizer.step()
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.zeros_like(params) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, params)
        drift.append(max(float((g - gathered[0]).abs().max()) for g in gathered))
    wm.detach()
    del model, optimizer
    gc.collect()
    return drift


def main(key_path: str, out_json: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    key = load_key(key_path)
    report = {name: _drift(key, rank, settings) for name, settings in SETTINGS.items()}
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(report, f)
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
