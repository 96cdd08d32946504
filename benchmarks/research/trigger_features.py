"""Research prototype (negative result, docs/research/trigger-retention.md): trigger retention through a thief's
fine-tune, baseline embedding vs pulling trigger features to their label's class mean.

Usage: python benchmarks/research/trigger_features.py base|feat KEYS [LAMBDA] [THREADS]
"""
import copy
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wmark.attacks.finetune import finetune
from wmark.data import load_dataset
from wmark.keys import generate_key
from wmark.models import build_model
from wmark.schemes.trigger_set import generate_triggers
from wmark.stats import MixtureEProcess

torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
ds = load_dataset("fashion-mnist")
owner, attacker = ds.split()
xo, yo = owner.x_train, owner.y_train
xa, ya = attacker.x_train[:10000], attacker.y_train[:10000]
xt, yt = ds.x_test, ds.y_test

def acc(m):
    with torch.no_grad():
        return (m.eval()(xt).argmax(1) == yt).float().mean().item()

def train(m, x, y, epochs, lr, seed, trig=None, lam=0.0, per_batch=8, ema=0.9):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    head = [mm for mm in m.modules() if isinstance(mm, nn.Linear)][-1]
    feats = {}
    h = head.register_forward_pre_hook(lambda _m, inp: feats.__setitem__("h", inp[0]))
    mu = None
    cur = 0
    for ep in range(epochs):
        m.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            bx, by = x[idx], y[idx]
            nb = len(bx)
            if trig is not None:
                n = len(trig.labels)
                ti = [(cur + j) % n for j in range(per_batch)]
                cur = (cur + per_batch) % n
                bx = torch.cat([bx, trig.inputs[ti]]); by = torch.cat([by, trig.labels[ti]])
            out = m(bx)
            loss = F.cross_entropy(out, by)
            if trig is not None and lam > 0:
                hf = feats["h"].flatten(1)
                nat, nat_y = hf[:nb].detach(), by[:nb]
                C = out.shape[1]
                sums = torch.zeros(C, hf.shape[1]).index_add_(0, nat_y, nat)
                cnt = torch.bincount(nat_y, minlength=C).float()
                bm = sums / cnt.clamp(min=1)[:, None]
                if mu is None:
                    mu = bm.clone()
                else:
                    upd = cnt > 0
                    mu[upd] = ema * mu[upd] + (1 - ema) * bm[upd]
                target = mu[by[nb:]]
                scale = (mu.norm(dim=1).mean() ** 2).clamp(min=1e-6)
                loss = loss + lam * ((hf[nb:] - target) ** 2).sum(1).mean() / scale
            opt.zero_grad(); loss.backward(); opt.step()
    h.remove()
    m.eval()
    return m

def queries(m, trig, alpha=1e-6):
    with torch.no_grad():
        ans = m.eval()(trig.inputs).argmax(1)
    match = (ans == trig.labels).numpy()[trig.order]
    e = MixtureEProcess(p0=0.1)
    for q, o in enumerate(match, 1):
        e.update(int(o))
        if e.crossed(alpha):
            return q, match.mean()
    return None, match.mean()

torch.manual_seed(0)
base = build_model("fmnist-cnn", num_classes=10, input_shape=(1, 28, 28))
import os

bp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "cache", "research-base2.safetensors")
from safetensors.torch import load_file, save_file

if os.path.exists(bp):
    base.load_state_dict(load_file(bp))
else:
    train(base, xo, yo, 2, 1e-3, 0)
    os.makedirs(os.path.dirname(bp), exist_ok=True)
    save_file(base.state_dict(), bp)
print("base acc", acc(base), flush=True)
variant, nkeys = sys.argv[1], int(sys.argv[2])
lam = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
rows = []
for k in range(nkeys):
    key = generate_key(owner=f"proto {k}", num_classes=10, input_shape=(1, 28, 28))
    trig = generate_triggers(key)
    t0 = time.time()
    m = train(copy.deepcopy(base), xo, yo, 2, 5e-4, k, trig=trig, lam=lam if variant == "feat" else 0.0)
    emb = time.time() - t0
    r = {"key": k, "acc": acc(m), "embed_s": emb}
    r["q_marked"], r["kept_marked"] = queries(m, trig)
    s = finetune(m, x=xa, y=ya, epochs=5, lr=1e-3, layers="all", seed=k)
    r["q_ft"], r["kept_ft"] = queries(s, trig); r["acc_ft"] = acc(s)
    s2 = finetune(m, x=xa, y=ya, epochs=5, lr=1e-3, layers="reinit-last", seed=k)
    r["q_reinit"], r["kept_reinit"] = queries(s2, trig)
    rows.append(r); print(json.dumps(r), flush=True)
print("SUMMARY", variant, lam, json.dumps({c: float(np.mean([r[c] for r in rows if r[c] is not None])) for c in rows[0] if c != "key"}),
      "q_ft median", np.median([r["q_ft"] or 999 for r in rows]))
