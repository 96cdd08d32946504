"""The triggers weigh the same in a plain loop, the Hugging Face Trainer and the Lightning Trainer.

One optimizer step of the same float64 model on the same data, with and without gradient accumulation, through
each path: the parameter updates must agree to rounding. SGD without momentum or weight decay, no clipping, no
dropout, and a step that covers the whole data set (so the Trainer's shuffling only reorders a sum).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from keykit import seeded_key

from wmark.embed import Watermarker

LR = 0.5
BATCH = 4
SETTINGS = {"lookahead": {"trigger_lookahead": 0.05}, "margin": {"trigger_lookahead": 0.0, "trigger_margin": 50.0},
            "mixing": {"trigger_mixing": True}}


class _Net(torch.nn.Module):
    """A linear classifier in the Hugging Face manner: a named input, and a loss when given labels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 4).double()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.fc(pixel_values.flatten(1))
        return {"logits": logits, "loss": None if labels is None else F.cross_entropy(logits, labels)}


def _watermarker(setting: str) -> Watermarker:
    key = seeded_key("trigger-share", num_classes=4, input_shape=(1, 8, 8), num_triggers=8)
    return Watermarker(key, schemes=("trigger",), trigger_per_batch=3, **SETTINGS[setting])


def _data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(steps)
    return torch.rand(BATCH * steps, 1, 8, 8, dtype=torch.float64, generator=gen), torch.randint(0, 4, (BATCH * steps,),
                                                                                              generator=gen)


def _update(net: _Net, train: Any) -> torch.Tensor:
    """Train ``net`` by ``train(net)`` and return how far its parameters moved."""
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    train(net)
    return torch.cat([p.detach().flatten() for p in net.parameters()]) - before


def _plain(net: _Net, wm: Watermarker | None, steps: int) -> None:
    x, y = _data(steps)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    loader: Any = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=BATCH, shuffle=False)
    if wm is not None:
        # Mixed triggers join every batch, so attach takes no accumulation for them.
        _, _, loader = wm.attach(model=net, optimizer=optimizer, data_loader=loader,
                                 accumulation_steps=steps if wm.trigger_step else 1)
    for bx, by in loader:
        (F.cross_entropy(net(bx)["logits"], by) / steps).backward()
    optimizer.step()
    if wm is not None:
        wm.detach()


def _hf(net: _Net, wm: Watermarker | None, steps: int, tmp_path, clip: float = 0.0) -> None:
    from transformers import Trainer, TrainingArguments

    from wmark.integrations.hf import WatermarkCallback

    x, y = _data(steps)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                             max_steps=1, per_device_train_batch_size=BATCH, gradient_accumulation_steps=steps,
                             learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=clip)
    train = [{"pixel_values": x[i], "labels": y[i]} for i in range(len(x))]
    Trainer(model=net, args=args, train_dataset=train,  # type: ignore[arg-type]
            optimizers=(torch.optim.SGD(net.parameters(), lr=LR), None),
            callbacks=[] if wm is None else [WatermarkCallback(wm)]).train()


