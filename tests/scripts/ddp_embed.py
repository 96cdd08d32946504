"""Embed the trigger set under DDP (run with torchrun --nproc_per_node=2): every rank derives the triggers itself.

Usage: torchrun --nproc_per_node=2 ddp_embed.py KEY OUT_MODEL OUT_JSON
"""

import gc
import hashlib
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from wmark.data import load_dataset
from wmark.embed import Watermarker
from wmark.io import save_model
from wmark.keys import load_key
from wmark.models import build_model


def main(key_path: str, out_model: str, out_json: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    key = load_key(key_path)
    ds = load_dataset("digits")
    model = DistributedDataParallel(build_model("fmnist-cnn", num_classes=10, input_shape=(1, 8, 8), seed=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    sampler = DistributedSampler(TensorDataset(ds.x_train, ds.y_train), seed=0)
    loader = DataLoader(TensorDataset(ds.x_train, ds.y_train), batch_size=32, sampler=sampler)
    wm = Watermarker(key, trigger_per_batch=4)
    model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=loader)
    digest = hashlib.sha256(wm.triggers.inputs.numpy().tobytes() + wm.triggers.labels.numpy().tobytes()).hexdigest()
    digests: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(15):
        sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    wm.detach()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(params) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, params)
    if rank == 0:
        save_model(model.module, out_model, metadata={**wm.metadata(), "arch": "fmnist-cnn", "num_classes": 10,
                                                      "input_shape": [1, 8, 8]})
        same = all(torch.equal(gathered[0], g) for g in gathered)
        with open(out_json, "w") as f:
            json.dump({"digests": digests, "ranks_in_sync": same}, f)
    # Leave together: a rank that tears gloo down while its peer is still writing aborts the peer. Release the
    # DDP wrapper (its reducer holds gloo work) before the group, not during interpreter shutdown.
    dist.barrier()
    del model, optimizer, loader
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
