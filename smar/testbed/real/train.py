"""Stages 1 and 3 of ``smar real``, through the library's own Hugging Face path.

* :func:`align`: the projector alone learns to turn the frozen tower's features into the language
  model's inputs, on descriptions (LLaVA's alignment stage).
* :func:`instruct`: visual instruction tuning of one arm with :class:`smar.hf.SMARTrainer` (a
  ``transformers.Trainer``): the MoE layers' MLPs, routers and projector train, attention and
  embeddings stay frozen (MoE-LLaVA's stage 3). Arms (:data:`ARMS`), each with the same load
  balancing:

  - ``none``: load balancing only;
  - ``smar``: SMAR's band loss and trainable modality bias;
  - ``hard``: modality-specific experts (text: the first half, image: the second), through the
    same bias, fixed at 0 on the modality's own experts and :data:`HARD_BIAS` on the others (top-k
    never picks them: router logits differ by far less) and not trained;
  - ``stop``: the image-gradient-stop control, ``none`` with the image tokens' contribution to the
    experts' and routers' weight gradients removed (:func:`smar.moe.weight_gradient_stop`); the
    projector still learns through them. What it keeps over ``none`` is the forgetting that
    routing by modality can act on;
  - ``noimage``: the no-image control, ``none`` on the same samples with their images removed;
  - ``stop_sample``: ``stop`` at sample level: every token of a row that holds an image (its
    question and answer too) gives nothing to the experts' and routers' weight gradients. What it
    keeps over ``none`` is the most any routing over the MoE layers by sample type can keep;
  - ``smar_sample``, ``hard_sample``: ``smar`` and ``hard`` with sample-level ids
    (``SMARConfig(modality="sample")``; every token of a multimodal sample is 1), ``smar_sample``
    with the text reference carried across batches (``carry=True``, docs/method.md#modality-ids).

``freeze_dense``: the dense MLPs between the MoE layers stay frozen too (any arm), to see where
the forgetting sits.

Both run in float32, or in bf16 autocast (``precision="bf16"``: float32 master weights and
optimizer state; smar's losses compute in float32 from the bf16 logits).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, cast

import torch

import smar
import smar.hf
from smar.errors import UsageError
from smar.testbed.real.data import collate
from smar.testbed.real.precision import autocast

if TYPE_CHECKING:
    import transformers
    from transformers import LlavaForConditionalGeneration, ProcessorMixin


    _Trainer = transformers.Trainer  # the class _RouterLR is mixed into, as the checker sees it
else:
    _Trainer = object

__all__ = ["ARMS", "HARD_BIAS", "arm_config", "align", "instruct", "drop_images"]

ARMS = ("none", "smar", "hard", "stop", "noimage", "stop_sample", "smar_sample", "hard_sample")
HARD_BIAS = -30.0


def arm_config(arm: str, lb_weight: float = 0.01) -> smar.SMARConfig:
    """The routing objective of an arm: the same load balancing for every arm."""
    if arm in ("none", "stop", "noimage", "stop_sample"):
        return smar.SMARConfig(smar_weight=0.0, lb_weight=lb_weight, modality_bias=False)
    if arm == "smar":
        return smar.SMARConfig(lb_weight=lb_weight)
    if arm == "smar_sample":
        return smar.SMARConfig(lb_weight=lb_weight, modality="sample", carry=True)
    if arm in ("hard", "hard_sample"):
        level = "sample" if arm == "hard_sample" else "token"
        return smar.SMARConfig(smar_weight=0.0, lb_weight=lb_weight, modality_bias=True,
                               modality=level)  # fmt: skip
    raise UsageError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")


def drop_images(samples: list[dict]) -> list[dict]:
    """The no-image control's samples: the same chats without their image items."""
    out = []
    for s in samples:
        msgs = [{**m, "content": [c for c in m["content"] if c.get("type") != "image"]}
                if isinstance(m["content"], list) else m for m in s["messages"]]  # fmt: skip
        out.append({**s, "messages": msgs, "images": []})
    return out


def _fix_hard(trainer: smar.hf.SMARTrainer) -> None:
    """Sets each modality bias to the hard partition and freezes it (before the optimizer is
    built, so it never trains)."""
    for bias in trainer.smar.bias_parameters():  # (M, E)
        half = bias.shape[1] // 2
        with torch.no_grad():
            bias.zero_()
            bias[0, half:] = HARD_BIAS
            bias[1, :half] = HARD_BIAS
        bias.requires_grad_(False)


