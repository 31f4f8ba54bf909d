"""The Hugging Face source of ``smar analyze``: a model folder and a JSONL file of samples,
run batch by batch with the folder's own processor, its routing captured (imports transformers).

Samples are LLaVA conversations (``{"image": "a.png", "conversations": [{"from": "human",
"value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}``, image paths relative
to the file) or plain text (``{"text": "..."}``).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from smar.errors import UsageError
from smar.modality import modality_ids, special_token_ids
from smar.source import Routed, Source

if TYPE_CHECKING:
    from transformers import PretrainedConfig, ProcessorMixin

    from smar.capture import RouterCapture

__all__ = ["read_jsonl", "check_sample", "HFEncoder", "hf_source"]

log = logging.getLogger(__name__)


def read_jsonl(
    path: str | os.PathLike, max_samples: int | None = None, *, skipped: list | None = None
) -> Iterator[dict]:
    """Samples of a JSONL file one by one; image paths are relative to the file, and each image
    is checked as it is read: a missing or unreadable one raises ``ValueError`` naming the line,
    or, given a ``skipped`` list, the sample is left out and its line appended there. A line that
    is not UTF-8, not a JSON object or not a sample (see :func:`check_sample`) raises
    ``ValueError`` naming ``file:line`` and the fix."""
    path = Path(path)
    n = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{where} is not UTF-8 text (byte {e.start} of the line); fix: "
                                 "save the file as UTF-8") from None  # fmt: skip
            if not line.strip():
                continue
            if max_samples is not None and n >= max_samples:
                return
            try:
                sample = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{where} is not JSON ({e}); fix: one JSON object a line"
                                 ) from None  # fmt: skip
            check_sample(sample, where)
            sample["images"] = [str((path.parent / p).resolve()) for p in _image_paths(sample)]
            bad = _unreadable(sample["images"])
            if bad:
                if skipped is None:
                    raise UsageError(f"{where}: {bad}; fix: correct the path or pass "
                                     "--skip-bad-images")  # fmt: skip
                skipped.append(where)
                continue
            n += 1
            yield sample


_FORMAT = ('fix: write {"image": "a.png", "conversations": [{"from": "human", "value": '
           '"<image>\\nWhat is it?"}, ...]} or {"text": "..."}')  # fmt: skip


def check_sample(sample: object, where: str) -> None:
    """Raises ``ValueError`` naming ``where`` (``file:line``) when ``sample`` is not a LLaVA
    conversation (a list of turns with a string ``value``) or a text sample (a non-empty
    ``text`` string), has image paths that are not strings, or has not one ``<image>`` mark per
    image."""
    if not isinstance(sample, dict):
        raise UsageError(f"{where} is a JSON {type(sample).__name__}, not an object; {_FORMAT}")
    if "conversations" in sample:
        turns = sample["conversations"]
        if not isinstance(turns, list) or not turns:
            raise UsageError(
                f"{where}: 'conversations' must be a non-empty list of turns; {_FORMAT}"
            )
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise UsageError(f"{where}: turn {k} of 'conversations' has no string 'value'; "
                                 f"{_FORMAT}")  # fmt: skip
        texts = [t["value"] for t in turns]
    elif "text" in sample:
        texts = [sample["text"]]
        if not isinstance(sample["text"], str):
            raise UsageError(f"{where}: 'text' must be a string; {_FORMAT}")
    else:
        raise UsageError(f"{where}: a sample needs 'conversations' (LLaVA format) or 'text'; "
                         f"{_FORMAT}")  # fmt: skip
    if not any(t.replace("<image>", "").strip() for t in texts):
        raise UsageError(f"{where}: the sample holds no text; fix: give it some text")
    paths = _image_paths(sample)
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        got = json.dumps(sample.get("image", sample.get("images")))[:40]
        raise UsageError(f"{where}: 'image' must be a path or a list of paths (got {got}); fix: "
                         "name the image files relative to the JSONL file")  # fmt: skip
    marks = sum(t.count("<image>") for t in texts)
    if marks != len(paths):
        raise UsageError(
            f"{where}: {len(paths)} image(s) but {marks} <image> mark(s) in the text; fix: put "
            "one <image> in the conversation per image"
        )


def _image_paths(sample: dict[str, Any]) -> Any:
    """The sample's ``image`` (or ``images``): a path as a list of one; None as no image."""
    images = sample.get("image", sample.get("images"))
    if images is None:
        return []
    return [images] if isinstance(images, str) else images


