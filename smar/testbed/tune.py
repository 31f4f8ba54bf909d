"""Stage 3 of the testbed: upcycling and visual instruction tuning of one run (an arm, a seed, a
text ratio, a band, a learning rate), with the arm's routing objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch

from smar.losses import routing_objective
from smar.moe import weight_gradient_stop
from smar.testbed.arms import Arm, make_arm
from smar.testbed.config import RunConfig
from smar.testbed.data.bundle import Bundle
from smar.testbed.data.mixing import TextStream, mixed_items, qa_batch
from smar.testbed.loop import check_weights, train
from smar.testbed.model import TinyModel, TinyOutput


@dataclass
class Job:
    """One stage-3 run. ``drop_images``: the multimodal samples lose their images (the no-image
    control); ``shuffle_images``: each shows another sample's image; ``stop_image_gradients``:
    the image tokens give nothing to the MoE layers' expert and router weight gradients
    (:func:`smar.moe.weight_gradient_stop`), the projector still learns through them."""

    name: str
    arm: str
    seed: int = 0
    text_ratio: float | None = None
    band: tuple[float, float] | None = None
    lr: float | None = None
    drop_images: bool = False
    shuffle_images: bool = False
    stop_image_gradients: bool = False


def prepare(model: TinyModel, cfg: RunConfig, arm: Arm, generator: torch.Generator) -> TinyModel:
    """The stage-3 model of an arm: upcycled with the arm's router options
    (``tune.base="upcycle"``) or the MoE LM's routers given them (``"native"``), the
    ``tune.trainable`` part trainable."""
    t = cfg.tune
    model.cfg.num_experts, model.cfg.top_k = t.num_experts, t.top_k
    model.cfg.modality_bias, model.cfg.hard = arm.modality_bias, arm.hard_routing
    if t.base == "native":
        model.set_routing_()
    else:
        model.upcycle_(layers=t.layers, noise=t.noise, generator=generator)
    model.set_trainable(t.trainable)
    return model


def arm_objective(
    out: TinyOutput, cfg: RunConfig, arm: Arm
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The arm's routing objective on one forward's router logits: ``(aux, terms)``."""
    return routing_objective(
        out.router_logits,
        out.modality_ids,
        top_k=cfg.tune.top_k,
        smar_weight=arm.smar_weight,
        band=arm.band,
        lb_weight=arm.lb_weight,
        z_weight=arm.z_weight,
        limoe_weight=arm.limoe_weight,
    )


def tune(
    cfg: RunConfig, job: Job, bundle: Bundle, base: TinyModel, quiet: bool = True
) -> tuple[TinyModel, Arm, list[dict[str, Any]]]:
    """Stage 3 for one job: upcycle with the arm's router options (``tune.base="upcycle"``) or
    give the MoE LM's routers those options (``"native"``), tune, return the model."""
    t = cfg.tune
    ratio = t.text_ratio if job.text_ratio is None else job.text_ratio
    band = cast(tuple[float, float], tuple(t.band if job.band is None else job.band))
    lr = t.lr if job.lr is None else job.lr
    arm = make_arm(job.arm, smar_weight=t.smar_weight, lb_weight=t.lb_weight, band=band)
    torch.manual_seed(1000 + job.seed)
    model = prepare(base, cfg, arm, torch.Generator().manual_seed(1000 + job.seed))
    model.train()
    stream = TextStream(bundle.train_ids, 500 + job.seed)
    items = mixed_items(
        t.steps * t.batch_size,
        tok=bundle.tok,
        text=stream,
        seed=job.seed,
        text_ratio=ratio,
        text_len=t.text_len,
        image_size=cfg.data.image_size,
        drop_images=job.drop_images,
        shuffle_images=job.shuffle_images,
    )

    def forward(step: int) -> TinyOutput:
        b = qa_batch(
            items[step * t.batch_size : (step + 1) * t.batch_size],
            bundle.tok,
            image_tokens=cfg.model.image_tokens,
            modality=arm.modality,
            label_prompt=t.label_prompt,
        )
        stop = b.input_ids == bundle.tok.image_id if job.stop_image_gradients else None  # (B, S)
        with weight_gradient_stop(model, stop):
            return model(
                b.input_ids,
                b.pixel_values,
                b.labels,
                attention_mask=b.attention_mask,
                modality_ids=b.modality_ids,
                logits="none",
            )

    history: list[dict[str, Any]] = []

    def record(step: int, out: TinyOutput, aux: torch.Tensor, terms: dict) -> None:
        if step % 25 == 0 or step == t.steps - 1:
            assert out.loss is not None  # the batch has labels
            mrd = terms.get("mrd")
            history.append(
                {
                    "step": step,
                    "lm": out.loss.item(),
                    "aux": float(aux.detach()),
                    "mrd": [] if mrd is None else mrd.tolist(),
                }
            )

    field = "tune.lr" if job.lr is None else "lrs"
    fix = f"lower {field} or raise tune.warmup"
    if t.noise > 0 and t.base == "upcycle":
        fix += f" (or lower tune.noise={t.noise:g}: the experts' noise, relative to their weights)"
    stage = f"stage 3 (run {job.name})"
    train(model, forward, steps=t.steps, warmup=t.warmup, lr=lr, stage=stage, field=field,
          fix=fix, routing_loss=lambda out: arm_objective(out, cfg, arm), clip=True,
          on_step=record)  # fmt: skip
    check_weights(model, stage, fix)
    return model, arm, history
