"""Every MoE family of the installed transformers, enumerated from the library, as a tiny model.

A family is a model folder of ``transformers.models`` whose modeling code declares a
``router_logits`` recorder (``_can_record_outputs``). Its tiny model is its default config with
every size shrunk (width 32, 2 layers, 4 experts, top-2, ...), then, where that alone does not
give a tiny model that runs, the family's recipe (tests/helpers/family_recipes.py). :data:`FULL`,
:data:`CAPTURE_ONLY` and :data:`NOT_SUPPORTED` say what tests/test_families.py must find.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib

import torch
import transformers
from family_recipes import RECIPES

MODELS = pathlib.Path(transformers.__file__).parent / "models"

# Sizes set wherever a config has the attribute (sub-configs included).
SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    ffn_hidden_size=64,
    intermediate_size_mlp=64,
    expert_intermediate_size=32,
    mlp_hidden_size=64,
    num_hidden_layers=2,
    num_layers=2,
    decoder_layers=2,
    encoder_layers=2,
    num_decoder_layers=2,
    depth=1,
    num_attention_heads=2,
    num_heads=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    num_key_value_heads=1,
    num_kv_heads=1,
    head_dim=16,
    d_model=32,
    d_ff=64,
    d_kv=16,
    vocab_size=128,
    max_position_embeddings=128,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_routed_experts=4,
    ffn_num_experts=4,
    num_experts_per_tok=2,
    moe_topk=2,
    moe_k=2,
    top_k=2,
    num_selected_experts=2,
    n_group=1,
    topk_group=1,
    num_expert_group=1,
    first_k_dense_replace=0,
    n_shared_experts=1,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    qk_head_dim=16,
    index_head_dim=16,
    index_n_heads=2,
    index_topk=8,
    out_hidden_size=32,
    projection_dim=32,
    vision_output_dim=32,
    projector_input_dim=32,
    projector_output_dim=32,
    moe_layer_freq=1,
    decoder_sparse_step=1,
    expert_interval=1,
    sliding_window=64,
    attention_chunk_size=64,
    linear_num_key_heads=1,
    linear_num_value_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    mamba_n_heads=2,
    mamba_d_head=16,
    mamba_d_state=8,
    ssm_state_size=8,
    mamba_num_heads=2,
    mamba_head_dim=16,
    n_groups=1,
)


MAX_PARAMS = 3_000_000

# What each known family is, as tests/test_families.py checks it: full (routers captured as the
# model records them, the modality bias steers, gradients reach router and bias), capture only
# (the bias cannot apply: why), or not supported (why). A family of the installed transformers
# that none of these lists is one a newer release added: its tests skip as "not yet checked"
# until it is added here. A listed family that no longer builds or passes fails the suite.
FULL = frozenset(
    """afmoe aria axk1 axk2 beam cohere2_moe deepseek_v2 deepseek_v3 deepseek_v32 deepseek_v4
    ernie4_5_moe exaone_moe flex_olmo glm4_moe glm4_moe_lite glm_moe_dsa gpt_oss granitemoe
    granitemoe_swa granitemoeshared hunyuan_v1_moe hy_v3 hy_v4 jetmoe kolibri1 laguna llama4
    mellum mimo_v2_flash minimax minimax_m2 mistral_large4 mixtral nllb_moe olmoe
    openai_privacy_filter phimoe qwen2_moe qwen3_5_moe qwen3_moe qwen3_next qwen3_vl_moe
    solar_open step3p7 switch_transformers dots1 mistral4 flint deepseek_ocr2 unlimited_ocr
    muse_spark dots3_note gemma4 diffusion_gemma glm4v_moe glm5_next inkling2 minimax_m3_vl
    bailing_hybrid kimi_linear jamba nemotron_h granitemoehybrid lfm2_moe qwen4_exp
    qwen3_omni_moe dbrx hy_v4_vl lara_mini ergo minicpm5_moe kolibri1_1 nemotron_h_omni
    kimi_k25""".split()
)
CAPTURE_ONLY = {
    "zaya": "ZayaRouter computes its logits through several linear layers (a small MLP): no "
    "single linear output to bias",
    "ernie4_5_vl_moe": "hard modality split: text and vision tokens have separate routers and "
    "experts, so a per-modality bias has nothing to choose between",
    "inkling": "InklingTopkRouter's linear layer also computes the shared experts' sink logits "
    "(n_routed + n_shared outputs) and returns the routed ones only: the bias would not line up "
    "with the logits",
    "longcat_flash": "its classifier scores the routed experts and the zero (identity) experts "
    "(n_routed + zero_expert_num outputs) while the router declares n_routed experts",
}
NOT_SUPPORTED = {
    "doge": "DogeCDMoE records product-key scores (B, S, 2 x sqrt(E)), not (T, E) logits",
    "inkling2_loop": "a looped layer runs its router once per pass and smar keeps the last "
    "pass's logits only (the tiny model, whose 2 layers do not loop, passes every check)",
}


def status(family: str) -> str:
    """``"full"``, ``"capture only"``, ``"not supported"`` or ``"not yet checked"``."""
    if family in FULL:
        return "full"
    if family in CAPTURE_ONLY:
        return "capture only"
    if family in NOT_SUPPORTED:
        return "not supported"
    return "not yet checked"


# Multimodal wrappers around a MoE language model of another family, whose own modeling code
# declares no router_logits recorder (so the scan below does not find them).
WRAPPERS = ("nemotron_h_omni", "kimi_k25")


def families() -> list[str]:
    """Model folders whose modeling code records ``router_logits`` (the MoE families), and the
    installed :data:`WRAPPERS`."""
    found = {
        p.parent.name
        for p in MODELS.glob("*/modeling_*.py")
        if '"router_logits"' in p.read_text() and "_can_record_outputs" in p.read_text()
    }
    return sorted(found | {w for w in WRAPPERS if (MODELS / w).is_dir()})


def model_class(family: str) -> type:
    """The family's top model class: ``...ForConditionalGeneration``, else ``...ForCausalLM``,
    else its base model."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    classes = [
        c for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, transformers.PreTrainedModel) and c.__module__ == module.__name__
    ]  # fmt: skip
    for suffix in ("ForConditionalGeneration", "ForCausalLM", "Model"):
        hits = sorted(
            (c for c in classes if c.__name__.endswith(suffix) and "Pretrained" not in c.__name__
             and "PreTrained" not in c.__name__), key=lambda c: len(c.__name__),
        )  # fmt: skip
        if hits:
            return hits[0]
    raise ValueError(f"{family}: no model class with a router_logits recorder")


