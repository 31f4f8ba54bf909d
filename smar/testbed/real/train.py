"""Stages 1 and 3 of ``smar real``, through the library's own Hugging Face path.

* :func:`align`: the projector alone learns to turn the frozen tower's features into the language
  model's inputs, on descriptions (LLaVA's alignment stage).
* :func:`instruct`: visual instruction tuning of one arm with :class:`smar.hf.SMARTrainer` (a
  ``transformers.Trainer``): the MoE layers' MLPs, routers and projector train, attention and
  embeddings stay frozen (MoE-LLaVA's stage 3). Arms: ``none`` (load balancing only) and ``smar``
  (SMAR's band loss and modality bias, on top of the same load balancing).

Both run in float32, or in bf16 autocast (``precision="bf16"``: float32 master weights and
optimizer state; smar's losses compute in float32 from the bf16 logits).
"""

from __future__ import annotations

import contextlib
import random

import torch

import smar
import smar.hf
from smar.testbed.real.data import collate

__all__ = ["ARMS", "arm_config", "align", "instruct"]

ARMS = ("none", "smar")


def arm_config(arm: str, lb_weight: float = 0.01) -> smar.SMARConfig:
    """The routing objective of an arm: the same load balancing for both."""
    if arm == "none":
        return smar.SMARConfig(smar_weight=0.0, lb_weight=lb_weight, modality_bias=False)
    if arm == "smar":
        return smar.SMARConfig(lb_weight=lb_weight)
    raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")


def _cast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def align(model, processor, samples: list[dict], *, steps: int, batch: int = 8,
          lr: float = 1e-3, seed: int = 0, precision: str = "fp32") -> list[float]:  # fmt: skip
    """Trains ``model.model.multi_modal_projector`` alone on ``samples``; returns the losses."""
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    opt = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    model.train()
    for _ in range(steps):
        inputs = collate(processor, rng.sample(samples, min(batch, len(samples))))
        with _cast(precision):
            loss = model(**inputs).loss
        if not torch.isfinite(loss):
            from smar.testbed.errors import Diverged

            raise Diverged("stage 1 (alignment) diverged", "lower its lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def trainable_for_instruct(model) -> list[str]:
    """Sets stage 3's trainable parameters (MoE layers' MLPs and routers, the projector) and
    returns their names."""
    model.requires_grad_(False)
    names = []
    for name, p in model.named_parameters():
        if ".mlp." in name or "multi_modal_projector" in name:
            p.requires_grad_(True)
            names.append(name)
    return names


def instruct(model, processor, samples: list[dict], out_dir: str, *, arm: str, steps: int,
             batch: int = 8, lr: float = 2e-5, seed: int = 0, precision: str = "fp32",
             lb_weight: float = 0.01):  # fmt: skip
    """Stage 3 of one arm with :class:`smar.hf.SMARTrainer`; saves the model and its bias into
    ``out_dir`` and returns the trainer (its ``state.log_history`` holds the ``smar/*`` terms)."""
    import transformers

    trainable_for_instruct(model)
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
        weight_decay=0.0, logging_steps=max(1, steps // 10), save_strategy="no",
        report_to=[], seed=seed, data_seed=seed, use_cpu=True, bf16=precision == "bf16",
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = smar.hf.SMARTrainer(
        model=model, args=args, train_dataset=samples,
        data_collator=lambda rows: collate(processor, rows), smar_config=arm_config(arm, lb_weight),
    )  # fmt: skip
    trainer.train()
    trainer.save_model(out_dir)
    processor.save_pretrained(out_dir)
    return trainer