def _unreadable(paths: list[str]) -> str | None:
    """Why the first image of ``paths`` that cannot be read cannot be, or None."""
    from PIL import Image, UnidentifiedImageError

    for p in paths:
        try:
            with Image.open(p) as img:
                img.verify()
        except FileNotFoundError:
            return f"image {p} does not exist"
        except IsADirectoryError:
            return f"image {p} is a folder, not an image"
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            return f"image {p} cannot be read ({type(e).__name__}: {str(e)[:80]})"
    return None


def _messages(sample: dict) -> list[dict]:
    """LLaVA conversation turns as chat messages; ``<image>`` marks become image entries."""
    if "conversations" not in sample:
        return [{"role": "user", "content": [{"type": "text", "text": sample["text"]}]}]
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    out = []
    for turn in sample["conversations"]:
        content = []
        for k, piece in enumerate(str(turn["value"]).split("<image>")):
            if k:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        out.append(
            {"role": roles.get(turn.get("from"), turn.get("from", "user")), "content": content}
        )
    return out


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json",
                   "special_tokens_map.json", "video_preprocessor_config.json")  # fmt: skip


def check_json_files(model_dir: str | os.PathLike) -> None:
    """The processor's and tokenizer's JSON files of a folder parse (a corrupt one is named in one
    line, where transformers' fallback would report it as missing)."""
    from smar.hf.loading import check_json_files as check

    check(model_dir, PROCESSOR_FILES, "the processor")


