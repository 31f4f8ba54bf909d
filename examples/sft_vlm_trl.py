"""Vision fine-tuning of a MoE multimodal LM with TRL's ``SFTTrainer`` and SMAR.

Data: a JSON file of conversations plus the folder its image paths are relative to, optionally
mixed with a pure-text set at a chosen share of samples. A record may come in LLaVA's format::

    [{"id": "0001", "image": "coco/0001.png",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                        {"from": "gpt", "value": "A red square."}]}, ...]

or ShareGPT's (``"from"``: human, gpt, user, assistant or system), or with role/content turns
(``{"role": "user", "content": "<image>\\nWhat is shown?"}``, under ``"conversations"`` or
``"messages"``; the ``<image>`` may be left out, as in TRL's string format), or in TRL's typed
content::

    {"images": ["coco/0001.png"],
     "messages": [{"role": "user", "content": [{"type": "image"},
                                               {"type": "text", "text": "What is shown?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]}

where an image item may also hold its path (``{"type": "image", "image": "coco/0001.png"}``, or
``"path"``); typed image items stay where they are, while the other formats show the images first
in the first user turn, as LLaVA and TRL do. A conversation gives the same tokens in any format.
(``.jsonl``, one record a line, works too; a record without images is a text sample.)

The model is a local folder holding the model and its processor (``save_pretrained`` of both),
e.g. a LLaVA around Qwen3-MoE or Mixtral, or Qwen3-VL-MoE. Every input file and record is checked
before the model is loaded; a problem stops the run with one line naming the file, the record and
the fix (for a record in no accepted format: the formats).

    python examples/sft_vlm_trl.py --model ./llava-qwen3-moe --data llava.json \\
        --image-folder ./images --text-data sharegpt.json --text-ratio 0.3 \\
        --smar-weight 1.0 --band 1.5 2.0 --lb-weight 0.01 --output-dir out
    torchrun --nproc-per-node 8 examples/sft_vlm_trl.py ...     # or: accelerate launch ...
    python examples/sft_vlm_trl.py --demo                        # tiny random model, CPU, seconds

Under torchrun or accelerate the Trainer sets up the processes and trains data-parallel (DDP),
on CPUs too (over gloo; the example sets ``use_cpu`` where there is no accelerator, which the
Trainer needs for that); ``--stats global`` (the default) computes SMAR's statistics over the
global batch; rank 0 alone writes the output folder. That holds the model (original router
keys, so a plain ``from_pretrained`` loads it), its processor, ``smar_bias.safetensors`` (reload
it with ``smar.hf.load_bias(model, folder)``) and ``trainer_state.json`` (its ``log_history``
holds the ``smar/*`` terms).

The TRL settings this needs (TRL 1.x), and why:

* ``router_aux_loss_coef=0.0``. ``SFTTrainer`` turns the model's own load balancing on
  (``output_router_logits``) for any MoE; on a LLaVA-style model its fused loss then fails with
  ``AttributeError: 'LlavaModelOutputWithPast' object has no attribute 'router_logits'``. SMAR
  owns load balancing here (``--lb-weight``), so the model's is off: one loss term, one owner.
* Non-reentrant activation checkpointing. ``SFTConfig`` checkpoints by default, and
  ``SFTTrainer`` makes it non-reentrant, which SMAR needs: reentrant checkpointing would cut its
  loss, computed from the router logits captured in the forward, off the graph (the trainer
  warns if that happens; TRL forces reentrant with PEFT under DeepSpeed ZeRO-3).
* Every sample has an ``images`` column (``[]`` for text). TRL decides from the first sample
  whether the data is vision data; then it skips its tokenizing pass (``dataset_kwargs=
  {"skip_prepare_dataset": True}`` and ``remove_unused_columns=False`` in TRL 0.x guides are
  what TRL 1.x does by itself for vision data), keeps ``messages`` and ``images`` for the
  collator, and builds ``DataCollatorForVisionLanguageModeling``, which runs the processor's
  chat template and image processing per batch (a batch of text samples only has no images).
  The images are decoded lazily by ``datasets.Image``. That collator labels every
  non-padding token, the image placeholders included; the example wraps it to leave them out
  of the loss (:class:`MaskImageTokens`).
* ``max_length``: the collator truncates after the processor has expanded ``<image>`` into the
  image's tokens; if it cuts into them TRL stops with "max_length is too short". Leave room for
  the image tokens (``--max-length 0`` turns truncation off).
* ``train_dataset`` must be a ``datasets.Dataset`` (TRL refuses lists and torch datasets).
* TRL's data-parallel default ``ddp_find_unused_parameters=True`` for VLMs stays: a batch of
  text samples leaves the vision tower without gradients.

Text samples get the image row of nothing: SMAR's modality ids come from the image placeholder
tokens (``image_token_id`` of the model's config), so a text sample's tokens are all text.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile

import smar
import smar.hf

log = logging.getLogger("sft_vlm_trl")
# a turn's "from" (LLaVA, ShareGPT) or "role" -> the chat role
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}  # fmt: skip
IMAGE = "<image>"


class DataError(ValueError):
    """A problem with an input file: one line naming the file, the record and the fix."""


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="local folder with the model and its processor")
    p.add_argument("--data", help="JSON (or JSONL) of image+text conversations (LLaVA, "
                   "ShareGPT, role/content or TRL's messages)")  # fmt: skip
    p.add_argument("--image-folder", help="folder the image paths are relative to "
                   "(default: the folder of --data)")  # fmt: skip
    p.add_argument("--text-data", help="JSON (or JSONL) of text conversations, any of the formats")
    p.add_argument("--text-ratio", type=float, default=0.0,
                   help="share of the mixed set drawn from --text-data, in [0, 1)")  # fmt: skip
    p.add_argument("--output-dir", default="sft_vlm_trl_out")
    p.add_argument("--demo", action="store_true",
                   help="tiny random LLaVA-Qwen3-MoE, generated data, CPU")  # fmt: skip
    t = p.add_argument_group("training (TRL's SFTConfig)")
    t.add_argument("--max-steps", type=int, default=-1, help="-1: --epochs decides")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=4, help="per device")
    t.add_argument("--gradient-accumulation-steps", type=int, default=1)
    t.add_argument("--lr", type=float, default=2e-5)
    t.add_argument("--max-length", type=int, default=2048, help="tokens per sample; 0: no limit")
    t.add_argument("--logging-steps", type=int, default=10)
    t.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps; 0: none")
    t.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (GPUs)")
    t.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("SMAR (smar.SMARConfig)")
    s.add_argument("--smar-weight", type=float, default=1.0, help="weight of the band loss")
    s.add_argument("--band", type=float, nargs=2, default=(1.5, 2.0), metavar=("LOW", "HIGH"),
                   help="tolerance band of the modality routing divergence (MRD)")  # fmt: skip
    s.add_argument("--lb-weight", type=float, default=0.01, help="SMAR's load balancing; 0: off")
    s.add_argument("--z-weight", type=float, default=0.0, help="router z-loss")
    s.add_argument("--no-modality-bias", action="store_true",
                   help="keep the routers as they are (no trainable modality bias)")  # fmt: skip
    s.add_argument("--stats", choices=("global", "local"), default="global",
                   help="statistics over the batch of all ranks, or of each rank")  # fmt: skip
    s.add_argument("--accumulate", action="store_true",
                   help="statistics pool the micro-batches of an optimizer step")  # fmt: skip
    args = p.parse_args(argv)
    if not args.demo and not (args.model and args.data):
        p.error("--model and --data are required (or --demo for a tiny run on generated data)")
    if not 0 <= args.text_ratio < 1:
        p.error(f"--text-ratio must be in [0, 1); got {args.text_ratio}")
    if args.text_ratio > 0 and not args.text_data and not args.demo:
        p.error("--text-ratio > 0 needs --text-data")
    return args


def smar_config(args: argparse.Namespace) -> smar.SMARConfig:
    """SMAR's options from the command line (validated by SMARConfig)."""
    return smar.SMARConfig(
        smar_weight=args.smar_weight, band=tuple(args.band), lb_weight=args.lb_weight,
        z_weight=args.z_weight, modality_bias=not args.no_modality_bias, stats=args.stats,
        accumulate=args.accumulate,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Data: records in any accepted format -> {"messages": typed chat turns, "images": image paths}

FORMATS = (
    'accepted formats: LLaVA/ShareGPT {"image", "conversations": [{"from": "human" | "gpt" | '
    '"user" | "assistant" | "system", "value"}]}; role/content {"image", "conversations" | '
    '"messages": [{"role", "content": "..."}]}; TRL {"images", "messages": [{"role", "content": '
    '[{"type": "image"}, {"type": "text", "text"}]}]}'
)


def read_records(path: str) -> list:
    """The records of a JSON list or a JSONL file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; pass the path of a JSON (or JSONL) data file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{n}: not JSON ({e.msg}); one record per line"
                    ) from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}:{e.colno}: not JSON ({e.msg}); a .json file holds one JSON list "
            "of records (use .jsonl for one record a line)"
        ) from None
    if not isinstance(records, list):
        raise DataError(f"{path}: holds a {type(records).__name__}; expected a list of records")
    return records


def to_example(record, where: str, image_folder: str | None) -> dict:
    """One record, in any accepted format (:data:`FORMATS`), as TRL's conversational sample with
    typed content: ``{"messages": [{"role", "content": [{"type": "image"}, {"type": "text",
    "text"}]}], "images": [path, ...]}``, one path per image item, in their order. ``where`` names
    the record in errors.

    The formats differ only in where a turn's role and text are and where its images go; one
    branch per format reads that, and the rest is shared, so that one conversation gives the
    same tokens whatever format it came in:

    * ``{"from", "value"}`` turns (LLaVA, ShareGPT) and ``{"role", "content": "..."}`` turns:
      LLaVA puts the images first in the first human turn whatever the place of ``<image>``; so
      does TRL with string content, so ``<image>`` is only counted and removed (role/content
      turns may leave it out altogether, as TRL's string format does);
    * ``{"role", "content": [items]}`` turns (TRL's typed content): the image items stay where
      they are; each has its path inline (``"image"`` or ``"path"``) or takes the next one of the
      record's ``images`` (or ``image``).
    """
    keys = [k for k in ("conversations", "messages") if isinstance(record, dict) and k in record]
    if len(keys) == 2:
        raise DataError(f"{where}: both 'conversations' and 'messages'; keep one")
    turns = record[keys[0]] if keys else None
    if not turns or not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: no 'conversations' list (or 'messages' list) of turns; "
                        f"{FORMATS}")  # fmt: skip
    if "image" in record and "images" in record:
        raise DataError(f"{where}: both 'image' and 'images'; keep one")
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise DataError(f"{where}: 'image' / 'images' must be a path or a list of paths")

    if all("from" in t for t in turns):  # LLaVA, ShareGPT
        messages = text_turns(turns, "from", "value", len(images), where)
    elif all("role" in t for t in turns) and any(isinstance(t.get("content"), list) for t in turns):
        messages = [typed_turn(n, t, where) for n, t in enumerate(turns)]  # TRL's typed content
    elif all("role" in t for t in turns):  # role/content with text content
        messages = text_turns(turns, "role", "content", len(images), where)
    else:
        raise DataError(f"{where}: turns are neither all {{'from', 'value'}} nor all "
                        f"{{'role', 'content'}}; {FORMATS}")  # fmt: skip

    paths, left = [], list(images)  # inline paths stay; the other items take the record's
    for item in (i for m in messages for i in m["content"] if i["type"] == "image"):
        if "path" not in item and not left:
            raise DataError(f"{where}: more image items than image paths; give each its path "
                            "in 'images' or inline ({'type': 'image', 'image': path})")  # fmt: skip
        paths.append(item.pop("path") if "path" in item else left.pop(0))
    if left:
        raise DataError(f"{where}: {len(images)} image path(s) but {len(images) - len(left)} "
                        "image item(s) to show them in; one item per image")  # fmt: skip
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant ('gpt') turn; there is nothing to learn from")
    paths = [os.path.join(image_folder or "", p) for p in paths]
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{where}: image {path} not found; pass --image-folder, the folder "
                            "its image paths are relative to")  # fmt: skip
    return {"messages": messages, "images": paths}


def role(turn: dict, key: str, n: int, where: str) -> str:
    """The chat role of turn ``n``, whose speaker is under ``key`` ("from" or "role")."""
    if not isinstance(turn[key], str) or turn[key] not in ROLES:
        said = "is from" if key == "from" else "has role"
        raise DataError(f"{where}: turn {n} {said} {turn[key]!r}; use one of {sorted(ROLES)}")
    return ROLES[turn[key]]


def text_turns(turns: list[dict], key: str, text: str, images: int, where: str) -> list[dict]:
    """Typed turns of turns whose text is a string under ``text``, with ``images`` image
    items first in the first user turn (where LLaVA and TRL show them)."""
    messages, placeholders = [], 0
    for n, turn in enumerate(turns):
        if not isinstance(turn.get(text), str):
            raise DataError(f"{where}: turn {n} has no text {text!r}")
        placeholders += turn[text].count(IMAGE)
        content = [{"type": "text", "text": turn[text].replace(IMAGE, "").strip()}]
        messages.append({"role": role(turn, key, n, where), "content": content})
    if placeholders != images and not (key == "role" and placeholders == 0):
        raise DataError(
            f"{where}: {images} image(s) but {placeholders} '{IMAGE}' placeholder(s); put one "
            f"'{IMAGE}\\n' in the first human turn per image"
        )
    first = next((m for m in messages if m["role"] == "user"), None)
    if images and first is None:
        raise DataError(f"{where}: {images} image(s) but no user turn to show them in")
    if images:
        first["content"][:0] = [{"type": "image"} for _ in range(images)]
    return messages


def typed_turn(n: int, turn: dict, where: str) -> dict:
    """Turn ``n`` of TRL's typed content, each item reduced to ``{"type", "text"}`` (one schema
    for every record of the dataset), an inline image path kept under ``"path"``."""
    content = turn["content"]
    content = [{"type": "text", "text": content}] if isinstance(content, str) else content
    items = []
    for item in content if isinstance(content, list) else [content]:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            items.append({"type": "text", "text": item["text"]})
        elif kind == "image":
            inline = item["image"] if item.get("image") is not None else item.get("path")
            if inline is not None and not isinstance(inline, str):
                raise DataError(f"{where}: turn {n}: an inline image must be a path")
            items.append({"type": "image"} | ({"path": inline} if inline is not None else {}))
        else:
            raise DataError(f"{where}: turn {n}: content items are {{'type': 'image'}} or "
                            f"{{'type': 'text', 'text': str}}; got {item!r:.60}")  # fmt: skip
    return {"role": role(turn, "role", n, where), "content": items}


def load_examples(path: str, image_folder: str | None = None) -> list[dict]:
    """Every record of a file in an accepted format, checked (images must exist)."""
    folder = os.path.dirname(path) if image_folder is None else image_folder
    out = []
    for i, record in enumerate(read_records(path)):
        rid = record.get("id") if isinstance(record, dict) else None
        where = f"{path}: record {i}" + (f" (id {rid!r})" if rid is not None else "")
        out.append(to_example(record, where, folder))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def mix(examples: list[dict], texts: list[dict], ratio: float, seed: int) -> list[dict]:
    """Every example plus ``round(n * ratio / (1 - ratio))`` text samples (repeated when the text
    set is smaller), shuffled: the text samples make up ``ratio`` of the result."""
    k = round(len(examples) * ratio / (1 - ratio))
    rng = random.Random(seed)  # the same mix on every rank
    drawn = []
    while len(drawn) < k:
        order = list(range(len(texts)))
        rng.shuffle(order)
        drawn += [texts[j] for j in order[: k - len(drawn)]]
    if k > len(texts):
        log.info("text set repeated: %d samples drawn from %d", k, len(texts))
    out = examples + drawn
    rng.shuffle(out)
    return out


def to_dataset(examples: list[dict]):
    """A ``datasets.Dataset`` whose images are decoded when a batch is built."""
    import datasets

    ds = datasets.Dataset.from_list(examples)
    return ds.cast_column("images", datasets.List(datasets.Image()))


# ----------------------------------------------------------------------------------------------
# Training


class MaskImageTokens:
    """TRL's vision collator with the image placeholder tokens taken out of the loss (TRL 1.x
    labels every non-padding token, so the model would learn to predict the placeholders)."""

    def __init__(self, collator, image_token_id: int):
        self.collator, self.image_token_id = collator, image_token_id

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        batch["labels"][batch["input_ids"] == self.image_token_id] = -100  # (B, S)
        return batch


def main(argv: list[str] | None = None, sft_options: dict | None = None):
    """Runs the fine-tuning; returns the trainer (the tests read it). ``sft_options``: more
    ``SFTConfig`` fields, beyond the command line's (the tests fix the optimizer and the order)."""
    args = parse_args(argv)
    if not args.demo:
        trainer = run(args, sft_options)
    else:
        with tempfile.TemporaryDirectory() as demo:
            args.model, args.data, args.text_data = write_demo(demo)
            args.output_dir = os.path.join(demo, "out")
            args.text_ratio = args.text_ratio or 0.25
            args.max_steps, args.batch_size, args.logging_steps, args.lr = 2, 2, 1, 1e-2
            trainer = run(args, sft_options)
    import torch.distributed as dist

    # Leave the process group the Trainer joined, its work done: a rank that exits still in it
    # can abort as the interpreter ends (gloo: "terminate called without an active exception").
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return trainer


def run(args: argparse.Namespace, sft_options: dict | None = None):
    config = smar_config(args)
    try:
        examples = load_examples(args.data, args.image_folder)
        texts = load_examples(args.text_data) if args.text_data else []
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.text_ratio > 0:
        examples = mix(examples, texts, args.text_ratio, args.seed)
    train = to_dataset(examples)

    import torch
    import transformers
    import trl

    class SMARSFTTrainer(smar.hf.SMARTrainerMixin, trl.SFTTrainer):
        """TRL's SFTTrainer with SMAR's routing loss, logging and bias saving."""

    model = transformers.AutoModelForImageTextToText.from_pretrained(args.model)
    processor = transformers.AutoProcessor.from_pretrained(args.model)
    sft = trl.SFTConfig(
        args.output_dir,
        router_aux_loss_coef=0.0,  # see the docstring: TRL's MoE loss fails on LLaVA; SMAR's lb
        max_length=args.max_length or None,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps,
        logging_steps=args.logging_steps, bf16=args.bf16, seed=args.seed, report_to=[],
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        disable_tqdm=args.demo,
        # Without an accelerator, the Trainer (accelerate) makes a data-parallel (gloo) state
        # only with use_cpu; else each process torchrun or accelerate starts trains alone (world
        # size 1, no DDP, all writing the output folder) while SMAR all-reduces its statistics
        # across them. One process on CPU trains the same either way.
        **{"use_cpu": not torch.accelerator.is_available(), **(sft_options or {})},
    )  # fmt: skip
    trainer = SMARSFTTrainer(
        model=model, args=sft, train_dataset=train, processing_class=processor, smar_config=config
    )
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is not None:  # wrapped after TRL built it (and set the pad token)
        trainer.data_collator = MaskImageTokens(trainer.data_collator, image_token_id)
    trainer.train()
    trainer.save_model(args.output_dir)  # model + processor + smar_bias.safetensors
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))
        with open(os.path.join(args.output_dir, "sft_vlm_trl_args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        for h in trainer.state.log_history:
            if "loss" in h:
                terms = {k: round(v, 4) for k, v in h.items() if k == "loss" or "smar/" in k}
                log.info("step %d %s", h["step"], terms)
        log.info("saved to %s", args.output_dir)
    return trainer


# ----------------------------------------------------------------------------------------------
# --demo: a tiny random LLaVA-Qwen3-MoE with its processor, and LLaVA-format data


def write_demo_model(folder: str, image_size: int = 16, patch: int = 8) -> str:
    """Saves a tiny random LLaVA around Qwen3-MoE and its processor (a word-level tokenizer with
    a chat template, a CLIP image processor) to ``folder``, as a real model folder holds them."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<unk>", IMAGE, "user:", "assistant:", "system:"]
    words += [f"w{i}" for i in range(64 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.add_tokens([IMAGE], special_tokens=True)  # split out of "<image><image>..."
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
        "{% if m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
    )
    crop = {"height": image_size, "width": image_size}
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size=crop
        ),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=template,
    )  # fmt: skip
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                  patch_size=patch, projection_dim=32)  # fmt: skip
    text = dict(model_type="qwen3_moe", vocab_size=len(words), hidden_size=32,
                intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                num_experts_per_tok=2, max_position_embeddings=256)  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=words.index(IMAGE),
        vision_feature_select_strategy="default", image_seq_length=(image_size // patch) ** 2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_demo(folder: str, n: int = 8) -> tuple[str, str, str]:
    """The demo's model folder, image JSON (with PNGs) and text JSON; returns their paths."""
    from PIL import Image

    model = write_demo_model(os.path.join(folder, "model"))
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    records, texts = [], []
    for i in range(n):
        color = (37 * i % 256, 91 * i % 256, 53 * i % 256)
        Image.new("RGB", (20, 16), color).save(os.path.join(folder, "images", f"{i}.png"))
        records.append({"id": f"img{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": f"{IMAGE}\nw{i} w9"},
            {"from": "gpt", "value": f"w{10 + i} w{20 + i}"}]})  # fmt: skip
        texts.append({"id": f"txt{i}", "conversations": [
            {"from": "human", "value": f"w{30 + i} w9"},
            {"from": "gpt", "value": f"w{40 + i}"}]})  # fmt: skip
    for name, rows in (("llava.json", records), ("text.json", texts)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(rows, f)
    return model, os.path.join(folder, "llava.json"), os.path.join(folder, "text.json")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
