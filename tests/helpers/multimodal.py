"""Each multimodal MoE family's own multimodal forward, on its tiny model (tests/helpers/families.py).

Images, video frames and audio features are random tensors of the shapes the family's processor
returns (read from its modeling code: flattened patches with a ``(t, h, w)`` grid, whole images,
mel frames: tests/helpers/multimodal_inputs.py), one of each modality its forward takes. The number of placeholder tokens of each is
what the family's own ``get_image_features`` (``get_video_features``, ``get_audio_features``)
returns for them, and that many placeholders go into ``input_ids``, between the start and end
tokens the family's processor writes around them (rotary-index families look for them). The
config's modality token ids are moved into the tiny vocabulary first. :func:`multimodal_batch`
returns the batch and the modality ids (0 text, 1 image, 2 video, 3 audio) that the config's token
ids give, or raises :class:`CannotRun` with the reason.
"""

from __future__ import annotations

import inspect

import torch
from multimodal_inputs import BUILDERS, MM_RECIPES, CannotRun, _g
from torch import nn

FIRST_ID = 100  # the modality tokens get ids 100, 101, ... of the tiny (128) vocabulary
NAMES = ("image", "video", "audio")
__all__ = ["CannotRun", "build", "multimodal_batch", "multimodal_families"]


def multimodal_families() -> list[str]:
    """The families of the sweep (tests/helpers/families.py) whose model class, the one their
    multimodal forward runs, declares a vision, video or audio sub-config."""
    import importlib

    import families
    from family_recipes import RECIPES

    found = []
    for family in families.families():
        name = MM_RECIPES.get(family, {}).get("@class") or RECIPES.get(family, {}).get("@class")
        if name:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
            cls = getattr(module, name)
        else:
            cls = families.model_class(family)
        subs = getattr(cls.config_class, "sub_configs", {}) or {}
        if any(k.split("_")[0] in ("vision", "audio", "video", "sound") for k in subs):
            found.append(family)
    return found


def build(family: str) -> nn.Module:
    """The family's tiny model (tests/helpers/families.py) with what its multimodal forward
    needs (:data:`MM_RECIPES`)."""
    import families

    return families.build(family, MM_RECIPES.get(family))


# ----------------------------------------------------------------------------------------------


def _token_fields(config) -> list[tuple[object, str]]:
    """``(config, attribute)`` of every modality token id: placeholders, starts and ends."""
    found = []
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for name in sorted(vars(cfg)):
            if not (name.endswith("_token_id") or name.endswith("_token_index")):
                continue
            if name.split("_")[0] in ("pad", "bos", "eos", "user", "assistant", "system"):
                continue
            if isinstance(getattr(cfg, name), int) or getattr(cfg, name, 0) is None:
                found.append((cfg, name))
    return found


def _remap_tokens(config) -> dict[str, int]:
    """Gives each modality token id of the config an id of the tiny vocabulary; returns them by
    attribute name (the text config's too)."""
    ids: dict[str, int] = {}
    for cfg, name in _token_fields(config):
        key = name.removesuffix("_index").removesuffix("_id").removesuffix("_token") + "_token_id"
        if key not in ids:
            ids[key] = FIRST_ID + len(ids)
        setattr(cfg, name, ids[key])
    return ids


# families whose processor writes a video's frames with the image token (inside the video's start
# and end tokens): the model tells them apart by the span or by which pixel input it gets
VIDEO_AS_IMAGE = {"glm5_next"}


def _placeholder(tokens: dict[str, int], modality: str, family: str = "") -> int | None:
    if modality == "video" and (family in VIDEO_AS_IMAGE or "video_token_id" not in tokens):
        modality = "image"
    return tokens.get(f"{modality}_token_id")


