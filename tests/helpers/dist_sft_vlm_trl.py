"""examples/sft_vlm_trl.py under whatever launcher starts it (python, torchrun), with plain SGD at
a constant rate, no clipping and the samples in order, so that N processes can be held against
one process on N times the batch (Adam's first steps, about lr * sign(g), would magnify rounding
differences in tiny gradients): the script tests/test_example_trl.py starts.

Usage: ``[torchrun --nproc_per_node 2] tests/helpers/dist_sft_vlm_trl.py RECORD_DIR ARGS...`` where ARGS
are the example's. Each rank writes ``RECORD_DIR/rank{r}.pt``: the world size its trainer saw,
the class of its model wrapper, whether it saves, the batches it trained on (``input_ids`` and
``attention_mask``), the loss log and every router's weight and modality bias before and after
training.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import sys

import torch

EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "sft_vlm_trl.py"
SGD = {"optim": "sgd", "lr_scheduler_type": "constant", "max_grad_norm": 0.0,
       "train_sampling_strategy": "sequential"}  # fmt: skip


def main() -> None:
    record, argv = sys.argv[1], sys.argv[2:]
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # as the example's own run
    torch.set_num_threads(1)
    # loaded as a module, not run, so that its collator class can be swapped for a recording one
    spec = importlib.util.spec_from_file_location("sft_vlm_trl", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    seen = []

    class Recording(example.MaskImageTokens):
        def __call__(self, examples: list[dict]) -> dict:
            batch = super().__call__(examples)
            seen.append({k: batch[k].clone() for k in ("input_ids", "attention_mask")})
            return batch

    example.MaskImageTokens = Recording
    # the routers as training starts: the model folder's, with SMAR's bias (zeros) attached
    import transformers

    import smar

    folder = argv[argv.index("--model") + 1]
    fresh = transformers.AutoModelForImageTextToText.from_pretrained(folder)
    smar.attach(fresh, smar.SMARConfig())
    before = routers(fresh)
    trainer = example.main(argv, SGD)
    args = trainer.args
    torch.save(
        {
            "world": args.world_size,
            "wrapped": type(trainer.model_wrapped).__name__,
            "should_save": args.should_save,
            # the dataloader collates a batch ahead of the step that takes it
            "batches": seen[: trainer.state.global_step],
            "history": [h for h in trainer.state.log_history if "loss" in h],
            "before": before,
            "routers": routers(trainer.model),
        },
        os.path.join(record, f"rank{args.process_index}.pt"),
    )


def routers(model) -> dict[str, torch.Tensor]:
    """Every router's weight and modality bias, by name (SMAR's wrapper's name stripped)."""
    return {
        n.replace(".router.", "."): p.detach().clone()
        for n, p in model.named_parameters()
        if ".gate." in n or n.endswith("modality_bias")
    }


if __name__ == "__main__":
    main()
