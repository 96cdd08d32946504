import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from keykit import seeded_key

from wmark.embed import Watermarker
from wmark.errors import UsageError
from wmark.schemes.trigger_lookahead import DEFAULT_LOOKAHEAD, LookaheadTriggerStep
from wmark.schemes.trigger_set import generate_triggers
from wmark.suspects import LocalSuspect
from wmark.training import make_loader
from wmark.verify import trigger_set_test, verify_blackbox


def _tiny(batchnorm: bool = False) -> torch.nn.Module:
    layers: list[torch.nn.Module] = [torch.nn.Flatten(), torch.nn.Linear(64, 48)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(48))
    return torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Linear(48, 10))


def _train_with_lookahead(key, radius: float = 0.05, epochs: int = 30,
                          margin: float | None = None) -> tuple[torch.nn.Module, list[int]]:
    torch.manual_seed(0)
    model = _tiny()
    x = torch.rand(256, 1, 8, 8)
    y = x.flatten(1)[:, :10].argmax(1)  # a learnable natural task: which of the first ten pixels is brightest
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    wm = Watermarker(key, trigger_lookahead=radius, trigger_per_batch=8, trigger_margin=margin)
    model, optimizer, loader = wm.attach(model=model, optimizer=optimizer,
                                         data_loader=make_loader(x, y, batch_size=32, seed=0))
    sizes = []
    for _ in range(epochs):
        for bx, by in loader:
            sizes.append(len(bx))
            optimizer.zero_grad()
            F.cross_entropy(model(bx), by).backward()
            optimizer.step()
    wm.detach()
    return model.eval(), sizes


def test_lookahead_learns_the_triggers_without_mixing_them_into_batches() -> None:
    # A fixed key: over random keys this tiny setup learns 82-98 % of the 40 triggers.
    key = seeded_key("lookahead/learns", num_classes=10, input_shape=(1, 8, 8), num_triggers=40)
    model, sizes = _train_with_lookahead(key)
    assert set(sizes) == {32}  # the user's batches pass through unchanged
    triggers = generate_triggers(key)
    with torch.no_grad():
        learnt = (model(triggers.inputs).argmax(1) == triggers.labels).float().mean().item()
    assert learnt >= 0.8
    verdict = verify_blackbox(key=key, suspect=LocalSuspect(model, input_shape=(1, 8, 8), expose_scores=False))
    assert verdict.decision == "detected" and verdict.to_dict()["log10_p"] <= -6


def test_a_margin_without_lookahead_learns_the_triggers_in_their_own_pass() -> None:
    key = seeded_key("lookahead/learns", num_classes=10, input_shape=(1, 8, 8), num_triggers=40)
    model, sizes = _train_with_lookahead(key, radius=0.0, margin=3.0)
    assert set(sizes) == {32}
    triggers = generate_triggers(key)
    with torch.no_grad():
        logits = model(triggers.inputs)
    assert (logits.argmax(1) == triggers.labels).float().mean().item() >= 0.8  # as with lookahead, this key


def test_the_hook_adds_the_trigger_gradient_at_the_looked_ahead_weights_and_restores_everything(digits_key) -> None:
    torch.manual_seed(1)
    model = _tiny(batchnorm=True).train()
    triggers = generate_triggers(digits_key)
    step = LookaheadTriggerStep(model=model, triggers=triggers, radius=0.1, per_batch=4)
    step.batch_size = 16
    F.cross_entropy(model(torch.rand(16, 1, 8, 8)), torch.randint(0, 10, (16,))).backward()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    natural = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    expected_model = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in expected_model.named_parameters():
            p.sub_(natural[n].sign() * (0.1 * p.norm() / natural[n].sign().norm()))
    expected_model.eval()  # batch norms on their running statistics, as the triggers meet them at inference
    loss = F.cross_entropy(expected_model(triggers.inputs[:4]), triggers.labels[:4]) * (4 / 16)
    expected = dict(zip(params, torch.autograd.grad(loss, list(expected_model.parameters()))))

    step.hook(torch.optim.SGD(model.parameters(), lr=0.1), (), {})
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n])
        torch.testing.assert_close(p.grad, natural[n] + expected[n])
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n])
    # The next step uses the next triggers of the key's cycle.
    assert step._next_indices() == [4, 5, 6, 7]


