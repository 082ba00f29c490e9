"""torchlamb inside Hugging Face Transformers: Trainer runs Lamb and warmup_poly on a tiny randomly initialised
BertForMaskedLM (built from a BertConfig: nothing is downloaded). Skips where transformers is not installed."""

from __future__ import annotations

import pytest
import torch

import torchlamb

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it


class RandomMaskedLM(torch.utils.data.Dataset):
    """Random token sequences with BERT-style labels: -100 except at a few "masked" positions."""

    def __init__(self, size: int, length: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(5, vocab, (size, length), generator=generator)
        self.labels = torch.full((size, length), -100)
        masked = torch.rand(size, length, generator=generator) < 0.15
        self.labels[masked] = self.input_ids[masked]
        self.input_ids[masked] = 4  # the [MASK] id of this toy vocabulary

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": torch.ones_like(self.input_ids[index]),
                "labels": self.labels[index]}


def test_trainer_runs_lamb_with_warmup_poly(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertForMaskedLM(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torchlamb.Lamb(torchlamb.param_groups(model, weight_decay=0.01), lr=1e-3, max_grad_norm=1.0)
    scheduler = torchlamb.warmup_poly(optimizer, warmup_steps=2, total_steps=6)
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                                               logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                               max_grad_norm=0.0)  # Lamb clips itself (max_grad_norm above)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=RandomMaskedLM(64, 16, 64),
                                   optimizers=(optimizer, scheduler))
    result = trainer.train()

    assert result.global_step == 6
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # The Trainer stepped our optimizer and our scheduler: every parameter has moved and the lr has decayed to 0.
    assert all(optimizer.state[p]["step"].item() == 6 for p in model.parameters() if p.requires_grad)
    assert all(not torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())
    assert scheduler.get_last_lr()[0] == 0.0
    assert optimizer.trust_stats and optimizer.grad_norm is not None
