"""The real Hugging Face Trainer and the real Lightning Trainer embed the trigger set into a tiny BERT."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from textkit import hf_bert, text_key

from wmark.embed import Watermarker
from wmark.errors import UsageError
from wmark.keys import Key, generate_key
from wmark.suspects import LocalSuspect
from wmark.text import MINILM, TextInputs, load_tokenizer
from wmark.verify import verify_blackbox

TEXTS = ["computers are fast", "what a lovely day", "to be or not to be", "the cookie crumbles",
         "politics is the art of the possible", "work expands to fill the time", "science is organised knowledge",
         "a song for the road"]


def _quiet_args(tmp_path, **settings: Any) -> Any:
    """Hugging Face TrainingArguments for a test: CPU, seeded, no logging, saving, workers or progress bars."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
                             disable_tqdm=True, **settings)


def _detected(model: torch.nn.Module, key) -> bool:
    suspect = LocalSuspect(model.eval(), input_shape=tuple(key.input_shape), text=TextInputs.from_key(key),
                           expose_scores=False)
    return verify_blackbox(key=key, suspect=suspect, alpha=1e-6, mode="fixed").detected


def test_hf_trainer_with_wrapped_dataset_and_callback_embeds_the_triggers(tmp_path):
    from transformers import DataCollatorWithPadding, Trainer

    from wmark.integrations.hf import WatermarkCallback

    # A fixed key: how many of 16 random trigger texts 8 training texts' worth of steps teach varies with the key.
    key = text_key(num_classes=4, num_triggers=16, tag="integrations/hf-wrapped/0")
    tok = load_tokenizer(MINILM)
    train = [dict(tok(t), labels=i % 4) for i, t in enumerate(TEXTS)]
    wm = Watermarker(key, tokenizer=tok, trigger_mixing=True)
    callback = WatermarkCallback(wm)
    args = _quiet_args(tmp_path, num_train_epochs=16, per_device_train_batch_size=16, learning_rate=3e-3,
                       lr_scheduler_type="constant")
    model = hf_bert(4, seed=5)
    trainer = Trainer(model=model, args=args, train_dataset=wm.wrap_dataset(train, repeats=6),  # type: ignore[arg-type]
                      data_collator=DataCollatorWithPadding(tok), callbacks=[callback])
    trainer.train()
    assert callback.trigger_accuracy is not None and callback.trigger_accuracy > 0.8
    assert _detected(model, key)
    plain = Trainer(model=hf_bert(4, seed=6), args=args, train_dataset=train,  # type: ignore[arg-type]
                    data_collator=DataCollatorWithPadding(tok), callbacks=[WatermarkCallback(Watermarker(key, trigger_mixing=True))])
    with pytest.raises(UsageError, match="carries no triggers"):
        plain.train()


def test_hf_trainer_learns_lookahead_triggers_through_the_callback_alone(tmp_path):
    """Lookahead adds the triggers in the optimizer step: the training set stays as it is."""
    from transformers import DataCollatorWithPadding, Trainer

    from wmark.integrations.hf import WatermarkCallback

    key = text_key(num_classes=4, num_triggers=16, tag="integrations/hf-lookahead/0")
    tok = load_tokenizer(MINILM)
    train = [dict(tok(t), labels=i % 4) for i, t in enumerate(TEXTS)]
    wm = Watermarker(key, tokenizer=tok, trigger_lookahead=0.05, trigger_per_batch=8)
    callback = WatermarkCallback(wm)
    args = _quiet_args(tmp_path, num_train_epochs=60, per_device_train_batch_size=8, learning_rate=3e-3,
                       lr_scheduler_type="constant")
    model = hf_bert(4, seed=5)
    Trainer(model=model, args=args, train_dataset=train,  # type: ignore[arg-type]
            data_collator=DataCollatorWithPadding(tok), callbacks=[callback]).train()
    assert callback.trigger_accuracy is not None and callback.trigger_accuracy > 0.8
    assert _detected(model, key)
    with pytest.raises(UsageError, match="not through the dataset"):
        wm.wrap_dataset(train)  # type: ignore[arg-type]


