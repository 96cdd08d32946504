"""Research benchmark (#20): trigger retention through a thief's fine-tune, embedding variants side by side.

Every variant embeds the SAME fresh keys (generated once per key index inside the process; labels stay
key-uniform, inputs key-derived) into the same base, with the same data order (seed = key index), then
suffers the same attacks: a 5-epoch fine-tune of all layers (10k attacker images, Adam 1e-3) and the same
with the head re-initialised. ``plain`` is the identical fine-tune without triggers: the fidelity and
wall-time reference, and a null panel (an unmarked model queried with each key's triggers).

Variants (knobs in ``VARIANTS``):
  base       the library's embedding: 8 triggers appended to each batch of 64, one cross-entropy.
  pb16       16 triggers per batch.                tw4   trigger samples' loss weighted 4x.
  ew<T>      exponential weighting (after Namba & Sakuma 2019): every conv/linear weight is
             reparameterised as w = u * exp(T (|u|/max|u| - 1)); training moves large weights faster and
             the trained w is what the thief gets. The latent u starts at the inverse of the base, so
             the embedding starts from the base's function.
  ewgrad<T>  only the trigger loss's gradient is weighted elementwise by exp(T |w|/max|w|) (mean 1).
  noise<s>   trigger loss on Gaussian-perturbed weights, sd s * rms(w) per tensor (Bansal et al. 2022).
  sam<r>     trigger loss on adversarially perturbed weights (SAM on the trigger batch), radius r*|w|.
  look<r>    trigger loss after a simulated fine-tune step: weights moved along the natural batch's
             descent direction by r*|w| (first-order lookahead). looksign<r>: the same along sign(-g),
             the direction of the thief's first Adam step.
  reserve<k> k of the head's input units kept silent on natural data (L1 on their activations) and an
             extra cross-entropy of the triggers through those units alone.
  lib-base, lib-look0.05
             the library's own loop (``Watermarker`` + ``train_epochs``, as ``api.embed``), mixing or with
             ``trigger_lookahead=0.05`` (sign direction, as looksign0.05): checks that the library option
             reproduces the prototype. (``lib-lookgrad0.05`` rows in the results: the library's earlier
             gradient-direction lookahead.)
  Third round (``--name research_trigger_robust3``):
  lookboth<r>   trigger loss half at the moved, half at the current weights.
  lookema<r>, lookadam<r>
                direction: sign of an EMA of the natural gradients, or Adam's m / sqrt(v) of them.
  lookrand<r>   radius drawn uniformly in [0, 2r] each step.
  ...e3, ...e4  3 or 4 embedding epochs (``plain3``/``plain4`` and ``lib-plain4`` are their unmarked twins:
                every variant's cost and time are measured against the unmarked run of the same loop and length).
  lib-basee4, lib-look0.05e4
                the library's loop for 4 epochs, mixing or with lookahead 0.05 (8 triggers per step).
  lib-look0.05e4pb4   the same with 4 triggers per step (the library's default with lookahead).
  lib-look0.05e4every2
                the trigger pass on every other step only, weighted twice.

Usage: python benchmarks/research/trigger_robust.py [--quick] [--keys 10] [--first 0] [--variants a,b]
       [--no-reinit] [--key-dir DIR] [--threads 1] [--part NAME]
       [--name research_trigger_robust3] (one part per process; ``--merge NAME,NAME`` joins parts; ``--timing``
       times the embeddings interleaved, ``--timing-variants`` picks them; about 25 s per key, variant and 2
       epochs on an idle 2-core machine)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from wmark.attacks.finetune import finetune, last_linear
from wmark.data import load_dataset
from wmark.keys import generate_key, load_key, save_key
from wmark.models import build_model
from wmark.schemes.trigger_lookahead import LookaheadTriggerStep
from wmark.schemes.trigger_set import TriggerSet, generate_triggers
from wmark.stats import MixtureEProcess

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
ALPHA = 1e-6

VARIANTS: dict[str, dict[str, float]] = {
    "plain": {"unmarked": 1},
    "base": {},
    "pb16": {"per_batch": 16},
    "tw4": {"tw": 4.0},
    "ew2": {"ew": 2.0},
    "ewgrad2": {"ewgrad": 2.0},
    "noise0.1": {"noise": 0.1},
    "noise0.3": {"noise": 0.3},
    "sam0.05": {"sam": 0.05},
    "look0.05": {"look": 0.05},
    "look0.1": {"look": 0.1},
    "look0.2": {"look": 0.2},
    "look0.03": {"look": 0.03},
    "looksign0.05": {"look": 0.05, "sign": 1},
    "reserve16": {"reserve": 16},
    "lookboth0.05": {"look": 0.05, "sign": 1, "both": 1},
    "lookema0.05": {"look": 0.05, "sign": 1, "ema": 0.9},
    "lookadam0.05": {"look": 0.05, "adam": 1},
    "lookrand0.05": {"look": 0.05, "sign": 1, "rand": 1},
    "looksign0.07": {"look": 0.07, "sign": 1},
    "lookboth0.07": {"look": 0.07, "sign": 1, "both": 1},
    "lookboth0.1": {"look": 0.1, "sign": 1, "both": 1},
    "plain3": {"unmarked": 1, "epochs": 3},
    "looksign0.05e3": {"look": 0.05, "sign": 1, "epochs": 3},
    "basee3": {"epochs": 3},
    "lookboth0.05e3": {"look": 0.05, "sign": 1, "both": 1, "epochs": 3},
    "plain4": {"unmarked": 1, "epochs": 4},
    "looksign0.05e4": {"look": 0.05, "sign": 1, "epochs": 4},
    # The library's own loop (Watermarker.attach + train_epochs, as api.embed runs it), to check the option.
    "lib-base": {"lib": 1},
    "lib-look0.05": {"lib": 1, "look": 0.05},
    "lib-plain4": {"lib": 1, "unmarked": 1, "epochs": 4},
    "lib-basee4": {"lib": 1, "epochs": 4},
    "lib-look0.05e4": {"lib": 1, "look": 0.05, "epochs": 4},
    "lib-look0.05e4every2": {"lib": 1, "look": 0.05, "epochs": 4, "every": 2},
    "lib-look0.05e4pb4": {"lib": 1, "look": 0.05, "epochs": 4, "per_batch": 4},
}


class EveryStep(LookaheadTriggerStep):
    """The library's lookahead step with its trigger pass on every ``every``-th step only, weighted ``every`` times."""

    def __init__(self, *, every: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every = every
        self.steps = 0

    def add_gradient(self, *, weight: float) -> None:
        if all(p.grad is None for p in self.model.parameters()):
            return
        self.steps += 1
        if (self.steps - 1) % self.every == 0:
            super().add_gradient(weight=weight * self.every)


def embed_library(model: nn.Module, x: torch.Tensor, y: torch.Tensor, key: Any, cfg: dict[str, float], seed: int,
                  *, epochs: int = 2, lr: float = 5e-4) -> float:
    """Embed through ``Watermarker`` exactly as ``api.embed`` does; returns the loop's wall seconds."""
    from wmark.embed import Watermarker
    from wmark.training import make_loader, train_epochs

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = make_loader(x, y, batch_size=64, seed=seed)
    every = int(cfg.get("every", 1))

    class Marker(Watermarker):
        def lookahead_step(self, model: nn.Module) -> LookaheadTriggerStep:
            step = super().lookahead_step(model)
            if every == 1:
                return step
            return EveryStep(every=every, model=model, triggers=step.triggers, radius=step.radius,
                             per_batch=step.per_batch, input_key=step.input_key)

    wm = None if cfg.get("unmarked") else Marker(key, trigger_lookahead=cfg.get("look", 0.0),
                                                 trigger_per_batch=int(cfg.get("per_batch", 8)))
    if wm is not None:
        model, opt, loader = wm.attach(model=model, optimizer=opt, data_loader=loader)
    start = time.perf_counter()
    try:
        train_epochs(model, loader, epochs=epochs, optimizer=opt)
    finally:
        if wm is not None:
            wm.detach()
    return time.perf_counter() - start


def accuracy(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((m.eval()(x).argmax(1) == y).float().mean())


def queries(m: nn.Module, trig: TriggerSet) -> tuple[int | None, float]:
    """Label-only queries until the library's sequential test (mixture e-process) crosses 1/alpha."""
    with torch.no_grad():
        ans = m.eval()(trig.inputs).argmax(1)
    match = (ans == trig.labels).numpy()[trig.order]
    e = MixtureEProcess(p0=1.0 / trig.num_classes)
    for q, o in enumerate(match, 1):
        e.update(int(o))
        if e.crossed(ALPHA):
            return q, float(match.mean())
    return None, float(match.mean())


def _ew_inverse(a: torch.Tensor, t: float) -> torch.Tensor:
    """u in [0, 1] with u * exp(t (u - 1)) = a (monotone, so bisection)."""
    lo, hi = torch.zeros_like(a), torch.ones_like(a)
    for _ in range(40):
        mid = (lo + hi) / 2
        big = mid * torch.exp(t * (mid - 1)) > a
        hi, lo = torch.where(big, mid, hi), torch.where(big, lo, mid)
    return (lo + hi) / 2


def _ew(u: torch.Tensor, t: float) -> torch.Tensor:
    scale = u.detach().abs().max().clamp(min=1e-12)
    return u * torch.exp(t * (u.abs() / scale - 1))


def embed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trig: TriggerSet | None, cfg: dict[str, float],
          seed: int, *, epochs: int = 2, lr: float = 5e-4, batch: int = 64) -> float:
    """Train ``model`` in place (triggers mixed in unless ``trig`` is None); returns the loop's wall seconds."""
    torch.manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(10_000 + seed)
    per_batch = int(cfg.get("per_batch", 8))
    tw = float(cfg.get("tw", 1.0))
    params = dict(model.named_parameters())
    weights = [n for n, p in params.items() if p.dim() > 1]
    ew_t = cfg.get("ew")
    if ew_t:
        latent = {}
        for n, p in params.items():
            if p.dim() > 1:
                scale = p.detach().abs().max()
                latent[n] = nn.Parameter(torch.sign(p.detach()) * scale * _ew_inverse(p.detach().abs() / scale, ew_t))
            else:
                latent[n] = p
        opt = torch.optim.Adam(latent.values(), lr=lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    head = last_linear(model)
    feats: dict[str, torch.Tensor] = {}
    hook = head.register_forward_pre_hook(lambda _m, inp: feats.__setitem__("h", inp[0])) if cfg.get("reserve") else None
    reserved = torch.randperm(head.in_features, generator=torch.Generator().manual_seed(20_000 + seed))[
        : int(cfg.get("reserve", 0))]
    cursor = 0
    moments: dict[str, list[torch.Tensor]] = {}
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=order_gen)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            bx, by = x[idx], y[idx]
            nb = len(bx)
            if trig is None:
                loss = F.cross_entropy(model(bx), by)
                opt.zero_grad()
                loss.backward()
                opt.step()
                continue
            ti = [(cursor + j) % len(trig) for j in range(per_batch)]
            cursor = (cursor + per_batch) % len(trig)
            tx, ty = trig.inputs[ti], trig.labels[ti]
            nt, tot = len(tx), nb + per_batch
            opt.zero_grad()
            if ew_t:
                eff = {n: (_ew(u, ew_t) if n in weights else u) for n, u in latent.items()}
                out = functional_call(model, eff, (torch.cat([bx, tx]),))
                loss = F.cross_entropy(out, torch.cat([by, ty]))
                loss.backward()
            elif cfg.get("look"):
                (nb / tot * F.cross_entropy(model(bx), by)).backward()
                radius = cfg["look"]
                if cfg.get("rand"):
                    radius = float(torch.rand((), generator=noise_gen)) * 2 * cfg["look"]
                pert = {}
                for n, p in params.items():
                    g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                    if cfg.get("ema") or cfg.get("adam"):
                        beta = cfg.get("ema") or 0.9
                        m1 = moments.setdefault(n, [torch.zeros_like(p), torch.zeros_like(p)])
                        m1[0].mul_(beta).add_(g, alpha=1 - beta)
                        m1[1].mul_(0.999).add_(g * g, alpha=0.001)
                        g = m1[0] / (m1[1].sqrt() + 1e-8) if cfg.get("adam") else m1[0]
                    if cfg.get("sign"):
                        g = torch.sign(g)  # Adam's first step: every coordinate moves alike
                    pert[n] = p - (radius * p.detach().norm() * g / g.norm().clamp(min=1e-12))
                share = 0.5 if cfg.get("both") else 1.0
                (share * tw * nt / tot * F.cross_entropy(functional_call(model, pert, (tx,)), ty)).backward()
                if cfg.get("both"):
                    (share * tw * nt / tot * F.cross_entropy(model(tx), ty)).backward()
            elif cfg.get("noise") or cfg.get("sam") or cfg.get("ewgrad"):
                if cfg.get("noise"):
                    pert = {n: p + cfg["noise"] * p.detach().pow(2).mean().sqrt()
                            * torch.randn(p.shape, generator=noise_gen) for n, p in params.items()}
                elif cfg.get("sam"):
                    lt = F.cross_entropy(functional_call(model, params, (tx,)), ty)
                    grads = torch.autograd.grad(lt, list(params.values()))
                    pert = {n: p + (cfg["sam"] * p.detach().norm() * g / g.norm().clamp(min=1e-12))
                            for (n, p), g in zip(params.items(), grads)}
                else:
                    pert = {}
                    for n, p in params.items():
                        if p.dim() > 1:
                            s = torch.exp(cfg["ewgrad"] * p.detach().abs() / p.detach().abs().max())
                            s = s / s.mean()
                            pert[n] = p * s + (p * (1 - s)).detach()
                        else:
                            pert[n] = p
                loss = (nb * F.cross_entropy(model(bx), by)
                        + tw * nt * F.cross_entropy(functional_call(model, pert, (tx,)), ty)) / tot
                loss.backward()
            else:
                out = model(torch.cat([bx, tx]))
                w = torch.cat([torch.ones(nb), torch.full((nt,), tw)])
                loss = (F.cross_entropy(out, torch.cat([by, ty]), reduction="none") * w).sum() / tot
                if cfg.get("reserve"):
                    h = feats["h"]
                    loss = loss + h[:nb, reserved].mean() * len(reserved)
                    aux = F.linear(h[nb:, reserved], head.weight[:, reserved], head.bias)
                    loss = loss + nt / tot * F.cross_entropy(aux, ty)
                loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    if ew_t:
        with torch.no_grad():
            for n in weights:
                params[n].copy_(_ew(latent[n], ew_t))
    if hook is not None:
        hook.remove()
    model.eval()
    return seconds


def base_model(xo: torch.Tensor, yo: torch.Tensor) -> nn.Module:
    """The unmarked 2-epoch base every variant starts from (cached, same as trigger_features.py)."""
    torch.manual_seed(0)
    m = build_model("fmnist-cnn", num_classes=10, input_shape=(1, 28, 28))
    path = HERE.parent / "cache" / "research-base2.safetensors"
    if path.exists():
        m.load_state_dict(load_file(str(path)))
    else:
        embed(m, xo, yo, None, {}, 0, epochs=2, lr=1e-3)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(m.state_dict(), str(path))
    return m


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    ds = load_dataset("fashion-mnist")
    owner, attacker = ds.split()
    xo, yo = owner.x_train, owner.y_train
    xa, ya = attacker.x_train[:10_000], attacker.y_train[:10_000]
    xt, yt = ds.x_test, ds.y_test
    base = base_model(xo, yo)
    print(f"base acc {accuracy(base, xt, yt):.4f}", flush=True)
    rows = []
    for k in range(args.first, args.first + args.keys):
        # One fresh key per index, shared by every variant: retention depends on the key.
        key_path = Path(args.key_dir) / f"robust-{k}.key" if args.key_dir else None
        if key_path is not None and key_path.exists():
            key = load_key(key_path)
        else:
            key = generate_key(owner=f"robust {k}", num_classes=10, input_shape=(1, 28, 28))
            if key_path is not None:
                key_path.parent.mkdir(parents=True, exist_ok=True)
                save_key(key, key_path)
        trig = generate_triggers(key)
        for name in args.variants.split(","):
            cfg = VARIANTS[name]
            m = copy.deepcopy(base)
            if cfg.get("lib"):
                secs = embed_library(m, xo, yo, key, cfg, k, epochs=int(cfg.get("epochs", 2)))
            else:
                secs = embed(m, xo, yo, None if cfg.get("unmarked") else trig, cfg, k, epochs=int(cfg.get("epochs", 2)))
            r: dict[str, Any] = {"key": k, "variant": name, "acc": accuracy(m, xt, yt), "embed_s": secs}
            r["q_marked"], r["kept_marked"] = queries(m, trig)
            if not cfg.get("unmarked"):
                s = finetune(m, x=xa, y=ya, epochs=5, lr=1e-3, layers="all", seed=k)
                r["q_ft"], r["kept_ft"] = queries(s, trig)
                r["acc_ft"] = accuracy(s, xt, yt)
                if not (args.quick or args.no_reinit):
                    s2 = finetune(m, x=xa, y=ya, epochs=5, lr=1e-3, layers="reinit-last", seed=k)
                    r["q_reinit"], r["kept_reinit"] = queries(s2, trig)
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """Embedding wall time, variants interleaved round by round so that a shared machine's load hits all alike.

    ``lib-*`` rows time the library's own loop (``api.embed``'s: ``Watermarker.attach`` + ``train_epochs``).
    """
    from wmark.embed import Watermarker
    from wmark.training import make_loader, train_epochs

    ds = load_dataset("fashion-mnist")
    owner, _ = ds.split()
    x, y = owner.x_train[:6400], owner.y_train[:6400]
    base = base_model(owner.x_train, owner.y_train)
    key = generate_key(owner="robust timing", num_classes=10, input_shape=(1, 28, 28))
    trig = generate_triggers(key)
    names = args.timing_variants.split(",")
    secs: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            m = copy.deepcopy(base)
            if not name.startswith("lib-"):
                cfg = VARIANTS[name]
                secs[name].append(embed(m, x, y, None if cfg.get("unmarked") else trig, cfg, rep, epochs=1))
                continue
            opt = torch.optim.Adam(m.parameters(), lr=5e-4)
            loader = make_loader(x, y, batch_size=64, seed=rep)
            wm = None
            if name != "lib-plain":
                cfg = VARIANTS[name]
                wm = Watermarker(key, trigger_lookahead=cfg.get("look", 0.0), trigger_per_batch=int(cfg.get("per_batch", 8)))
                m, opt, loader = wm.attach(model=m, optimizer=opt, data_loader=loader)
            start = time.perf_counter()
            train_epochs(m, loader, epochs=1, optimizer=opt)
            secs[name].append(time.perf_counter() - start)
            if wm is not None:
                wm.detach()
        print(json.dumps({n: round(v[-1], 2) for n, v in secs.items()}), flush=True)
    ratio = {n: float(np.median([a / b for a, b in zip(secs[n], secs["lib-plain" if n.startswith("lib-") else "plain"])]))
             for n in names}
    return {"steps_per_run": len(x) // 64, "reps": args.reps, "seconds": secs, "ratio_to_plain_median": ratio}


def _plain_of(name: str) -> tuple[bool, int]:
    """The unmarked comparator of a variant: the same loop (prototype or library) for the same epochs."""
    cfg = VARIANTS[name]
    return bool(cfg.get("lib")), int(cfg.get("epochs", 2))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: retention, queries, misses, fidelity and time against its unmarked twin on the same keys."""
    plains: dict[tuple[bool, int], dict[int, dict[str, Any]]] = {}
    for r in rows:
        if VARIANTS[r["variant"]].get("unmarked"):
            plains.setdefault(_plain_of(r["variant"]), {})[r["key"]] = r
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        s: dict[str, Any] = {"variant": name, "keys": len(rs), "acc_mean": float(np.mean([r["acc"] for r in rs]))}
        plain = plains.get(_plain_of(name), {})
        if VARIANTS[name].get("unmarked"):
            s["null_kept_mean"] = float(np.mean([r["kept_marked"] for r in rs]))
            s["null_detected"] = sum(r["q_marked"] is not None for r in rs)
            out.append(s)
            continue
        if plain:
            s["acc_cost_pp"] = float(np.mean([100 * (plain[r["key"]]["acc"] - r["acc"]) for r in rs if r["key"] in plain]))
            s["time_ratio_median"] = float(np.median([r["embed_s"] / plain[r["key"]]["embed_s"] for r in rs
                                                      if r["key"] in plain]))
        kept = np.array([r["kept_ft"] for r in rs])
        qs = [r["q_ft"] for r in rs]
        s.update(kept_ft_mean=float(kept.mean()), kept_ft_min=float(kept.min()), kept_ft_max=float(kept.max()),
                 q_ft_median=float(np.median([q if q is not None else np.inf for q in qs])),
                 q_ft_worst=max((q for q in qs if q is not None), default=None),
                 missed=sum(q is None for q in qs), marked_kept_mean=float(np.mean([r["kept_marked"] for r in rs])))
        if "kept_reinit" in rs[0]:
            s["kept_reinit_mean"] = float(np.mean([r["kept_reinit"] for r in rs]))
            s["reinit_detected"] = sum(r["q_reinit"] is not None for r in rs)
        if "base" in {r["variant"] for r in rows} and name != "base":
            b = {r["key"]: r["kept_ft"] for r in rows if r["variant"] == "base"}
            s["better_than_base_keys"] = sum(r["kept_ft"] > b[r["key"]] for r in rs if r["key"] in b)
        out.append(s)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(c for s in summary for c in s))
    lines = [" | ".join(cols)]
    for s in summary:
        lines.append(" | ".join(f"{s[c]:.3f}" if isinstance(s.get(c), float) else str(s.get(c, "")) for c in cols))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 keys, no head re-init attack")
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--no-reinit", action="store_true", help="skip the head re-init attack")
    parser.add_argument("--first", type=int, default=0, help="first key index (to split keys across processes)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--key-dir", default=None, help="keep the fresh keys here (outside the repository) so a "
                        "later run can add variants on the same keys")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--part", default=None, help="write rows to results/research_trigger_robust_<part>.json")
    parser.add_argument("--merge", default=None, help="comma-separated parts to join into the results file")
    parser.add_argument("--name", default="research_trigger_robust")
    parser.add_argument("--timing", action="store_true", help="only time the embeddings, interleaved")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--timing-variants", default="lib-plain,lib-base,lib-look0.05",
                        help="what --timing compares (include plain / lib-plain, the references of the ratios)")
    args = parser.parse_args()
    if args.timing:
        torch.set_num_threads(args.threads)
        result = timing(args)
        print(json.dumps(result["ratio_to_plain_median"], indent=1))
        (RESULTS / f"{args.name}_timing.json").write_text(json.dumps(
            {"machine": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                         "cpus": os.cpu_count(), "threads": args.threads}, **result}, indent=1))
        return
    if args.merge:
        rows = [r for p in args.merge.split(",")
                for r in json.loads((RESULTS / f"{args.name}_{p}.json").read_text())["rows"]]
    else:
        torch.set_num_threads(args.threads)
        if args.quick:
            args.keys = min(args.keys, 3)
        rows = run(args)
    summary = summarise(rows)
    print(table(summary))
    name = f"{args.name}_{args.part}" if args.part else args.name
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "cpus": os.cpu_count(), "alpha": ALPHA, "variants": {v: VARIANTS.get(v, {}) for v in {r["variant"] for r in rows}},
            "argv": sys.argv[1:]}
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": meta, "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {RESULTS / (name + '.json')}")


if __name__ == "__main__":
    main()
