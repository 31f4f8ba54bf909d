"""Per multimodal MoE family: what its tiny model (tests/helpers/families.py) needs beside its
recipe to take multimodal inputs (:data:`MM_RECIPES`), and its inputs (:data:`BUILDERS`): random
tensors shaped as its processor returns them, read from its modeling code (flattened patches with
a ``(t, h, w)`` grid, whole images, patch coordinates, mel frames, dMel tokens, waveforms), one
item of each modality its forward takes. tests/helpers/multimodal.py puts them in a batch.
"""

from __future__ import annotations

import family_recipes
import torch
from torch import nn


class CannotRun(Exception):
    """The family's multimodal forward cannot run here; the message says why."""


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tower(model, names=("visual", "vision_tower", "vision_model", "vision_encoder")):
    for owner in (getattr(model, "model", None), model):
        for name in names:
            if getattr(owner, name, None) is not None:
                return getattr(owner, name)
    raise CannotRun("its tiny model (its recipe) has no vision tower")


def _patch_dim(model) -> int:
    """The width of one flattened patch: what the vision tower's patch embedding takes."""
    modules = list(_tower(model).modules())
    convs = [m.weight[0].numel() for m in modules if isinstance(m, (nn.Conv3d, nn.Conv2d))]
    linears = [m.in_features for m in modules if isinstance(m, nn.Linear)]
    if not convs + linears:
        raise CannotRun("no patch embedding found in its vision tower")
    return (convs + linears)[0]


# ----------------------------------------------------------------------------------------------
# per family: what its tiny model (tests/helpers/families.py) needs beside its recipe to take its
# multimodal inputs: a recipe of the same form


def _towers(*names: str, **classes: str):
    """Adds the named sub-configs (None by default: Gemma 4's vision and audio), shrunk; a
    sub-config its config declares as any (AutoConfig) by the class named in ``classes``."""

    def fix(cfg) -> None:
        import families
        import transformers

        for name in (*names, *classes):
            kind = getattr(transformers, classes[name]) if name in classes else None
            sub = (kind or type(cfg).sub_configs[name])()
            families._shrink(sub)
            setattr(cfg, name, sub)

    return fix


MM_RECIPES: dict[str, dict] = {
    # a 64-pixel image of 32-pixel patches: 4 patches, pooled into 2 queries (the default keys
    # are 1225 and 4900 patches: 490 and 980 pixel images)
    "aria": {"projector_patch_to_query_dict": {4: 2}, "max_value_projector_patch_to_query_dict": 2},
    "diffusion_gemma": {
        "@class": "DiffusionGemmaEncoderModel",  # its encoder takes the images (its recipe: text)
        "text_config.top_k_experts": 2,
        "@fix": lambda cfg: family_recipes._wide_full_attention(cfg.text_config),
    },
    "gemma4": {"@fix": _towers("vision_config", "audio_config")},
    # the checkpoint's audio encoder (Parakeet; none by default) and its projector's widths
    "nemotron_h_omni": {
        "@fix": lambda cfg: (
            _towers(audio_config="ParakeetEncoderConfig")(cfg),
            cfg.audio_config.update(dict(projection_hidden_size=64, projection_bias=False)),
        )
    },
    # the multimodal class (the sweep checks the text model): a 56-pixel image of 14-pixel patches,
    # shuffled by 0.5: 4 tokens; the shuffle MLP takes the width / ratio**2
    "llama4": {
        "@class": "Llama4ForConditionalGeneration",
        "vision_config.image_size": 56,
        "vision_config.intermediate_size": 128,
    },  # fmt: skip
}


# ----------------------------------------------------------------------------------------------
# per family: {modality: forward kwargs} of random tensors, shaped as its processor returns them