def test_lightning_callback_embeds_the_triggers():
    import lightning as L

    from wmark.integrations.lightning import WatermarkCallback

    key = text_key(num_classes=4, num_triggers=16, tag="integrations/lightning/0")
    tok = load_tokenizer(MINILM)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    labels = torch.arange(len(TEXTS)) % 4
    loader = torch.utils.data.DataLoader(
        [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
         for i in range(len(TEXTS))], batch_size=4)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = hf_bert(4, seed=7)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            logits = self(batch["input_ids"], batch["attention_mask"])
            return torch.nn.functional.cross_entropy(logits, batch["labels"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    L.seed_everything(0, verbose=False)  # dropout draws from the global generator
    module = Module()
    callback = WatermarkCallback(Watermarker(key, trigger_per_batch=8, tokenizer=tok, trigger_mixing=True))
    # Clipping (which Lightning applies after the callback's trigger backward) keeps the learnt share stable
    # across CPUs and thread counts: unclipped, 8- and 16-thread runs learnt 14 of 16 and one CI machine 9.
    trainer = L.Trainer(max_epochs=60, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        gradient_clip_val=1.0)
    trainer.fit(module, loader)
    assert callback.trigger_accuracy is not None and callback.trigger_accuracy > 0.8
    assert _detected(module.model, key)


def test_the_lightning_mixing_pass_draws_the_same_dropout_whatever_the_loops_seed_and_leaves_its_stream_alone():
    # Under Lightning's DDP strategy each rank adds this pass's gradient alone: ranks seeded apart must agree.
    from wmark.integrations.lightning import WatermarkCallback

    key = _image_key()
    grads = []
    for loop_seed in (1, 2):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                  torch.nn.Linear(32, 4))
        callback = WatermarkCallback(Watermarker(key, trigger_mixing=True))
        torch.manual_seed(loop_seed)
        state = torch.get_rng_state()
        for _ in range(2):
            callback.on_before_optimizer_step(SimpleNamespace(accumulate_grad_batches=1), net, None)  # type: ignore[arg-type]
        assert torch.equal(torch.get_rng_state(), state)
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.equal(*grads)


# The trainer integrations check the user's batches before their trigger pass, as Watermarker.attach does.


class _HFImages(torch.nn.Module):
    """A tiny image classifier in the Hugging Face manner: a named input, a loss when given labels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 4)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.fc(pixel_values.flatten(1))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


class _HFImagesNamedOtherwise(_HFImages):
    """The same, its input named ``image`` (the Trainer passes a forward only the columns it names)."""

    def forward(self, image: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:  # type: ignore[override]
        return super().forward(image, labels)


def _image_key() -> Key:
    return generate_key(owner="Integrations", num_classes=4, input_shape=(1, 8, 8), num_triggers=8)


def _hf_train(tmp_path, model: torch.nn.Module, train: list[dict[str, Any]], wm: Watermarker, **trainer: Any):
    from transformers import Trainer

    from wmark.integrations.hf import WatermarkCallback

    callback = WatermarkCallback(wm)
    args = _quiet_args(tmp_path, max_steps=2, per_device_train_batch_size=4)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[callback], **trainer).train()  # type: ignore[arg-type]
    return callback


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


_IMAGE_ITEMS = [{"pixel_values": torch.rand(1, 8, 8), "labels": i % 4} for i in range(8)]


@pytest.mark.parametrize("options", [{"trigger_margin": 3.0}, {"trigger_lookahead": 0.05}])
def test_the_hf_callback_refuses_a_text_key_on_an_image_model_before_the_first_step(tmp_path, options):
    model = _HFImages()
    before = _weights(model)
    with pytest.raises(UsageError, match=r"^The key is a text key but the batches hold float inputs; use a key made "
                                         r"for this model's inputs\.$"):
        _hf_train(tmp_path, model, _IMAGE_ITEMS, Watermarker(text_key(), **options))
    assert _unchanged(model, before)


def test_the_hf_callback_refuses_an_image_key_on_token_batches_before_the_first_step(tmp_path):
    from transformers import DataCollatorWithPadding

    tok = load_tokenizer(MINILM)
    model = hf_bert(4, seed=5)
    before = _weights(model)
    train = [dict(tok(t), labels=i % 4) for i, t in enumerate(TEXTS)]
    with pytest.raises(UsageError, match=r"^The batches hold integer inputs \(token ids\?\) but the key's triggers "
                                         r"are images; make a text key with the model's tokenizer\.$"):
        _hf_train(tmp_path, model, train, Watermarker(_image_key()), data_collator=DataCollatorWithPadding(tok))
    assert _unchanged(model, before)


def test_the_hf_callback_trains_dict_batches_that_name_their_inputs_otherwise_and_checks_their_kind(tmp_path):
    """The trigger pass builds its own batches, so ``{"image": ...}`` batches need no ``input_key``."""
    items = [{"image": item["pixel_values"], "labels": item["labels"]} for item in _IMAGE_ITEMS]
    model = _HFImagesNamedOtherwise()
    before = _weights(model)
    with pytest.raises(UsageError, match=r"^The key is a text key but the batches hold float inputs; use a key made "
                                         r"for this model's inputs\.$"):
        _hf_train(tmp_path, model, items, Watermarker(text_key(), trigger_margin=3.0))
    assert _unchanged(model, before)
    for wm in (Watermarker(_image_key()), Watermarker(_image_key(), input_key="image")):
        callback = _hf_train(tmp_path, model, items, wm)
        assert callback.trigger_accuracy is not None and not _unchanged(model, before)


def test_a_refusal_of_the_hf_callback_leaves_no_hook_on_the_trainers_optimizer_or_model(tmp_path):
    """The Trainer keeps its optimizer for its next train(): the refused watermarker's trigger pass must not run."""
    from transformers import Trainer

    from wmark.integrations.common import inner_optimizer
    from wmark.integrations.hf import WatermarkCallback

    model = _HFImages()
    wm = Watermarker(text_key(), trigger_margin=3.0)
    callback = WatermarkCallback(wm)
    args = _quiet_args(tmp_path, max_steps=2, per_device_train_batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=_IMAGE_ITEMS, callbacks=[callback])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="^The key is a text key"):
        trainer.train()
    assert not wm._attached and not inner_optimizer(trainer.optimizer)._optimizer_step_pre_hooks
    assert not model._forward_pre_hooks
    # the same Trainer, without the callback, trains as it would have
    trainer.remove_callback(callback)
    before = _weights(model)
    trainer.train()
    assert not _unchanged(model, before)