class _RouterLR(_Trainer):
    """A Trainer mixin: the parameters under a ``.router.`` (router weights, modality biases) in
    their own AdamW group at ``router_lr``; the scheduler scales both groups alike."""

    router_lr: float

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if self.optimizer is None:
            assert self.model is not None  # the Trainer's, built before its optimizer
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            rest = [p for n, p in named if ".router." not in n]
            routers = [p for n, p in named if ".router." in n]
            self.optimizer = torch.optim.AdamW(
                [{"params": rest, "lr": self.args.learning_rate},
                 {"params": routers, "lr": self.router_lr}], weight_decay=0.0,
            )  # fmt: skip
        return super().create_optimizer(*args, **kwargs)


def stop_mask(input_ids: torch.Tensor, image_token: int, level: str) -> torch.Tensor:
    """``(B, S)`` bool: the tokens whose weight gradients the stop controls remove: the image
    tokens (``"token"``), or every token of a row that holds one (``"sample"``)."""
    image = input_ids == image_token  # (B, S)
    return image if level == "token" else image.any(dim=1, keepdim=True).expand_as(image)


class _StopTrainer(smar.hf.SMARTrainer):
    """``SMARTrainer`` whose forwards stop the image tokens' (or image samples') weight
    gradients."""

    stop_level = "token"

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any,
                     **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, Any]:  # fmt: skip
        from smar.moe import weight_gradient_stop

        stop = stop_mask(inputs["input_ids"], model.config.image_token_index, self.stop_level)
        with weight_gradient_stop(model, stop):
            return super().compute_loss(model, inputs, *args, **kwargs)


class _StopSampleTrainer(_StopTrainer):
    stop_level = "sample"


def align(model: LlavaForConditionalGeneration, processor: ProcessorMixin, samples: list[dict], *,
          steps: int, batch: int = 8, lr: float = 1e-3, seed: int = 0,
          precision: str = "fp32") -> list[float]:  # fmt: skip
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
        with autocast(precision):
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


def trainable_for_instruct(model: torch.nn.Module, freeze_dense: bool = False) -> list[str]:
    """Sets stage 3's trainable parameters (the MLPs, MoE layers' experts and routers, the
    projector; with ``freeze_dense`` not the dense MLPs between the MoE layers) and returns their
    names."""
    from smar.moe import MoEBlock

    model.requires_grad_(False)
    moe = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, MoEBlock))
    names = []
    for name, p in model.named_parameters():
        mlp = ".mlp." in name and (not freeze_dense or name.startswith(moe))
        if mlp or "multi_modal_projector" in name:
            p.requires_grad_(True)
            names.append(name)
    return names


def instruct(model: LlavaForConditionalGeneration, processor: ProcessorMixin, samples: list[dict],
             out_dir: str, *, arm: str, steps: int,
             batch: int = 8, lr: float = 2e-5, seed: int = 0, precision: str = "fp32",
             lb_weight: float = 0.01, progress: bool = False,
             router_lr: float | None = None,
             freeze_dense: bool = False) -> smar.hf.SMARTrainer:  # fmt: skip
    """Stage 3 of one arm with :class:`smar.hf.SMARTrainer`; saves the model and its bias into
    ``out_dir`` and returns the trainer (its ``state.log_history`` holds the ``smar/*`` terms).

    ``router_lr``: the routers' (and modality biases') own peak learning rate (the same schedule),
    for every arm; None: ``lr``."""
    import transformers

    trainable_for_instruct(model, freeze_dense)
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
        weight_decay=0.0, logging_steps=max(1, steps // 10), save_strategy="no",
        report_to=[], seed=seed, data_seed=seed, use_cpu=True, bf16=precision == "bf16",
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=not progress,
    )  # fmt: skip
    if arm == "noimage":
        samples = drop_images(samples)
    cls = {"stop": _StopTrainer, "stop_sample": _StopSampleTrainer}.get(arm, smar.hf.SMARTrainer)
    if router_lr is not None:
        cls = cast(type[smar.hf.SMARTrainer],
                   type(cls.__name__, (_RouterLR, cls), {"router_lr": router_lr}))  # fmt: skip
    trainer = cls(
        model=model, args=args, train_dataset=samples,
        data_collator=lambda rows: collate(processor, rows), smar_config=arm_config(arm, lb_weight),
    )  # fmt: skip
    if arm in ("hard", "hard_sample"):
        _fix_hard(trainer)
    trainer.train()
    trainer.save_model(out_dir)
    processor.save_pretrained(out_dir)
    return trainer
