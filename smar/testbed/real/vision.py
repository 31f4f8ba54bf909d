"""Stage 0 of ``smar real``: the LLaVA model's CLIP vision tower learns the testbed's images.

As the testbed's stage 0 does for its own encoder: the tower and a linear head on its pooled
output predict every fact of an image (digit, colours, shapes, count, places; multi-label binary
cross-entropy), on images made by :mod:`smar.testbed.data.images` and put through the model's own
image processor. The head is then dropped and the tower frozen; :func:`vision_probe` reads the
head's accuracy per question type on held-out images, the ceiling of what the language model can
learn to answer from these features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from smar.testbed.data import images, questions
from smar.testbed.real.data import to_pil

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, ProcessorMixin

__all__ = ["pretrain_tower", "vision_probe"]


def _pixels(processor: ProcessorMixin, pictures: list[torch.Tensor]) -> torch.Tensor:
    return processor.image_processor(images=[to_pil(p) for p in pictures],
                                     return_tensors="pt")["pixel_values"]  # fmt: skip


def _features(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return tower(pixel_values=pixels).pooler_output  # (N, H)


def pretrain_tower(model: LlavaForConditionalGeneration, processor: ProcessorMixin, *,
                   steps: int = 300, batch: int = 64, lr: float = 1e-3, examples: int = 4000,
                   seed: int = 0, probe: int = 200) -> dict:  # fmt: skip
    """Trains ``model.model.vision_tower`` on the testbed's images, then freezes it.

    Returns:
        ``{"loss_first", "loss_last", "probe": {question type: accuracy}}``.
    """
    tower = model.model.vision_tower
    torch.manual_seed(seed)
    samples = images.vision_samples(examples, seed, processor.image_processor.crop_size["height"])
    x = _pixels(processor, [s.pixels for s in samples])  # (N, 3, H, W)
    y = torch.stack([s.target() for s in samples])  # (N, C)
    head = nn.Linear(tower.config.hidden_size, y.shape[1])
    tower.requires_grad_(True).train()
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up over the first tenth, then cosine
            warm = min(1.0, (step + 1) / max(1, steps // 10))
            group["lr"] = lr * warm * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.1416)))
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = nn.functional.binary_cross_entropy_with_logits(head(_features(tower, x[idx])),
                                                              y[idx])  # fmt: skip
        if not torch.isfinite(loss):
            from smar.testbed.errors import Diverged

            raise Diverged(f"stage 0 (vision tower) diverged at step {step}", "lower its lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tower.requires_grad_(False).eval()
    return {"loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "probe": vision_probe(tower, head, processor, probe)}  # fmt: skip


@torch.no_grad()
def vision_probe(tower: nn.Module, head: nn.Module, processor: ProcessorMixin,
                 n: int = 200) -> dict[str, float]:  # fmt: skip
    """The head's accuracy per question type on held-out images (its answer read off the head's
    block for that question's attribute)."""
    size = processor.image_processor.crop_size["height"]
    out = {}
    for task in questions.QA_TYPES:
        items = questions.qa_samples(task, n, 0, "eval", size)
        logits = head(_features(tower, _pixels(processor, [s.image.pixels for s in items])))
        pred = logits[:, images.TARGET_SLICES[task]].argmax(-1)
        out[task] = (pred == torch.tensor([s.answer for s in items])).float().mean().item()
    return out