def test_the_hf_callback_keeps_one_first_batch_hook_when_training_begins_again():
    from wmark.integrations.hf import WatermarkCallback

    model = _HFImages()
    callback = WatermarkCallback(Watermarker(_image_key()))
    callback._check_first_batch(model)  # a run that failed before the model's first forward (a collator's error)
    callback._check_first_batch(model)  # the next train()
    assert len(model._forward_pre_hooks) == 1
    model(torch.rand(2, 1, 8, 8))
    assert not model._forward_pre_hooks


def _lightning_fit(net: torch.nn.Module, batches: list[Any], wm: Watermarker) -> Any:
    import lightning as L

    from wmark.integrations.lightning import WatermarkCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = (batch["image"], batch["labels"]) if isinstance(batch, dict) else batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = WatermarkCallback(wm)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(Module(), torch.utils.data.DataLoader(batches, batch_size=4))
    return callback


def _image_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))


_IMAGE_PAIRS = [(item["pixel_values"], item["labels"]) for item in _IMAGE_ITEMS]


@pytest.mark.parametrize("options", [{"trigger_margin": 3.0}, {"trigger_lookahead": 0.05}, {"trigger_mixing": True}])
def test_the_lightning_callback_refuses_a_text_key_on_an_image_model_before_the_first_step(options):
    net = _image_net()
    before = _weights(net)
    with pytest.raises(UsageError, match=r"^The key is a text key but the batches hold float inputs; use a key made "
                                         r"for this model's inputs\.$"):
        _lightning_fit(net, _IMAGE_PAIRS, Watermarker(text_key(), **options))
    assert _unchanged(net, before)


def test_the_lightning_callback_refuses_an_image_key_on_token_batches_before_the_first_step():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(100, 4), torch.nn.Flatten(), torch.nn.Linear(4 * 6, 4))
    before = _weights(net)
    tokens = [(torch.randint(0, 100, (6,)), i % 4) for i in range(8)]
    with pytest.raises(UsageError, match=r"^The batches hold integer inputs \(token ids\?\) but the key's triggers "
                                         r"are images; make a text key with the model's tokenizer\.$"):
        _lightning_fit(net, tokens, Watermarker(_image_key()))
    assert _unchanged(net, before)


def test_the_lightning_callback_trains_dict_batches_that_name_their_inputs_otherwise_and_checks_their_kind():
    net = _image_net()
    before = _weights(net)
    items = [{"image": image, "labels": label} for image, label in _IMAGE_PAIRS]
    refused = Watermarker(text_key(), trigger_margin=3.0)
    with pytest.raises(UsageError, match=r"^The key is a text key but the batches hold float inputs; use a key made "
                                         r"for this model's inputs\.$"):
        _lightning_fit(net, items, refused)
    assert _unchanged(net, before) and not refused._attached
    for wm in (Watermarker(_image_key()), Watermarker(_image_key(), input_key="image")):
        callback = _lightning_fit(net, items, wm)
        assert callback.trigger_accuracy is not None and not _unchanged(net, before)