def test_a_margin_drops_the_loss_of_triggers_already_learnt_at_the_looked_ahead_weights() -> None:
    torch.manual_seed(2)
    model = _tiny()
    # a fixed key: with a fresh one, 15 steps sometimes leave every margin negative and the cut below 0
    key = seeded_key("lookahead/margin", num_classes=10, input_shape=(1, 8, 8), num_triggers=40)
    triggers = generate_triggers(key)
    teach = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(15):  # learn the first four triggers, each to its own positive margin
        teach.zero_grad()
        F.cross_entropy(model(triggers.inputs[:4]), triggers.labels[:4]).backward()
        teach.step()
    model.zero_grad()
    F.cross_entropy(model(torch.rand(16, 1, 8, 8)), torch.randint(0, 10, (16,))).backward()
    natural = {n: p.grad.clone() for n, p in model.named_parameters()}
    ahead = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in ahead.named_parameters():
            p.sub_(natural[n].sign() * (0.05 * p.norm() / natural[n].sign().norm()))
        logits = ahead(triggers.inputs[:4])
    true = logits.gather(1, triggers.labels[:4, None]).squeeze(1)
    margins = true - logits.scatter(1, triggers.labels[:4, None], float("-inf")).amax(1)
    # A margin between the four triggers' own: only those below it count, still divided by 4.
    cut = float(margins.sort().values[1:3].mean())
    keep = margins < cut
    assert 0 < int(keep.sum()) < 4
    loss = F.cross_entropy(ahead(triggers.inputs[:4])[keep], triggers.labels[:4][keep], reduction="sum") / 4
    expected = dict(zip(natural, torch.autograd.grad(loss, list(ahead.parameters()))))

    step = LookaheadTriggerStep(model=model, triggers=triggers, radius=0.05, per_batch=4, margin=cut)
    step.add_gradient(weight=1.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, natural[n] + expected[n])

    # Every trigger already leads by more than this margin: nothing is added.
    learnt = LookaheadTriggerStep(model=model, triggers=triggers, radius=0.05, per_batch=4,
                                  margin=float(margins.min()) - 1.0)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    learnt.add_gradient(weight=1.0)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n])


