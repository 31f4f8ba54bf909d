"""How close the testbed's training runs to this machine's matrix-product speed.

For stage 1 (language pretraining of the dense LM, torch's default threads, as the pipeline
runs it) and stage 3 (visual instruction tuning of the upcycled MoE model, one thread, as each
parallel stage-3 worker runs it), on batches of the demo's shapes (random weights and data: the
time depends on the shapes only):

- **model FLOPs** of one training step (forward + backward), counted by
  ``torch.utils.flop_counter.FlopCounterMode``: matrix products, and attention by torch's formula
  for flash attention (halved: causal attention skips half the scores);
- **achieved FLOP/s**: those FLOPs over the median time of a whole step (data on hand, optimizer,
  gradient clipping, routing losses included);
- **sgemm FLOP/s at the same shapes**: every matrix product the step ran (recorded with their
  shapes and layouts), replayed back to back on their own, same thread count;
- **share** = achieved / sgemm: the part of the step's time that is matrix products at the speed
  the machine reaches for those shapes. Attention counts as FLOPs but not in the replay, so a
  share can pass 100% only if attention were faster than the matrix products.

Then the time of one stage-3 run's evaluation against its training (the demo's evaluation sets
and a default run of 200 steps), when the cached data of a demo is present (``--eval``).

    python benchmarks/bench_testbed.py [--reps 15] [--eval]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from timing import median_seconds
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from smar.testbed.arms import make_arm
from smar.testbed.config import RunConfig
from smar.testbed.loop import make_optimizer
from smar.testbed.model import TinyModel
from smar.testbed.stages import model_config as stage_model_config
from smar.testbed.tune import arm_objective, prepare

aten = torch.ops.aten
_MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}  # every overload (``out=`` included)


# torch counts flash attention's FLOPs on GPUs; its CPU kernels get the same formulas here, with
# causal attention at half (the kernel skips the masked half of the scores)
def _sdpa_cpu(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kw):
    return sdpa_flop_count(q, k, v) // (2 if is_causal else 1)


def _sdpa_cpu_backward(grad, q, k, v, out, lse, dropout_p, is_causal, *args, out_shape=None, **kw):
    return sdpa_backward_flop_count(grad, q, k, v) // (2 if is_causal else 1)


ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


class RecordMatmuls(TorchDispatchMode):
    """Records each matrix product's op, and the shapes, strides and dtypes of its tensor
    arguments (positional, and ``out=``)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _MATMULS:
            shapes = tuple(_layout(a) for a in args if isinstance(a, torch.Tensor))
            out = {k: _layout(v) for k, v in (kwargs or {}).items() if isinstance(v, torch.Tensor)}
            self.calls.append((func, shapes, out))
        return func(*args, **(kwargs or {}))


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), tuple(t.stride()), t.dtype


def _random_strided(shape, stride, dtype) -> torch.Tensor:
    """Random values in a tensor of this layout (strides of 0 included: expanded gradients)."""
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True) if n > 0)
    return torch.randn(size, dtype=dtype).as_strided(shape, stride)


def replay(calls: list[tuple]):
    """A function that runs the recorded matrix products alone, on tensors of the same layout."""
    tensors = [
        (
            func,
            [_random_strided(*a) for a in shapes],
            {k: _random_strided(*a) for k, a in out.items()},
        )
        for func, shapes, out in calls
    ]

    def run():
        for func, args, kwargs in tensors:
            func(*args, **kwargs)

    return run


def model_config(cfg: RunConfig):
    """The pipeline's model config, with a vocabulary of ``data.vocab_size`` (no tokenizer)."""
    return stage_model_config(cfg, SimpleNamespace(vocab_size=cfg.data.vocab_size, image_id=1))


def stage1_step(cfg: RunConfig):
    """One step of stage 1 as ``stages._pretrain`` runs it."""
    torch.manual_seed(0)
    model = TinyModel(model_config(cfg))
    model.set_trainable("lm")
    opt = make_optimizer(model, cfg.pretrain.lr)
    B, S = cfg.pretrain.batch_size, cfg.model.max_seq_len
    x = torch.randint(2, cfg.data.vocab_size, (B, S))

    def step():
        loss = model(x, labels=x, logits="none").loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step, B * S