def _grid(model, video: bool = True, frames: int = 1) -> dict:
    """Qwen-VL style: flattened patches ``(t*h*w, C*tp*p*p)`` and their ``(t, h, w)`` grid: a
    4 x 4 patch image (4 tokens after the 2 x 2 merge), a video of ``frames`` such grids (each
    of ``tp`` frames where the patches are temporal)."""
    d = _patch_dim(model)
    grid = torch.tensor([[1, 4, 4]])
    out = {"image": dict(pixel_values=torch.randn(16, d, generator=_g()), image_grid_thw=grid)}
    if video:
        out["video"] = dict(pixel_values_videos=torch.randn(16 * frames, d, generator=_g(1)),
                            video_grid_thw=torch.tensor([[frames, 4, 4]]))  # fmt: skip
    return out


def _kimi_k25(model) -> dict:
    """Kimi-K2.5's patches keep their shape: ``(t*h*w, C, p, p)``."""
    p = model.config.vision_config.patch_size
    out = _grid(model)
    for kwargs in out.values():
        for key in ("pixel_values", "pixel_values_videos"):
            if key in kwargs:
                kwargs[key] = kwargs[key].reshape(-1, 3, p, p)
    return out


def _ernie(model) -> dict:
    """Ernie-4.5-VL merges two frames of a video into one token (temporal_merge_size)."""
    return _grid(model, frames=model.config.vision_config.temporal_merge_size)


def _qwen3_omni(model) -> dict:
    """Beside image and video, audio as log-mel frames ``(1, mels, frames)`` and their mask."""
    out = _grid(model)
    mels = model.config.audio_config.num_mel_bins
    out["audio"] = dict(input_features=torch.randn(1, mels, 100, generator=_g(2)),
                        feature_attention_mask=torch.ones(1, 100, dtype=torch.long))  # fmt: skip
    out["forward"] = dict(video_second_per_grid=torch.tensor([1.0]))  # its rope index reads it
    return out


def _dots3_note(model) -> dict:
    """Beside image and video, one audio chunk of mel frames ``(1, mels, frames)`` and its
    length in waveform samples (a token per 8 frames)."""
    out = _grid(model)
    a = model.config.audio_config
    out["audio"] = dict(input_features=torch.randn(1, a.feature_size, 64, generator=_g(2)),
                        chunk_sample_lengths=torch.tensor([64 * a.hop_length]))  # fmt: skip
    return out


def _muse_spark(model) -> dict:
    """Beside image and video, a waveform ``(1, samples)`` of 8 audio tokens."""
    out = _grid(model)
    n = 8 * model.config.audio_config.samples_per_token
    out["audio"] = dict(input_values=torch.randn(1, n, generator=_g(2)),
                        input_values_mask=torch.ones(1, n, dtype=torch.long))  # fmt: skip
    return out


def _inkling2(model) -> dict:
    """One patch of ``(p*m, p*m, C)`` pixels per language token; the grid counts tokens."""
    v = model.config.vision_config
    side = v.patch_size * v.spatial_merge_size
    pix = torch.rand(4, side, side, v.num_channels, generator=_g()) * 2 - 1
    return {"image": dict(pixel_values=pix, image_grid_thw=torch.tensor([[1, 2, 2]]))}


def _inkling(model) -> dict:
    """One token per patch of ``(tp, p, p, C)`` pixels; audio as dMel bin tokens ``(1, frames,
    n_mel_bins)``, one token per frame."""
    v, a = model.config.vision_config, model.config.audio_config
    pix = torch.rand(4, v.temporal_patch_size, v.patch_size, v.patch_size, v.num_channels,
                     generator=_g())  # fmt: skip
    bins = torch.randint(0, a.mel_vocab_size, (1, 8, a.n_mel_bins), generator=_g(2))
    return {"image": dict(pixel_values=pix),
            "audio": dict(audio_input_ids=bins, audio_input_ids_mask=torch.ones(1, 8))}  # fmt: skip


def _image(model, size: int, **extra) -> dict:
    """A whole image ``(1, C, size, size)``."""
    return {"image": dict(pixel_values=torch.randn(1, 3, size, size, generator=_g()), **extra)}