def _bracket(tokens: dict[str, int], modality: str) -> tuple[list[int], list[int]]:
    """The start and end tokens a processor writes around a modality's placeholders."""
    visual = modality in ("image", "video")
    starts = [f"{modality}_start_token_id", f"{modality}_bos_token_id",
              *(["vision_start_token_id", "boi_token_id"] if visual else []),
              *(["boa_token_id"] if modality == "audio" else [])]  # fmt: skip
    ends = [f"{modality}_end_token_id", f"{modality}_eos_token_id",
            *(["vision_end_token_id", "eoi_token_id"] if visual else []),
            *(["eoa_token_id"] if modality == "audio" else [])]  # fmt: skip
    start = next((tokens[s] for s in starts if s in tokens), None)
    end = next((tokens[e] for e in ends if e in tokens), None)
    return [start] if start is not None else [], [end] if end is not None else []


def _num_tokens(features, hidden: int) -> int:
    """Placeholder tokens in what ``get_*_features`` returned (a tensor, a list, an output)."""
    for attr in ("pooler_output", "last_hidden_state", "image_embeds", "audio_embeds"):
        if hasattr(features, attr) and getattr(features, attr) is not None:
            features = getattr(features, attr)
            break
    if isinstance(features, torch.Tensor):
        return features.numel() // hidden
    if isinstance(features, (list, tuple)):
        return sum(_num_tokens(f, hidden) for f in features if f is not None)
    raise CannotRun(f"get_*_features returned {type(features).__name__}")


def _features(model, modality: str, kwargs: dict):
    name = f"get_{modality}_features"
    get = getattr(model, name, None) or getattr(getattr(model, "model", None), name, None)
    if get is None:
        raise CannotRun(f"it has no {name}")
    named = {p.name for p in inspect.signature(get).parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}  # fmt: skip
    args = {k: v for k, v in kwargs.items() if k in named or not named}
    try:
        with torch.no_grad():
            return get(**args)
    except Exception as e:
        raise CannotRun(f"its {modality} encoder failed: {type(e).__name__}: {str(e)[:160]}") from e


def multimodal_batch(
    family: str, model: torch.nn.Module
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """``(batch, ids, placed)``: a one-sample batch with text and one item of each modality the
    family's builder gives, the modality ids ``(1, S)`` of its tokens from the config's token ids
    (0 text, 1 image, 2 video, 3 audio), and what each token was placed for (the same ids; a
    family whose video frames take the image token has 2 there and 1 in ``ids``).

    Raises:
        CannotRun: with the reason.
    """
    if family not in BUILDERS:
        raise CannotRun("no multimodal input builder for it yet")
    config = model.config
    tokens = _remap_tokens(config)
    for owner in (model, getattr(model, "model", None)):  # read from the config at __init__
        for name, value in tokens.items():
            if owner is not None and name in vars(owner):
                setattr(owner, name, value)
    if not any(_placeholder(tokens, m) is not None for m in NAMES):
        raise CannotRun("its config names no image, video or audio token id")
    media = BUILDERS[family](model)
    accepted = set(inspect.signature(model.forward).parameters)
    hidden = config.get_text_config().hidden_size
    text = torch.randint(3, 90, (10,), generator=_g()).tolist()
    seq, kinds, inputs = text[:4], [0] * 4, {}
    for modality in NAMES:
        if modality not in media:
            continue
        kwargs = media[modality]
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise CannotRun(f"its forward does not take {unknown}")
        n = _num_tokens(_features(model, modality, kwargs), hidden)
        token = _placeholder(tokens, modality, family)
        start, end = _bracket(tokens, modality)
        seq += start + [token] * n + end
        kinds += [0] * len(start) + [NAMES.index(modality) + 1] * n + [0] * len(end)
        inputs.update(kwargs)
        seq, kinds = seq + text[4:6], kinds + [0, 0]
    inputs.update(media.get("forward", {}))
    seq, kinds = seq + text[6:], kinds + [0] * len(text[6:])
    input_ids = torch.tensor([seq])
    ids = torch.zeros_like(input_ids)  # what the config's token ids say
    for modality, mod_id in (("image", 1), ("video", 2), ("audio", 3)):
        token = tokens.get(f"{modality}_token_id")
        if token is not None:
            ids[input_ids == token] = mod_id
    placed = torch.tensor([kinds])  # what each placeholder stands for
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **inputs)
    if "mm_token_type_ids" in accepted:  # what its processor returns beside input_ids
        batch["mm_token_type_ids"] = placed
    return batch, ids, placed