def stage3_step(cfg: RunConfig, arm_name: str = "smar"):
    """One step of stage 3 as ``tune.tune`` runs it: upcycled MoE (trainable MoE layers and
    projector), a batch of image questions (``image_tokens`` placeholders, a prompt and answer
    of ``label_len`` labelled tokens) and the arm's routing objective."""
    torch.manual_seed(0)
    t = cfg.tune
    mcfg = model_config(cfg)
    arm = make_arm(arm_name, smar_weight=t.smar_weight, lb_weight=t.lb_weight, band=tuple(t.band))
    model = prepare(TinyModel(mcfg), cfg, arm, torch.Generator().manual_seed(0))
    opt = make_optimizer(model, t.lr)
    B, P, label_len = t.batch_size, mcfg.image_tokens, 20  # measured: questions + answers ~20
    S = 1 + P + label_len
    ids = torch.randint(2, cfg.data.vocab_size, (B, S))
    ids[:, 1 : 1 + P] = mcfg.image_token_id
    labels = ids.masked_fill(ids == mcfg.image_token_id, -100)
    labels[:, 0] = -100
    pixels = torch.randn(B, mcfg.channels, mcfg.image_size, mcfg.image_size)
    mod = (ids == mcfg.image_token_id).long()

    def step():
        out = model(ids, pixels, labels, modality_ids=mod, logits="none")
        aux, _ = arm_objective(out, cfg, arm)
        opt.zero_grad(set_to_none=True)
        (out.loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step, B * S


def measure(name: str, step, tokens: int, threads: int, reps: int) -> None:
    torch.set_num_threads(threads)
    step()  # optimizer state exists from here on
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        step()
    flops = counter.get_total_flops()
    rec = RecordMatmuls()
    with rec:
        step()
    mm_flops = sum(v for op, v in counter.get_flop_counts()["Global"].items() if op in _MATMULS)
    t = median_seconds({"step": step, "sgemm": replay(rec.calls)}, reps)
    achieved, peak = flops / t["step"], mm_flops / t["sgemm"]
    print(
        f"{name}: {threads} thread(s), {tokens} tokens/step, {flops / 1e9:.2f} GFLOP/step "
        f"({mm_flops / flops:.0%} in {len(rec.calls)} matrix products)\n"
        f"  step {t['step'] * 1e3:.1f} ms = {tokens / t['step']:,.0f} tokens/s, "
        f"{achieved / 1e9:.1f} GFLOP/s; the same matrix products alone {t['sgemm'] * 1e3:.1f} ms "
        f"= {peak / 1e9:.1f} GFLOP/s\n"
        f"  share of sgemm FLOP/s: {achieved / peak:.0%} (target >= 60%)"
    )


def eval_share(cfg: RunConfig) -> None:
    """Evaluation against training of one default stage-3 run, on the demo's cached data."""
    from smar.testbed.data.bundle import load_bundle
    from smar.testbed.evaluate import eval_sets, evaluate_model, routing_summary
    from smar.testbed.tune import Job, tune

    torch.set_num_threads(1)
    bundle = load_bundle(cfg)  # the demo's data (built once, cached)
    torch.manual_seed(0)
    base = TinyModel(model_config(cfg))
    t0 = time.perf_counter()
    model, arm, _ = tune(cfg, Job(name="bench", arm="smar"), bundle, base)
    t1 = time.perf_counter()
    sets = eval_sets(cfg, bundle)  # built once per worker process, for all its runs
    t2 = time.perf_counter()
    evaluate_model(model, cfg, bundle, sets, arm.modality)
    routing_summary(model, cfg, bundle, arm.modality)
    t3 = time.perf_counter()
    train, ev = t1 - t0, t3 - t2
    print(
        f"stage-3 run, 1 thread: training {train:.1f} s ({cfg.tune.steps} steps), evaluation "
        f"{ev:.1f} s: {ev / (train + ev):.0%} of the run (target <= 10%); building the "
        f"evaluation sets {t2 - t1:.1f} s once per worker"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--eval", action="store_true", help="also time a stage-3 run's evaluation")
    args = ap.parse_args()
    cfg = RunConfig()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {args.reps} reps, medians")
    measure("stage 1 (dense LM)", *stage1_step(cfg), default_threads, args.reps)
    measure("stage 3 (MoE, smar arm)", *stage3_step(cfg), 1, args.reps)
    if args.eval:
        eval_share(cfg)


if __name__ == "__main__":
    main()
