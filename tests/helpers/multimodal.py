"""Each multimodal MoE family's own multimodal forward, on its tiny model (tests/helpers/families.py).

An image goes through the family's own image processor (its PIL one: torchvision is not a
dependency), as a user's data would; the number of image tokens is what the family's
``get_image_features`` returns for it, and that many image placeholders (between the vision
start and end tokens that rotary-index families look for) go into ``input_ids``. The modality
token ids are moved into the tiny vocabulary. :func:`multimodal_batch` returns the batch and the
modality ids the config's token ids give, or raises :class:`CannotRun` with the reason.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

IMG, VSTART, VEND = 100, 101, 102
TOKEN_FIELDS = {"image_token_id": IMG, "image_token_index": IMG, "vision_start_token_id": VSTART,
                "vision_end_token_id": VEND}  # fmt: skip


class CannotRun(Exception):
    """The family's multimodal forward cannot run here; the message says why."""


# families whose processor uses another family's image processor without registering one
SHARED_PROCESSOR = {"qwen3_vl_moe": "qwen3_vl", "glm4v_moe": "glm4v"}
# image sides the processor must be given (Aria's tower only takes 490 or 980 pixel images)
SIZES = {"aria": 980}  # (the tiny tower, 32-pixel patches, still gives 900 patches)


def _image_processor(family: str, vision):
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(SHARED_PROCESSOR.get(family, family))
    if not names:
        raise CannotRun("no image processor registered for it")
    if "pil" not in names:
        raise CannotRun(f"its image processor ({names.get('torchvision')}) needs torchvision")
    processor = getattr(transformers, names["pil"])()
    # patches as the (tiny) tower cuts them: Qwen2-VL's processor defaults to 14-pixel patches,
    # Qwen3-VL's tower to 16
    for mine, theirs in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                         ("temporal_patch_size", "temporal_patch_size")):  # fmt: skip
        value = getattr(vision, theirs, None)
        if isinstance(getattr(processor, mine, None), int) and isinstance(value, int):
            setattr(processor, mine, value)
    return processor


def _num_tokens(features, hidden: int) -> int:
    """Image tokens in what ``get_image_features`` returned (a tensor, a list, an output)."""
    for attr in ("pooler_output", "last_hidden_state", "image_embeds"):
        if hasattr(features, attr) and getattr(features, attr) is not None:
            features = getattr(features, attr)
            break
    if isinstance(features, torch.Tensor):
        return features.numel() // hidden
    if isinstance(features, (list, tuple)):
        return sum(_num_tokens(f, hidden) for f in features if f is not None)
    raise CannotRun(f"get_image_features returned {type(features).__name__}")


def multimodal_batch(family: str, model: torch.nn.Module, size: int = 64):
    """``(batch, ids)``: a one-sample batch with text and one image, and the modality ids (0 text,
    1 image) of its tokens from the config's image token id."""
    from PIL import Image

    config = model.config
    for name, value in TOKEN_FIELDS.items():
        if hasattr(config, name):
            setattr(config, name, value)
    if not any(hasattr(config, n) for n in ("image_token_id", "image_token_index")):
        raise CannotRun("its config names no image token id")
    inner = getattr(model, "model", model)
    if getattr(inner, "vision_tower", 1) is None or getattr(inner, "visual", 1) is None:
        raise CannotRun("its tiny model (its recipe) has no vision tower")
    processor = _image_processor(family, getattr(config, "vision_config", None))
    size = SIZES.get(family, size)
    pixels = np.random.RandomState(0).randint(0, 255, (size, size, 3), dtype=np.uint8)
    try:
        processed = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    except Exception as e:
        raise CannotRun(f"its image processor failed: {type(e).__name__}: {str(e)[:120]}") from e
    accepted = set(inspect.signature(model.forward).parameters)
    pix = {k: v for k, v in processed.items() if k in accepted and isinstance(v, torch.Tensor)}
    if "pixel_values" not in pix:
        raise CannotRun(f"its forward takes none of the processor's outputs {sorted(processed)}")
    get = getattr(model, "get_image_features", None) or model.model.get_image_features
    wanted = set(inspect.signature(get).parameters)
    try:
        with torch.no_grad():
            features = get(**{k: v for k, v in pix.items() if k in wanted})
    except Exception as e:
        raise CannotRun(f"its vision tower failed: {type(e).__name__}: {str(e)[:160]}") from e
    n = _num_tokens(features, config.get_text_config().hidden_size)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 90, (10,), generator=g).tolist()
    seq = text[:4] + [VSTART] + [IMG] * n + [VEND] + text[4:]
    input_ids = torch.tensor([seq])
    ids = (input_ids == IMG).long()
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **pix)
    if "mm_token_type_ids" in accepted:  # what its processor returns beside input_ids
        batch["mm_token_type_ids"] = ids
    return batch, ids
