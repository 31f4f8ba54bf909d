"""The one training loop of the testbed, run by every stage (0-2b in :mod:`smar.testbed.stages`,
3 in :mod:`smar.testbed.tune`), and its helpers: the learning-rate schedule, the optimizer, the
progress bar and the divergence checks.

Each step sets the rate, runs the stage's forward on its next batch, checks the loss (and the
router logits a routing loss is about to read), adds the routing loss and checks the sum, then
zero_grad, backward, an optional gradient clip at norm 1 and the optimizer step. A stage says
only what differs: its forward, its routing loss, whether it clips, what it records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from smar.errors import Diverged

if TYPE_CHECKING:
    from tqdm.auto import tqdm


def progress(iterable: Iterable[Any] | None = None, **kw: Any) -> tqdm:
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=kw.pop("disable", None), mininterval=1.0, **kw)


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        fused=True,  # one kernel per parameter group: 4x faster than foreach on this CPU
    )


def train(
    model: torch.nn.Module,
    forward: Callable,
    *,
    steps: int,
    warmup: int,
    lr: float,
    stage: str,
    field: str,
    fix: str | None = None,
    routing_loss: Callable | None = None,
    clip: bool = False,
    on_step: Callable | None = None,
    desc: str | None = None,
    quiet: bool = True,
) -> torch.Tensor:
    """Trains the parameters of ``model`` that require a gradient for ``steps`` steps (AdamW,
    :func:`lr_at` from ``lr`` with ``warmup``). Returns the last step's loss.

    Args:
        forward: ``forward(step)`` -> the step's loss, or the model's output (a
            :class:`~smar.testbed.model.TinyOutput`) whose ``router_logits`` are checked too.
        stage, field, fix: what a :class:`Diverged` names (see :func:`check_finite`).
        routing_loss: ``routing_loss(output)`` -> ``(aux, terms)``: ``aux`` is added to the loss.
        clip: clip the gradient norm at 1 before each step.
        on_step: ``on_step(step, output, aux, terms)`` after each step (``aux`` and ``terms``
            None without a routing loss).
        desc: the progress bar's label (it shows the loss every 50 steps); None: no bar.

    Raises:
        Diverged: a loss or a router logit is NaN or +inf.
    """
    opt = make_optimizer(model, lr)
    bar = None if desc is None else progress(range(steps), desc=desc, disable=quiet)
    loss = None
    for step in range(steps) if bar is None else bar:
        lr_now = lr_at(step, steps, warmup, lr)
        for grp in opt.param_groups:
            grp["lr"] = lr_now
        out = forward(step)
        output = not isinstance(out, torch.Tensor)
        loss = out.loss if output else out
        # the routing losses read the router logits: a NaN there is a divergence, said as one
        check_finite(loss, stage, step, steps, lr_now, field, fix=fix,
                     router_logits=out.router_logits if output else ())  # fmt: skip
        aux = terms = None
        if routing_loss is not None:
            aux, terms = routing_loss(out)
            loss = loss + aux
            check_finite(loss, stage, step, steps, lr_now, field, fix=fix)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(step, out, aux, terms)
        if bar is not None and step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    assert loss is not None  # steps >= 1 (validated)
    return loss


def check_finite(
    loss: torch.Tensor,
    stage: str,
    step: int,
    steps: int,
    lr: float,
    field: str,
    *,
    router_logits: Sequence[torch.Tensor] = (),
    fix: str | None = None,
) -> None:
    """Raises :class:`Diverged` when ``loss`` or a router logit is NaN or +inf (checked before
    any routing loss reads them), naming the stage, step and rate; ``fix`` replaces the default
    fix (lower ``field`` or raise its warmup)."""
    value = loss.item()
    what = f"the loss is {value}"
    if math.isfinite(value):
        bad = [i for i, z in enumerate(router_logits) if _nan_or_posinf(z)]
        if not bad:
            return
        what = f"the router logits of MoE layer {bad[0]} are NaN or +inf"
    raise Diverged(
        f"{stage} diverged: {what} at step {step + 1} of {steps} (learning rate {lr:.3g} at "
        "that step); nothing of it was cached",
        fix or f"lower {field} or raise its warmup",
    )


def _nan_or_posinf(z: torch.Tensor) -> bool:
    """-inf is a masked expert (hard routing); NaN and +inf are overflow."""
    z = z.detach()
    return bool(torch.isnan(z).any() or torch.isposinf(z).any())


def check_weights(model: torch.nn.Module, stage: str, fix: str) -> None:
    """Raises :class:`Diverged` naming the first weight of ``model`` that is not finite."""
    bad = [n for n, p in model.state_dict().items() if not torch.isfinite(p).all()]
    if bad:
        raise Diverged(
            f"{stage} diverged: weight {bad[0]} is not finite after training; nothing of it "
            "was cached",
            fix,
        )