def _aria(model) -> dict:
    return _image(model, 64, pixel_mask=torch.ones(1, 64, 64, dtype=torch.bool))


def _mistral_large4(model) -> dict:
    return _image(model, 64, image_sizes=torch.tensor([[64, 64]]))


def _ocr(model) -> dict:
    """DeepSeek-OCR 2 and Unlimited-OCR: a global view at the SAM encoder's size, no local
    patches."""
    side = model.config.vision_config.sam_config.image_size
    return _image(model, side, num_local_patches=torch.tensor([0]))


def _step3p7(model) -> dict:
    return _image(model, model.config.vision_config.image_size,
                  num_local_patches=torch.tensor([0]))  # fmt: skip


def _positions(side: int, frames: int = 1) -> torch.Tensor:
    """``(frames, side * side, 2)`` patch coordinates (x, y), as Gemma 4's processor gives them."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([x, y], -1).reshape(1, -1, 2).expand(frames, -1, -1).clone()


def _gemma4(model) -> dict:
    """Patches ``(n, side**2, 3 * p * p)`` with their coordinates: 6 x 6 patches pooled 3 x 3
    into 4 tokens per image and per frame; audio as mel frames ``(1, frames, 128)``."""
    v = model.config.vision_config
    side, width = 2 * v.pooling_kernel_size, 3 * v.patch_size**2
    return {
        "image": dict(pixel_values=torch.rand(1, side * side, width, generator=_g()),
                      image_position_ids=_positions(side)),
        "video": dict(pixel_values_videos=torch.rand(2, side * side, width, generator=_g(1)),
                      video_position_ids=_positions(side, 2), num_frames_per_video=torch.tensor([2])),
        "audio": dict(input_features=torch.randn(1, 64, 128, generator=_g(2)),
                      input_features_mask=torch.ones(1, 64, dtype=torch.bool)),
    }  # fmt: skip


def _nemotron_h_omni(model) -> dict:
    """RADIO: flattened patches ``(h*w, C*p*p)`` with their ``(h, w)`` grid (4 tokens after the
    0.5 pixel shuffle). No video beside it: its frames take the image token, and the model
    matches every image token with the images' features (a prompt holds images or a video)."""
    p = model.config.vision_config.patch_size
    out = {"image": dict(pixel_values=torch.randn(16, 3 * p * p, generator=_g()),
                         image_grid_hw=torch.tensor([[4, 4]]))}  # fmt: skip
    if getattr(model.config, "audio_config", None) is not None:
        mel = model.config.audio_config.num_mel_bins
        out["audio"] = dict(input_features=torch.randn(1, 64, mel, generator=_g(2)),
                            input_features_mask=torch.ones(1, 64, dtype=torch.long))  # fmt: skip
    return out


def _llama4(model) -> dict:
    return _image(model, model.config.vision_config.image_size)


BUILDERS = {
    "aria": _aria,
    "deepseek_ocr2": _ocr,
    "dots3_note": _dots3_note,
    "ernie4_5_vl_moe": _ernie,
    "diffusion_gemma": lambda model: {"image": _gemma4(model)["image"]},
    "gemma4": _gemma4,
    "glm4v_moe": _grid,
    "glm5_next": _grid,
    "hy_v4_vl": _grid,
    "inkling": _inkling,
    "inkling2": _inkling2,
    "inkling2_loop": _inkling2,
    "kimi_k25": _kimi_k25,
    "llama4": _llama4,
    "minimax_m3_vl": _grid,
    "mistral_large4": _mistral_large4,
    "muse_spark": _muse_spark,
    "nemotron_h_omni": _nemotron_h_omni,
    "qwen3_5_moe": _grid,
    "qwen3_omni_moe": _qwen3_omni,
    "qwen3_vl_moe": _grid,
    "qwen4_exp": _grid,
    "step3p7": _step3p7,
    "unlimited_ocr": _ocr,
}
