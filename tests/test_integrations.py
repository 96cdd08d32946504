"""The real Hugging Face Trainer and the real Lightning Trainer embed the trigger set into a tiny BERT."""

from __future__ import annotations

import pytest
import torch
from textkit import hf_bert, text_key

from wmark.embed import Watermarker
from wmark.errors import UsageError
from wmark.suspects import LocalSuspect
from wmark.text import MINILM, TextInputs, load_tokenizer
from wmark.verify import verify_blackbox

TEXTS = ["computers are fast", "what a lovely day", "to be or not to be", "the cookie crumbles",
         "politics is the art of the possible", "work expands to fill the time", "science is organised knowledge",
         "a song for the road"]


def _detected(model: torch.nn.Module, key) -> bool:
    suspect = LocalSuspect(model.eval(), input_shape=tuple(key.input_shape), text=TextInputs.from_key(key),
                           expose_scores=False)
    return verify_blackbox(key=key, suspect=suspect, alpha=1e-6, mode="fixed").detected


def test_hf_trainer_with_wrapped_dataset_and_callback_embeds_the_triggers(tmp_path):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from wmark.integrations.hf import WatermarkCallback

    # A fixed key: how many of 16 random trigger texts 8 training texts' worth of steps teach varies with the key.
    key = text_key(num_classes=4, num_triggers=16, tag="integrations/hf-wrapped/0")
    tok = load_tokenizer(MINILM)
    train = [dict(tok(t), labels=i % 4) for i, t in enumerate(TEXTS)]
    wm = Watermarker(key, tokenizer=tok, trigger_mixing=True)
    callback = WatermarkCallback(wm)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), num_train_epochs=16, per_device_train_batch_size=16,
                             learning_rate=3e-3, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
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
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from wmark.integrations.hf import WatermarkCallback

    key = text_key(num_classes=4, num_triggers=16, tag="integrations/hf-lookahead/0")
    tok = load_tokenizer(MINILM)
    train = [dict(tok(t), labels=i % 4) for i, t in enumerate(TEXTS)]
    wm = Watermarker(key, tokenizer=tok, trigger_lookahead=0.05, trigger_per_batch=8)
    callback = WatermarkCallback(wm)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), num_train_epochs=60, per_device_train_batch_size=8,
                             learning_rate=3e-3, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
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