def test_a_trigger_margin_is_recorded_and_without_lookahead_gets_its_own_pass(digits_key) -> None:
    wm = Watermarker(digits_key, trigger_margin=2.0)
    assert wm.metadata()["trigger_margin"] == 2.0 and wm.lookahead_step(_tiny()).margin == 2.0
    assert "trigger_margin" not in Watermarker(digits_key).metadata()
    own = Watermarker(digits_key, trigger_lookahead=0, trigger_margin=2.0)  # a margin cannot apply to mixed batches
    assert own.trigger_step and own.trigger_per_batch == 4 and own.lookahead_step(_tiny()).radius == 0.0
    assert "trigger_lookahead" not in own.metadata()
    base = make_loader(torch.rand(40, 1, 8, 8), torch.zeros(40, dtype=torch.long), batch_size=20)
    model = _tiny()
    _, _, loader = own.attach(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=base)
    assert [len(x) for x, _ in loader] == [20, 20]
    with pytest.raises(UsageError, match="at least 0"):
        Watermarker(digits_key, trigger_margin=-1.0)
    with pytest.raises(UsageError, match="margin must be at least 0"):
        LookaheadTriggerStep(model=_tiny(), triggers=generate_triggers(digits_key), radius=0.05, per_batch=4,
                             margin=-0.5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_radius_or_margin_that_is_not_a_finite_number_is_refused(digits_key, value) -> None:
    """A NaN radius used to switch the lookahead off silently (mixing instead) and a NaN margin to be recorded
    and trained with; `wmark embed --trigger-lookahead nan` wrote a model as if nothing were wrong."""
    with pytest.raises(UsageError, match=rf"^The trigger lookahead radius must be 0 \(off\) or positive and finite, "
                                         rf"got {value}.$"):
        Watermarker(digits_key, trigger_lookahead=value)
    with pytest.raises(UsageError, match=rf"^The trigger margin must be at least 0 and finite, got {value}.$"):
        Watermarker(digits_key, trigger_margin=value)
    if math.isnan(value):
        with pytest.raises(UsageError, match="margin must be at least 0"):
            LookaheadTriggerStep(model=_tiny(), triggers=generate_triggers(digits_key), radius=0.05, per_batch=4,
                                 margin=value)


def test_the_hook_does_nothing_without_a_natural_gradient(digits_key) -> None:
    model = _tiny()
    step = LookaheadTriggerStep(model=model, triggers=generate_triggers(digits_key), radius=0.05, per_batch=4)
    step.hook(torch.optim.SGD(model.parameters(), lr=0.1), (), {})
    assert all(p.grad is None for p in model.parameters())


def test_lookahead_is_the_default_for_image_keys_and_recorded(digits_key) -> None:
    wm = Watermarker(digits_key)
    assert wm.trigger_lookahead == DEFAULT_LOOKAHEAD == 0.05 and wm.metadata()["trigger_lookahead"] == 0.05
    assert wm.trigger_per_batch == 4 and wm.metadata()["trigger_per_batch"] == 4
    mixing = Watermarker(digits_key, trigger_lookahead=0)
    assert "trigger_lookahead" not in mixing.metadata() and mixing.trigger_per_batch == 8
    base = make_loader(torch.rand(40, 1, 8, 8), torch.zeros(40, dtype=torch.long), batch_size=20)
    _, _, loader = mixing.attach(model=torch.nn.Linear(1, 1), data_loader=base)
    assert [len(x) for x, _ in loader] == [28, 28]  # lookahead off: triggers mixed into each batch


def test_text_keys_mix_their_triggers_by_default_and_take_a_margin_pass_on_request() -> None:
    from textkit import text_key

    key = text_key(num_classes=4, num_triggers=16)
    wm = Watermarker(key)
    assert wm.trigger_lookahead == 0.0 and wm.trigger_margin is None and not wm.trigger_step
    assert wm.trigger_per_batch == 8 and "trigger_margin" not in wm.metadata()
    assert not Watermarker(key, trigger_mixing=True).trigger_step
    own = Watermarker(key, trigger_margin=3.0)
    assert own.trigger_step and own.trigger_per_batch == 4 and own.metadata()["trigger_margin"] == 3.0
    with pytest.raises(UsageError, match="needs a lookahead radius or a margin"):
        Watermarker(key, trigger_mixing=False)


def test_mixing_is_explicit_and_refuses_a_radius_or_a_margin(digits_key) -> None:
    assert not Watermarker(digits_key, trigger_mixing=True).trigger_step
    assert Watermarker(digits_key, trigger_mixing=False).trigger_lookahead == DEFAULT_LOOKAHEAD
    with pytest.raises(UsageError, match="neither a lookahead radius nor a margin"):
        Watermarker(digits_key, trigger_mixing=True, trigger_margin=3.0)
    with pytest.raises(UsageError, match="neither a lookahead radius nor a margin"):
        Watermarker(digits_key, trigger_mixing=True, trigger_lookahead=0.05)
    with pytest.raises(UsageError, match="needs a lookahead radius or a margin"):
        Watermarker(digits_key, trigger_mixing=False, trigger_lookahead=0)


def test_lookahead_refuses_what_it_cannot_do(digits_key) -> None:
    with pytest.raises(UsageError, match="0 \\(off\\) or positive"):
        Watermarker(digits_key, trigger_lookahead=-0.1)
    with pytest.raises(UsageError, match="trigger_per_batch must be at least 1"):
        Watermarker(digits_key, trigger_per_batch=0)
    with pytest.raises(UsageError, match="radius must be at least 0"):
        LookaheadTriggerStep(model=_tiny(), triggers=generate_triggers(digits_key), radius=-0.1, per_batch=4)
    wm = Watermarker(digits_key, trigger_lookahead=0.05)
    base = make_loader(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long), batch_size=4)
    with pytest.raises(UsageError, match="needs optimizer=.*trigger_mixing=True"):
        wm.attach(model=_tiny(), data_loader=base)
    with pytest.raises(UsageError, match="not through the dataset"):
        wm.wrap_dataset(torch.utils.data.TensorDataset(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(UsageError, match="positive trigger_lookahead"):
        Watermarker(digits_key, trigger_lookahead=0).lookahead_step(_tiny())



def test_detach_releases_the_lookahead_loader(digits_key) -> None:
    """The loader attach() returned went on checking batches for the detached trigger pass."""
    model = _tiny()
    wm = Watermarker(digits_key)
    _, _, loader = wm.attach(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             data_loader=[(torch.arange(4)[:, None], torch.zeros(4, dtype=torch.long))])
    with pytest.raises(UsageError, match="integer inputs"):
        next(iter(loader))
    wm.detach()
    assert len(list(loader)) == 1


def test_the_trigger_pass_names_the_shapes_when_a_key_for_other_inputs_fails_the_model(digits_key) -> None:
    """The default lookahead pass fed the key's 1×8×8 triggers to a model of 3×16×16 images, which failed in the
    optimizer step with its own "mat1 and mat2 shapes cannot be multiplied"."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    base = make_loader(torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long), batch_size=4)
    wm = Watermarker(digits_key)
    _, _, loader = wm.attach(model=model, optimizer=optimizer, data_loader=base)
    x, y = next(iter(loader))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(UsageError, match=r"^Batches hold inputs of shape \(3, 16, 16\) but the key's triggers are "
                                         r"\(1, 8, 8\), on which the model fails; make a key whose input shape "
                                         r"matches the model's\.$"):
        optimizer.step()


def test_an_attach_that_fails_part_way_leaves_the_optimizer_as_it_was(digits_key) -> None:
    """The weights scheme refusing its layer left the trigger hook on the optimizer: training learnt triggers the
    caller believed unattached, and attaching again after the fix added them twice."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    base = make_loader(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long), batch_size=4)
    for attach in ("attach", "attach_optimizer"):
        wm = Watermarker(digits_key, schemes=("trigger", "weights"), weights_layer="nope")
        with pytest.raises(UsageError, match="'nope.weight' is not the weight of a conv/linear layer; choose one of"):
            if attach == "attach":
                wm.attach(model=model, optimizer=optimizer, data_loader=base)
            else:
                wm.attach_optimizer(model=model, optimizer=optimizer, trigger_batch_size=4)
        assert not optimizer._optimizer_step_pre_hooks and not wm._hooks and "weights" not in wm.metadata()
        wm.weights_layer = "3.weight"  # fixed, the same Watermarker attaches once
        wm.attach(model=model, optimizer=optimizer, data_loader=base)
        assert len(optimizer._optimizer_step_pre_hooks) == 2
        wm.detach()
        assert not optimizer._optimizer_step_pre_hooks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_model_in_another_float_dtype_gets_its_triggers_in_that_dtype(digits_key, dtype) -> None:
    """The float32 triggers reached a half-precision (or double) model as they were: the first optimizer step failed
    with "mat1 and mat2 must have the same dtype", and so did the integrations' trigger accuracy."""
    from wmark.integrations.common import trigger_accuracy

    torch.manual_seed(0)
    model = _tiny().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wm = Watermarker(digits_key, trigger_lookahead=0.05, trigger_per_batch=4)
    data = make_loader(torch.rand(8, 1, 8, 8).to(dtype), torch.zeros(8, dtype=torch.long), batch_size=4)
    model, optimizer, loader = wm.attach(model=model, optimizer=optimizer, data_loader=data)
    bx, by = next(iter(loader))
    F.cross_entropy(model(bx), by).backward()
    natural = [p.grad.clone() for p in model.parameters()]
    optimizer.step()  # the hook adds the trigger gradient in the model's dtype
    assert all(p.grad.dtype == dtype for p in model.parameters())
    assert any(not torch.equal(p.grad, g) for p, g in zip(model.parameters(), natural))
    wm.detach()
    assert 0.0 <= trigger_accuracy(model, wm.triggers) <= 1.0

def test_attach_optimizer_installs_the_lookahead_hook_for_a_framework() -> None:
    """What the Hugging Face callback does: the hook on the Trainer's optimizer, weighted by its batch size."""
    # A fixed key: over random keys this setup learns 80-100 % of the 40 triggers.
    key = seeded_key("lookahead/attach_optimizere", num_classes=10, input_shape=(1, 8, 8), num_triggers=40)
    torch.manual_seed(0)
    model = _tiny()
    x = torch.rand(256, 1, 8, 8)
    y = x.flatten(1)[:, :10].argmax(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    wm = Watermarker(key, trigger_per_batch=8)
    wm.attach_optimizer(model=model, optimizer=optimizer, trigger_batch_size=32)
    for _ in range(30):
        for bx, by in make_loader(x, y, batch_size=32, seed=0):
            optimizer.zero_grad()
            F.cross_entropy(model(bx), by).backward()
            optimizer.step()
    wm.detach()
    triggers = generate_triggers(key)
    with torch.no_grad():
        assert (model(triggers.inputs).argmax(1) == triggers.labels).float().mean().item() >= 0.85


def test_the_null_stays_exact_for_a_lookahead_marked_model(digits_key) -> None:
    """Labels are the key's own: the key's labels are uniform over many keys, and a lookahead-marked model,
    independent of other keys, matches their triggers as Binomial(n, 1/C) (chi-square checks)."""
    from scipy import stats as sps

    wm = Watermarker(digits_key, trigger_lookahead=0.05)
    assert torch.equal(wm.triggers.labels, generate_triggers(digits_key).labels)
    model, _ = _train_with_lookahead(digits_key, epochs=5)
    suspect = LocalSuspect(model, input_shape=(1, 8, 8))
    n, keys = 20, 300
    counts, labels = [], []
    for i in range(keys):
        key = seeded_key(f"lookahead/null/{i}", num_classes=10, input_shape=(1, 8, 8), num_triggers=n)
        labels.append(generate_triggers(key).labels.numpy())
        counts.append(trigger_set_test(key=key, suspect=suspect, mode="fixed").matches)
    assert sps.chisquare(np.bincount(np.concatenate(labels), minlength=10)).pvalue > 1e-3
    observed = np.bincount(counts, minlength=n + 1)
    expected = sps.binom.pmf(np.arange(n + 1), n, 0.1) * keys
    obs, exp = np.append(observed[:5], observed[5:].sum()), np.append(expected[:5], expected[5:].sum())
    assert sps.chisquare(obs, exp).pvalue > 1e-3


@pytest.mark.slow
def test_the_cli_embeds_with_lookahead_and_records_it(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from wmark.cli import main

    torch.set_num_threads(1)
    key, base, marked = tmp_path / "k.key", tmp_path / "base.safetensors", tmp_path / "marked.safetensors"

    def run(*args: str) -> str:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    run("keygen", "--owner", "ACME", "--out", str(key), "--input-shape", "1,8,8", "--triggers", "40")
    run("train", "--arch", "fmnist-cnn", "--data", "digits", "--epochs", "8", "--lr", "3e-3", "--out", str(base))
    run("embed", "--key", str(key), "--arch", "fmnist-cnn", "--weights", str(base), "--data", "digits", "--epochs",
        "15", "--lr", "3e-3", "--trigger-lookahead", "0.05", "--out", str(marked))
    assert json.loads(run("inspect", str(marked)))["trigger_lookahead"] == 0.05
    doc = json.loads(run("verify", "file", "--key", str(key), "--arch", "fmnist-cnn", "--suspect", str(marked),
                         "--json"))
    assert doc["decision"] == "detected"
    own = tmp_path / "own.safetensors"
    run("embed", "--key", str(key), "--arch", "fmnist-cnn", "--weights", str(base), "--data", "digits", "--epochs",
        "1", "--trigger-lookahead", "0", "--trigger-margin", "3", "--out", str(own))
    meta = json.loads(run("inspect", str(own)))
    assert meta["trigger_margin"] == 3.0 and "trigger_lookahead" not in meta and meta["trigger_per_batch"] == 4
    mixed = tmp_path / "mixed.safetensors"
    run("embed", "--key", str(key), "--arch", "fmnist-cnn", "--weights", str(base), "--data", "digits", "--epochs",
        "1", "--trigger-mixing", "--out", str(mixed))
    meta = json.loads(run("inspect", str(mixed)))
    assert "trigger_margin" not in meta and "trigger_lookahead" not in meta and meta["trigger_per_batch"] == 8


def _lightning_lookahead_fit(**trainer_options: object) -> tuple[object, list[float], list[float]]:
    """Fit a tiny net with the Lightning callback's lookahead pass; ``(callback, the gradient norm each step
    as the hooks after the callback's see it, as the optimizer steps on it)``."""
    L = pytest.importorskip("lightning")
    # a fixed key: how fast triggers are learnt varies with the key, and a fresh one once learnt 0.75 (< 0.8)
    digits_key = seeded_key("lookahead/lightning", num_classes=10, input_shape=(1, 8, 8), num_triggers=40)
    from wmark.integrations.lightning import WatermarkCallback

    L.seed_everything(0, verbose=False)  # the data and the initialisation
    x = torch.rand(256, 1, 8, 8)
    y = x.flatten(1)[:, :10].argmax(1)
    before_step: list[float] = []
    stepped: list[float] = []

    def norm(params: object) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _tiny()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            # Lightning calls the callbacks' hook first, so the trigger gradient is in already
            before_step.append(norm(self.parameters()))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            # Lightning runs the step's closure (backward, hooks, clipping) inside step(), so a pre-hook fires too
            # early; Adam leaves .grad as it stepped on it
            opt.register_step_post_hook(lambda o, args, kwargs: stepped.append(norm(self.parameters())))
            return opt

    # 8 triggers per batch of 32: each weighs like a natural sample, a quarter of the batch's loss (weight=1).
    callback = WatermarkCallback(Watermarker(digits_key, trigger_per_batch=8))
    trainer = L.Trainer(max_epochs=30, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        **trainer_options)
    trainer.fit(Module(), make_loader(x, y, batch_size=32, seed=0))
    with pytest.raises(UsageError, match="drop forward="):
        WatermarkCallback(Watermarker(digits_key), forward=lambda m, b: m(b))
    return callback, before_step, stepped


def test_the_lightning_callback_learns_lookahead_triggers() -> None:
    callback, before_step, stepped = _lightning_lookahead_fit()
    assert callback.trigger_accuracy is not None and callback.trigger_accuracy >= 0.8
    assert len(stepped) == len(before_step) == 240 and stepped == before_step


def test_lightning_clips_the_gradient_with_the_lookahead_triggers_in_it_and_the_triggers_are_still_learnt() -> None:
    clip = 0.5
    callback, before_step, stepped = _lightning_lookahead_fit(gradient_clip_val=clip)
    assert callback.trigger_accuracy is not None and callback.trigger_accuracy >= 0.8
    # the optimizer steps on the natural and trigger gradients together, clipped as one by Lightning
    assert len(stepped) == len(before_step) == 240
    assert sum(b > clip for b in before_step) > 120
    assert stepped == pytest.approx([min(b, clip) for b in before_step], rel=1e-4)


def test_the_trigger_pass_draws_the_same_dropout_whatever_the_loops_seed_and_leaves_its_stream_alone() -> None:
    # Under DDP each rank adds the trigger gradient alone: ranks seeded apart must still draw the same masks.
    key = seeded_key("lookahead/dropout", num_classes=10, input_shape=(1, 8, 8), num_triggers=40)
    grads = []
    for loop_seed in (1, 2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 48), torch.nn.ReLU(),
                                    torch.nn.Dropout(0.5), torch.nn.Linear(48, 10))
        step = Watermarker(key, trigger_per_batch=8).lookahead_step(model)
        torch.manual_seed(loop_seed)
        state = torch.get_rng_state()
        passes = []
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.01)
            step.add_gradient(weight=1.0)
            passes.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert torch.equal(torch.get_rng_state(), state)
        grads.append(passes)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert not torch.cuda.is_initialized()  # a CPU model's pass leaves CUDA alone


def _step_gradients(model: torch.nn.Module, key, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                    **attach: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One optimizer step over all of ``x`` in batches, each loss divided by the number of batches: the natural
    gradient, and what the trigger pass added to it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    wm = Watermarker(key, trigger_lookahead=0.05, trigger_per_batch=4)
    model, optimizer, loader = wm.attach(model=model, optimizer=optimizer,
                                         data_loader=make_loader(x, y, batch_size=batch_size, shuffle=False), **attach)
    batches = math.ceil(len(x) / batch_size)
    for bx, by in loader:
        (F.cross_entropy(model(bx), by) / batches).backward()
    natural = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    wm.detach()
    return natural, [p.grad - g for p, g in zip(model.parameters(), natural)]


def test_accumulation_steps_give_the_triggers_their_share_of_one_batch_of_that_size(digits_key) -> None:
    """A plain loop accumulating 4 batches of 8 per step, each loss divided by 4, gave the triggers 4 times the
    gradient they get in one batch of 32; ``accumulation_steps=4`` weighs them against the step's 32 samples."""
    torch.manual_seed(0)
    model = _tiny().double()  # float64: the two ways of summing the natural gradient agree to its last bits
    x, y = torch.rand(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
    natural, triggers = _step_gradients(copy.deepcopy(model), digits_key, x, y, batch_size=32)
    assert all(t.abs().sum() > 0 for t in triggers)
    acc_natural, acc_triggers = _step_gradients(copy.deepcopy(model), digits_key, x, y, batch_size=8,
                                                accumulation_steps=4)
    for a, b in zip(natural, acc_natural):
        torch.testing.assert_close(a, b)
    for a, b in zip(triggers, acc_triggers):
        torch.testing.assert_close(a, b)
    _, unsaid = _step_gradients(copy.deepcopy(model), digits_key, x, y, batch_size=8)
    for a, b in zip(triggers, unsaid):
        torch.testing.assert_close(4 * a, b)  # what the loop got without saying it accumulates


@pytest.mark.parametrize("steps", [0, -2, 2.0, True, "4"])
def test_accumulation_steps_must_be_a_whole_number_of_batches(digits_key, steps) -> None:
    model = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = make_loader(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long), batch_size=4)
    wm = Watermarker(digits_key)
    with pytest.raises(UsageError, match=r"^accumulation_steps must be a whole number of batches per optimizer step, "
                                         r"at least 1, got "):
        wm.attach(model=model, optimizer=optimizer, data_loader=loader, accumulation_steps=steps)
    assert not optimizer._optimizer_step_pre_hooks and not wm._attached


def test_mixed_triggers_refuse_accumulation_steps(digits_key) -> None:
    """Mixed triggers join every batch, so a weighting for the step would silently do nothing."""
    model = _tiny()
    loader = make_loader(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long), batch_size=4)
    wm = Watermarker(digits_key, trigger_mixing=True)
    with pytest.raises(UsageError, match=r"^Mixed triggers join every batch, so accumulation_steps does not apply to "
                                         r"them; drop it"):
        wm.attach(model=model, data_loader=loader, accumulation_steps=2)
    wm.attach(model=model, data_loader=loader, accumulation_steps=1)
    wm.detach()