def _lightning(net: _Net, wm: Watermarker, steps: int, clip: float | None = None) -> None:
    import lightning as L

    from wmark.integrations.lightning import WatermarkCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.net(pixel_values)["logits"]

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    x, y = _data(steps)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=steps, precision="64-true", accelerator="cpu", devices=1,
                        gradient_clip_val=clip, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[WatermarkCallback(wm)])
    trainer.fit(Module(), torch.utils.data.DataLoader(list(zip(x, y)), batch_size=BATCH, shuffle=False))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_one_step_moves_the_weights_alike_in_a_plain_loop_the_hf_trainer_and_lightning(tmp_path, setting, steps):
    """Lightning weighed the trigger loss 1 (a whole batch's worth) whatever the batch size or accumulation; the
    plain loop and the HF Trainer weigh the step's triggers as ``trigger_per_batch`` of its samples. Mixed triggers
    reach the HF Trainer through its dataset (``wrap_dataset``, their share set by ``repeats``), so only the plain
    loop and Lightning mix them per batch."""
    plain = _update(_Net(), lambda net: _plain(net, _watermarker(setting), steps))
    unmarked = _update(_Net(), lambda net: _plain(net, None, steps))
    assert (plain - unmarked).abs().max() > 1e-3  # the triggers moved the weights
    paths = {"lightning": _update(_Net(), lambda net: _lightning(net, _watermarker(setting), steps))}
    if setting != "mixing":
        paths["hf"] = _update(_Net(), lambda net: _hf(net, _watermarker(setting), steps, tmp_path))
    for name, update in paths.items():
        torch.testing.assert_close(update, plain, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_gradient_clipping_bounds_the_trigger_gradient_in_lightning_but_not_in_the_hf_trainer(tmp_path):
    """Lightning clips after ``on_before_optimizer_step``, so the clipped gradient includes the triggers'; the HF
    Trainer clips before ``optimizer.step()``, whose pre-hook then adds the trigger gradient unclipped. Documented
    in docs/trigger-embedding.md; this pins it so a change of either framework's order is noticed."""
    clip = 1e-3
    # "margin": a trigger pass of their own at the current weights (no lookahead), so its gradient is comparable
    mark = "margin"
    triggers = _update(_Net(), lambda net: _plain(net, _watermarker(mark), 1)) - \
        _update(_Net(), lambda net: _plain(net, None, 1))
    lightning = _update(_Net(), lambda net: _lightning(net, _watermarker(mark), 1, clip=clip))
    hf = _update(_Net(), lambda net: _hf(net, _watermarker(mark), 1, tmp_path, clip=clip))
    hf_natural = _update(_Net(), lambda net: _hf(net, None, 1, tmp_path, clip=clip))
    assert triggers.norm() > 100 * LR * clip  # clipping would change the trigger gradient
    torch.testing.assert_close(lightning.norm(), torch.tensor(LR * clip, dtype=lightning.dtype), rtol=1e-3, atol=0)
    torch.testing.assert_close(hf_natural.norm(), torch.tensor(LR * clip, dtype=hf.dtype), rtol=1e-3, atol=0)
    torch.testing.assert_close(hf - hf_natural, triggers, rtol=1e-9, atol=1e-12)


def test_a_batchs_samples_are_counted_by_its_labels_or_first_tensor_and_a_batch_without_either_is_refused():
    """Lightning hands the callback the user's batch, whose size the triggers are weighed against."""
    from wmark.errors import UsageError
    from wmark.integrations.common import natural_batch_size

    assert natural_batch_size((torch.rand(5, 3), torch.zeros(5)), label_key="labels") == 5
    assert natural_batch_size({"mask": torch.ones(7, 2), "labels": torch.zeros(6)}, label_key="labels") == 6
    assert natural_batch_size({"image": torch.rand(3, 1, 8, 8), "y": torch.zeros(3)}, label_key="labels") == 3
    assert natural_batch_size(torch.rand(2, 4), label_key="labels") == 2
    assert natural_batch_size((["a text", "another", "a third"], [0, 1, 0]), label_key="labels") == 3
    with pytest.raises(UsageError, match=r"^The training batch holds neither labels nor a tensor to count its samples "
                                         r"by; give batches as \(inputs, labels\) pairs or dicts holding the labels\.$"):
        natural_batch_size(["a text", "another"], label_key="labels")


@pytest.mark.parametrize("setting", ["lookahead", "margin"])
@pytest.mark.parametrize("steps,batches", [(2, 1), (3, 2)])
def test_the_hf_trainers_short_last_accumulation_window_keeps_the_trigger_share(tmp_path, setting, steps, batches):
    """An epoch of fewer micro-batches than ``gradient_accumulation_steps`` is one short window, whose losses the
    Trainer divides by the micro-batches it holds (``len(batch_samples)``), not by the accumulation steps. The
    triggers were weighed against the full window's samples, so they got ``batches / steps`` of their share there;
    they must weigh as in a plain loop accumulating that window's batches."""
    x, y = _data(batches)
    plain = _update(_Net(), lambda net: _plain(net, _watermarker(setting), batches))

    def hf(net: _Net) -> None:
        from transformers import Trainer, TrainingArguments

        from wmark.integrations.hf import WatermarkCallback

        args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], save_strategy="no",
                                 logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
                                 disable_tqdm=True, num_train_epochs=1, per_device_train_batch_size=BATCH,
                                 gradient_accumulation_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                                 weight_decay=0.0, max_grad_norm=0.0)
        train = [{"pixel_values": x[i], "labels": y[i]} for i in range(len(x))]
        trainer = Trainer(model=net, args=args, train_dataset=train,  # type: ignore[arg-type]
                          optimizers=(torch.optim.SGD(net.parameters(), lr=LR), None),
                          callbacks=[WatermarkCallback(_watermarker(setting))])
        trainer.train()
        assert trainer.state.global_step == 1  # the one window of the epoch, short

    torch.testing.assert_close(_update(_Net(), hf), plain, rtol=1e-9, atol=1e-12)