NONE_OK = ("sliding_window", "n_group", "topk_group", "num_experts_per_tok", "n_routed_experts",
           "num_experts", "moe_intermediate_size", "head_dim")  # fmt: skip


def _two(per_layer: list) -> list:
    """Two layers of a per-layer list, of two different kinds where it has several (a linear
    and a full attention layer, a dense and a sparse MLP), else the last two."""
    kinds = list(dict.fromkeys(map(str, per_layer)))
    if len(kinds) == 1:
        return per_layer[-2:]
    return [next(v for v in per_layer if str(v) == k) for k in kinds[:2]]


def _shrink(cfg, depth=0) -> None:
    # Configs with per-layer sub-configs (Gemma 4, dots3) refuse reads of a per-layer field on the
    # whole config unless asked; the recipes then shrink their per-layer configs.
    flag = "allow_global_per_layer_attribute_access"
    had = flag in cfg.__dict__
    cfg.__dict__.setdefault(flag, True)
    try:
        _shrink_fields(cfg, depth)
    finally:
        if not had:
            cfg.__dict__.pop(flag, None)


def _shrink_fields(cfg, depth: int) -> None:
    n_layers = getattr(cfg, "num_hidden_layers", None)
    for key, value in SIZES.items():
        if key in cfg.__dict__ and not isinstance(getattr(cfg, key), (list, dict)):
            old = getattr(cfg, key)
            if old is None and key not in NONE_OK:
                continue
            setattr(cfg, key, value)
    for key, value in list(cfg.__dict__.items()):
        if isinstance(value, transformers.PretrainedConfig) and depth < 3:
            _shrink(value, depth + 1)
        elif isinstance(value, list) and n_layers and len(value) == n_layers and n_layers > 2:
            setattr(cfg, key, _two(value))
    if getattr(cfg, "layer_types", None) and len(cfg.layer_types) != cfg.num_hidden_layers:
        cfg.layer_types = _two(cfg.layer_types)
    for key in ("is_moe", "enable_moe_block"):  # MoE off by default in Doge and Gemma 4
        if cfg.__dict__.get(key) is False:
            setattr(cfg, key, True)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = cfg.__dict__.get(key)
        if isinstance(value, int) and value >= 100:
            setattr(cfg, key, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key])
    if "qk_rope_head_dim" in cfg.__dict__ and "head_dim" in cfg.__dict__:
        cfg.head_dim = cfg.qk_rope_head_dim  # DeepSeek-style attention ropes only that part
    if cfg.__dict__.get("kv_lora_rank") and "num_key_value_heads" in cfg.__dict__:
        cfg.num_key_value_heads = cfg.num_attention_heads  # latent attention: one KV per head
    rope = cfg.__dict__.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("mrope_section") and "head_dim" in cfg.__dict__:
        half = int(cfg.head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
        n = len(rope["mrope_section"])
        rope["mrope_section"] = [half - (n - 1) * (half // n)] + [half // n] * (n - 1)


def _set(cfg, path: str, value) -> None:
    *parents, name = path.split(".")
    for part in parents:
        cfg = cfg[int(part)] if isinstance(cfg, list) else getattr(cfg, part)
    if isinstance(cfg, dict):
        cfg[name] = value
    else:
        setattr(cfg, name, value)


def apply_recipe(cfg, recipe: dict) -> None:
    """Set each attribute path of ``recipe`` on ``cfg``, then call its ``"@fix"``."""
    for path, value in recipe.items():
        if not path.startswith("@"):
            _set(cfg, path, value)
    if "@fix" in recipe:
        recipe["@fix"](cfg)


def build(family: str, extra: dict | None = None) -> torch.nn.Module:
    """The family's top model class (or its recipe's) on its shrunk default config and its recipe
    (tests/helpers/family_recipes.py), then ``extra`` (a recipe of the same form: the multimodal
    tests' towers; one that names a ``"@class"`` replaces the recipe), in eval mode, seed 0."""
    recipe = {} if extra and "@class" in extra else RECIPES.get(family, {})
    recipe = {**recipe, **{k: v for k, v in (extra or {}).items() if k != "@fix"}}
    if "@class" in recipe:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        cls = getattr(module, recipe["@class"])
    else:
        cls = model_class(family)
    cfg = cls.config_class()
    _shrink(cfg)
    apply_recipe(cfg, recipe)
    if extra and "@fix" in extra:
        extra["@fix"](cfg)
    with torch.device("meta"):  # a size some default does not shrink would fill the memory
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"{family}: the shrunk default config still has {n:,} parameters")
    torch.manual_seed(0)
    return cls(cfg).eval()


def inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8) -> dict:
    """Text-only inputs (every family takes them): ``input_ids``, an attention mask, and decoder
    inputs for encoder-decoder models."""
    g = torch.Generator().manual_seed(0)
    vocab = min(getattr(model.config.get_text_config(), "vocab_size", 128) or 128, 128)
    ids = torch.randint(3, min(vocab, 100), (batch, seq), generator=g)
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if getattr(model.config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = ids
    return out


if __name__ == "__main__":  # python tests/helpers/families.py FAMILY...: build, run, report
    import sys
    import traceback

    for name in sys.argv[1:]:
        try:
            m = build(name)
            b = inputs(m)
            with torch.no_grad():
                out = m(**b, output_router_logits=True)
            z = getattr(out, "router_logits", None) or getattr(out, "encoder_router_logits", None)
            n = sum(p.numel() for p in m.parameters())
            print(f"{name}: ok, {n:,} parameters, {len(z or ())} router logits recorded")
        except Exception:
            print(f"{name}: FAILED")
            traceback.print_exc()
