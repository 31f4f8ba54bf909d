"""SMARTrainer on a tiny Qwen3-MoE for a few SGD steps, under whatever launcher starts it
(python, torchrun, accelerate launch, deepspeed): the script the engine tests run.

Writes to ``--out`` (rank 0): ``log.json`` (the Trainer's log history), ``routers.pt`` (every
router's weight and modality bias after training), and the saved model with
``smar_bias.safetensors``; ``reload.pt`` holds the bias that a fresh model loads from it.

Usage: ``torchrun --nproc_per_node 2 tests/helpers/dist_trainer.py --out DIR [--stats local]
[--accumulate] [--per-device 2] [--ga 1] [--deepspeed ds.json] [--fsdp]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_common import router_weights, samples, tiny_moe  # noqa: E402

STEPS = 3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--stats", default="global")
    p.add_argument("--accumulate", action="store_true")
    p.add_argument("--per-device", type=int, default=2)
    p.add_argument("--ga", type=int, default=1)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--fsdp", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    import transformers

    import smar
    import smar.hf
    from smar.hf.saving import load_bias_into

    world = int(os.environ.get("WORLD_SIZE", "1"))
    n = STEPS * a.per_device * a.ga * world
    kw = {}
    if a.deepspeed:
        kw["deepspeed"] = a.deepspeed
    if a.fsdp:
        kw["fsdp"] = "full_shard"
        kw["fsdp_config"] = {"fsdp_version": 2, "reshard_after_forward": True}
    args = transformers.TrainingArguments(
        a.out, per_device_train_batch_size=a.per_device, gradient_accumulation_steps=a.ga,
        max_steps=STEPS, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        train_sampling_strategy="sequential", max_grad_norm=0.0, seed=0, **kw,
    )  # fmt: skip
    model = tiny_moe()
    config = smar.SMARConfig(stats=a.stats, accumulate=a.accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = smar.hf.SMARTrainer(
            model=model, args=args, train_dataset=samples(n), smar_config=config
        )
        before = router_weights(trainer.model)
        trainer.train()
        trainer.save_model(os.path.join(a.out, "model"))
    after = router_weights(trainer.model)
    if trainer.is_world_process_zero():
        history = [h for h in trainer.state.log_history if "loss" in h]
        with open(os.path.join(a.out, "log.json"), "w") as f:
            wrapped = type(trainer.model_wrapped).__name__
            json.dump({"history": history, "world": world, "wrapped": wrapped}, f)
        torch.save(
            {"update": {n: after[n] - before[n] for n in after}, "final": after},
            os.path.join(a.out, "routers.pt"),
        )
        fresh = tiny_moe()
        reg = smar.attach(fresh, config)
        load_bias_into(reg, os.path.join(a.out, "model"))
        bias = {k: v.detach() for k, v in reg.bias_state_dict().items()}
        torch.save(bias, os.path.join(a.out, "reload.pt"))
    # every rank leaves the process group together: a rank exiting with gloo's threads still
    # running can abort ("terminate called without an active exception") after a finished run
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