class HFEncoder:
    """Samples to model inputs with the model folder's own processor; when ``AutoProcessor``
    cannot be built (e.g. a video processor that needs torchvision), its tokenizer and image
    processor, each image's placeholder repeated as the processor would."""

    def __init__(self, model_dir: str, config: PretrainedConfig, mm_token_types: bool = False):
        import transformers

        self.config, self.mm_token_types = config, mm_token_types
        self.processor: ProcessorMixin | None = None
        check_json_files(model_dir)  # a garbled one would read as missing below
        try:
            proc = transformers.AutoProcessor.from_pretrained(model_dir)
            if isinstance(proc, transformers.ProcessorMixin):
                self.processor = proc
        except Exception as e:  # noqa: BLE001 (any failure: fall back to the parts)
            why = f"{type(e).__name__}: {str(e).strip()[:160]}"
            log.warning(
                "AutoProcessor(%s) failed (%s); tokenizer + image processor", model_dir, why
            )
        tok = getattr(self.processor, "tokenizer", None)
        # of the class AutoTokenizer picks for the folder
        self.tokenizer: Any = tok or transformers.AutoTokenizer.from_pretrained(model_dir)
        self.image_processor = getattr(self.processor, "image_processor", None)
        if self.processor is None and (Path(model_dir) / "preprocessor_config.json").exists():
            self.image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
        image_id = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
        token = getattr(self.processor, "image_token", None) or (
            self.tokenizer.convert_ids_to_tokens(image_id) if image_id is not None else None
        )
        self.image_token = cast("str | None", token)  # one id: one token
        placeholder = self.tokenizer.convert_tokens_to_ids(self.image_token) if (
            self.image_token is not None and image_id is not None) else image_id  # fmt: skip
        if placeholder != image_id:  # the model would look for images where no text puts them
            raise UsageError(
                f"{model_dir}: config.json's image token id {image_id} is not the processor's "
                f"image token {self.image_token!r} (id {placeholder}): the images would have no "
                "placeholders", f"set image_token_index (image_token_id) to {placeholder} in "
                "config.json, as the model was saved",
            )  # fmt: skip
        self.template = getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )

    def text(self, sample: dict) -> str:
        msgs = _messages(sample)
        if self.template:
            owner = self.processor if self.processor is not None else self.tokenizer
            return cast(str, owner.apply_chat_template(msgs, tokenize=False))  # a str untokenized
        parts = []
        for m in msgs:
            body = " ".join(self._placeholder() if c["type"] == "image" else c["text"]
                            for c in m["content"])  # fmt: skip
            parts.append(f"{m['role']}: {body}")
        return "\n".join(parts)

    def __call__(self, samples: list[dict]) -> dict:
        from PIL import Image

        texts = [self.text(s) for s in samples]
        images = [Image.open(p).convert("RGB") for s in samples for p in s["images"]]
        if images:
            self._placeholder()
        if self.processor is not None:
            return dict(self.processor(text=texts, images=images or None, padding=True,
                                       return_tensors="pt"))  # fmt: skip
        out = {}
        if images:
            if self.image_processor is None:
                raise UsageError("samples have images but the model folder has no image processor")
            out = dict(self.image_processor(images=images, return_tensors="pt"))
            counts = iter(self._tokens_per_image(out, len(images)))
            texts = [self._expand(t, counts) for t in texts]
        enc = dict(self.tokenizer(texts, padding=True, return_tensors="pt"))
        if self.mm_token_types:  # what the processor would add (Qwen-VL's M-RoPE needs it)
            tokens = special_token_ids(self.config)
            enc["mm_token_type_ids"] = modality_ids(enc["input_ids"], token_ids=tokens)
        return {**enc, **out}

    def _tokens_per_image(self, out: dict, n: int) -> list[int]:
        if "image_grid_thw" in out:  # Qwen-VL style: patches merged merge_size x merge_size
            merge = getattr(self.image_processor, "merge_size", 1) ** 2
            return [int(g.prod()) // merge for g in out["image_grid_thw"]]
        seq = getattr(self.config, "image_seq_length", None)
        if seq is None:
            raise UsageError("cannot tell how many tokens an image takes: use a model folder "
                             "whose processor loads with AutoProcessor")  # fmt: skip
        return [int(seq)] * n

    def _placeholder(self) -> str:
        """The image token the text holds for each image, or one line saying there is none."""
        if self.image_token is None:
            raise UsageError("the model config names no image token: cannot place images")
        return self.image_token

    def _expand(self, text: str, counts: Iterator[int]) -> str:
        token = self._placeholder()
        pieces = text.split(token)
        return pieces[0] + "".join(token * next(counts) + p for p in pieces[1:])


def hf_source(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_samples: int | None = None,
    name: str | None = None,
    bias: bool = True,
    skip_bad_images: bool = False,
) -> Source:
    """A Hugging Face model folder (loaded by :func:`smar.hf.loading.load_model_folder`, with
    its trained modality bias unless ``bias=False``) and a JSONL file of samples, as a
    :class:`Source`; modality ids come from the inputs (placeholder tokens or
    ``mm_token_type_ids``), padding is ignored. A sample whose image is missing or unreadable
    stops the analysis with its line, or with ``skip_bad_images`` is left out and counted
    (``source.info["skipped"]``)."""
    from smar.capture import record
    from smar.hf.loading import load_model_folder

    model_dir = str(model_dir)
    # Every sample and image checked before the model loads.
    skipped: list[str] | None = [] if skip_bad_images else None
    n = sum(1 for _ in read_jsonl(data, max_samples, skipped=skipped))
    if n == 0:
        why = f"all {len(skipped)} samples were skipped" if skipped else "it is empty or blank"
        raise UsageError(f"{data} holds no sample to analyse ({why}); fix: one JSON sample a line")
    loaded = load_model_folder(model_dir, bias=bias, tokenizer=True, routers=True)
    log.debug("%s", loaded.note)  # the commands print it (source.info["bias"])
    model = loaded.model
    accepts = inspect.signature(model.forward).parameters
    config = cast("PretrainedConfig", model.config)
    encoder = HFEncoder(model_dir, config, "mm_token_type_ids" in accepts)
    # With the bias attached, its regularizer captures the logits the routers route on.
    capture = loaded.regularizer or record(model)
    info = {
        "model": f"{type(model).__name__} ({model_dir})",
        "bias": loaded.note,
        "data": f"{data} ({n} samples, batches of {batch_size})",
        "routers": f"{len(capture.sites)} ({capture.sites[0].adapter.name}), top-{capture.top_k}",
    }
    if skipped:
        info["skipped"] = f"{len(skipped)} samples with a missing or unreadable image: " + (
            ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))  # fmt: skip
        log.warning("%s: %s", data, info["skipped"])

    def batches() -> Iterator[Routed]:
        with torch.no_grad():
            chunk: list[dict] = []
            for sample in read_jsonl(data, max_samples, skipped=[] if skip_bad_images else None):
                chunk.append(sample)
                if len(chunk) == batch_size:
                    yield _forward(model, capture, encoder(chunk))
                    chunk = []
            if chunk:
                yield _forward(model, capture, encoder(chunk))

    return Source(
        name=name or Path(model_dir).name,
        batches=batches,
        top_k=capture.top_k,
        router=capture.router,
        total=math.ceil(n / batch_size),
        layers=list(capture.layers),
        info=info,
    )


def _forward(model: nn.Module, capture: RouterCapture, inputs: dict[str, Any]) -> Routed:
    model(**inputs)
    ids = capture.modality_ids
    assert ids is not None  # derived from the inputs' input_ids
    return [z.float() for z in capture.logits()], ids