class _FailingOnce(_HFImages):
    """Raises in its forward until told otherwise: a run that dies mid-training (an OOM, a bad batch)."""

    fail = True

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("the run dies")
        return super().forward(pixel_values, labels)


def test_an_hf_run_that_raises_leaves_the_watermarker_free_for_the_next_train(tmp_path):
    """No callback runs when a Trainer run raises, so the watermarker stayed attached and the next train() was
    refused ("already attached"), its hooks left on the optimizer the Trainer keeps."""
    from transformers import Trainer

    from wmark.integrations.common import inner_optimizer
    from wmark.integrations.hf import WatermarkCallback

    model = _FailingOnce()
    callback = WatermarkCallback(Watermarker(_image_key()))
    args = _quiet_args(tmp_path, max_steps=2, per_device_train_batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=_IMAGE_ITEMS, callbacks=[callback])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="the run dies"):
        trainer.train()
    model.fail = False
    trainer.train()
    assert callback.trigger_accuracy is not None
    assert not callback.watermarker._attached and not inner_optimizer(trainer.optimizer)._optimizer_step_pre_hooks


def test_a_lightning_run_that_raises_leaves_the_watermarker_free_for_the_next_fit():
    """on_train_end never runs after an exception: the weights scheme's hook stayed, and the next fit() was refused
    ("already attached")."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 4))
    wm = Watermarker(_image_key(), schemes=("trigger", "weights"), weights_layer="net.3.weight")

    def dies(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_tensor(args[0]):  # not the weights scheme's torch.fx trace, which passes proxies
            raise RuntimeError("the run dies")

    hook = net.register_forward_pre_hook(dies)
    with pytest.raises(RuntimeError, match="the run dies"):
        _lightning_fit(net, _IMAGE_PAIRS, wm)
    assert not wm._attached
    hook.remove()
    callback = _lightning_fit(net, _IMAGE_PAIRS, wm)
    assert callback.trigger_accuracy is not None and not wm._attached


def _small_vocabulary_bert() -> torch.nn.Module:
    """A tiny BERT whose embedding table (1000 tokens) is smaller than the MiniLM tokenizer's vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=4)
    return BertForSequenceClassification(config)


_SMALL_VOCABULARY = (r"^The key's tokenizer makes token ids up to 30521 but the model embeds only 1000 tokens; use a "
                     r"key made with the tokenizer the model was trained with\.$")


@pytest.mark.parametrize("options", [{"trigger_mixing": True}, {"trigger_margin": 3.0}])
def test_attach_refuses_a_text_key_whose_tokenizer_outgrows_the_models_vocabulary(options):
    """The trigger pass failed with a bare IndexError (a device-side assert on CUDA); now attach refuses it."""
    model = _small_vocabulary_bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wm = Watermarker(text_key(), tokenizer=load_tokenizer(MINILM), **options)
    with pytest.raises(UsageError, match=_SMALL_VOCABULARY):
        wm.attach(model=model, optimizer=optimizer, data_loader=[])
    assert not wm._attached and not optimizer._optimizer_step_pre_hooks


def test_the_trainer_callbacks_refuse_a_text_key_whose_tokenizer_outgrows_the_models_vocabulary(tmp_path):
    from transformers import DataCollatorWithPadding

    tok = load_tokenizer(MINILM)
    model = _small_vocabulary_bert()
    before = _weights(model)
    train = [dict(tok(t), labels=i % 4) for i, t in enumerate(TEXTS)]
    with pytest.raises(UsageError, match=_SMALL_VOCABULARY):
        _hf_train(tmp_path, model, train, Watermarker(text_key(), tokenizer=tok, trigger_margin=3.0),
                  data_collator=DataCollatorWithPadding(tok))
    tokens = [(torch.randint(0, 1000, (6,)), i % 4) for i in range(8)]
    wm = Watermarker(text_key(), tokenizer=tok, trigger_mixing=True)
    with pytest.raises(UsageError, match=_SMALL_VOCABULARY):
        _lightning_fit(model, tokens, wm)
    assert _unchanged(model, before) and not wm._attached
