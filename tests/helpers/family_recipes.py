"""Per-family recipes for tests/helpers/families.py: the config overrides that make a family's shrunk
default config a tiny model that runs, where the generic shrinking alone does not.

One table, :data:`RECIPES`: family -> {attribute path: value}. A path goes through sub-configs,
list indices and dict keys (``"text_config.rope_parameters.mrope_section"``); ``"@class"`` names
the model class to build instead of the family's top class, and ``"@fix"`` is called with the
config after the overrides, for constraints between fields. Each override says what the default
was and why it does not shrink.
"""

from __future__ import annotations


def _wide_full_attention(text) -> None:
    """Gemma 4's (and DiffusionGemma's) per-layer config, for the shrunk layers: full-attention
    layers keep their wider head (512 against 256 in the default), now 32 against 16."""
    text.per_layer_config = {
        i: {"head_dim": 32} for i, kind in enumerate(text.layer_types) if kind == "full_attention"
    }


def _gemma4(cfg) -> None:
    _wide_full_attention(cfg.text_config)


def _dots3_note(cfg) -> None:
    """Dots 3 Note's text layers: the rope covers a quarter of the head (64 of 256), and the
    sliding-window layers have half the heads, twice the KV rank and a wider no-rope part
    (head = no-rope + rope) than the indexed-attention layers. The audio stem's output width
    follows its (shrunk) channels."""
    text = cfg.text_config
    text.head_dim = 4 * text.qk_rope_head_dim
    sliding = dict(num_attention_heads=1, num_key_value_heads=1, kv_lora_rank=32,
                   qk_nope_head_dim=text.head_dim - text.qk_rope_head_dim)  # fmt: skip
    text.per_layer_config = {
        i: sliding for i, kind in enumerate(text.layer_types) if kind == "sliding_attention"
    }
    audio = cfg.audio_config
    audio.conv_output_size = audio.downsample_hidden_size * ((audio.feature_size + 7) // 8)


RECIPES: dict[str, dict] = {
    "bailing_hybrid": {
        "num_experts_per_token": 2,  # its name for top-k (8)
        # its linear-attention heads, copied from the default heads when configured (32 x 128)
        "linear_num_heads": 2,
        "linear_head_dim": 16,
    },
    "dbrx": {
        "n_layers": 2,  # its names for the layers and heads (24 and 16) are not shrunk
        "n_heads": 2,
        # DbrxAttention reads attn_config.rope_theta, which checkpoints' attn_config carry but
        # DbrxAttentionConfig does not declare (unused: the rotary embedding reads rope_parameters)
        "attn_config.rope_theta": 500000.0,
        "attn_config.clip_qkv": 8,  # None (the default) fails its unconditional clamp
    },
    "deepseek_ocr2": {
        "text_config.mlp_layer_types": ["dense", "sparse"],  # default None: does not build
        "vision_config.sam_config.downsample_channels": [64, 32],  # [512, 896]: 5M parameters
    },
    "diffusion_gemma": {
        # Its text encoder: DiffusionGemmaModel, ...ForBlockDiffusion and ...EncoderModel return
        # outputs without the router logits that the text encoder records.
        "@class": "DiffusionGemmaEncoderTextModel",
        "top_k_experts": 2,  # None, as in Gemma 4
        "@fix": _wide_full_attention,
    },
    "dots1": {"n_shared_experts": 1},  # default None: does not build
    "dots3_note": {
        # The adapters' widths must match the encoders' and the text model's hidden sizes.
        "vision_config.adapter_in_dim": 32,
        "vision_config.adapter_out_dim": 32,
        "audio_config.adapter_input_size": 32,
        "audio_config.adapter_out_dim": 32,
        "audio_config.downsample_hidden_size": 16,  # 480: a 4M convolution stem
        "@fix": _dots3_note,
    },
    "ernie4_5_vl_moe": {
        "text_config.moe_intermediate_size": [32, 32],  # text and vision experts: [1536, 512]
        # absent from the default rope_parameters: the model falls back to [22, 22, 20] (h, w, t),
        # which must sum to half its head dim (16 here)
        "text_config.rope_parameters.mrope_section": [3, 3, 2],
    },
    "flint": {"mlp_only_layers": [0]},  # default [0, 1]: both of the two layers dense
    "gemma4": {
        "text_config.top_k_experts": 2,  # None: MoE is off by default
        "text_config.vocab_size_per_layer_input": 128,  # per-layer embeddings: 134M parameters
        "text_config.hidden_size_per_layer_input": 16,
        "@fix": _gemma4,
    },
    "glm4v_moe": {
        # absent from the default rope_parameters: the model falls back to [8, 12, 12], which must
        # sum to half its rotary dim (head dim 16 x partial_rotary_factor 0.5 here)
        "text_config.rope_parameters.mrope_section": [2, 1, 1],
    },
    "glm5_next": {
        "text_config.linear_num_heads": 2,  # linear attention: 64 heads x 128
        "text_config.linear_head_dim": 16,
        "text_config.qk_rope_head_dim": 0,  # its attention is NoPE (validate_architecture)
        "text_config.head_dim": 0,  # = qk_rope_head_dim, as its config sets it
        "text_config.qk_nope_head_dim": 16,  # = qk_head_dim
        "text_config.index_kpool": 4,  # must divide index_topk (8)
        "vision_config.projection_intermediate_size": 64,  # 10240
    },
    "granitemoehybrid": {
        "layer_types": ["full_attention", "linear_attention"],  # all Mamba by default
        "mamba_expand": 1,  # Mamba width = expand x hidden = heads x head (2 x 16)
    },
    "inkling": {
        "text_config.swa_num_attention_heads": 2,  # sliding layers' own heads: 64 x 128
        "text_config.swa_num_key_value_heads": 1,
        "text_config.swa_head_dim": 16,
        "vision_config.n_layers": 2,  # num_hidden_layers is an alias of it: 24 layers
        "vision_config.text_hidden_size": 32,  # = the text hidden size, set before the shrinking
        "audio_config.text_hidden_size": 32,
    },
    "inkling2": {
        "text_config.unpadded_vocab_size": 128,  # the lm_head's width (vocab_size is the padded one)
        "text_config.swa_num_attention_heads": 2,  # sliding layers' own heads: 48 x 128
        "text_config.swa_num_key_value_heads": 1,
        "text_config.swa_head_dim": 16,
        "vision_config.text_hidden_size": 32,  # must equal the text hidden size
        "vision_config.projection_hidden_dim": 64,  # 4096
    },
    "inkling2_loop": {
        # Its looped layers (6..17, 3 passes) lie past the 2 layers: none loops. One that did would
        # run its router once per pass, and smar keeps only the last pass's logits.
        "text_config.unpadded_vocab_size": 128,  # the lm_head's width (vocab_size is the padded one)
        "text_config.swa_num_attention_heads": 2,  # sliding layers' own heads: 24 x 128
        "text_config.swa_num_key_value_heads": 1,
        "text_config.swa_head_dim": 16,
        "vision_config.text_hidden_size": 32,  # must equal the text hidden size
        "vision_config.projection_hidden_dim": 64,  # 4096
    },
    # Of 2 layers, one attention layer (every 8th from the 4th by default: none) and one Mamba
    # layer; the MoE is every 2nd from the 1st.
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0},
    "kimi_linear": {
        "num_experts_per_token": 2,  # its name for top-k (8)
        "linear_num_heads": 2,  # its linear-attention heads (32 x 128)
        "linear_head_dim": 16,
    },
    # a multimodal wrapper (MoonViT around a DeepSeek-V3 language model): its projector's norm
    # takes the vision width (1152 by default, not shrunk)
    "kimi_k25": {"projection_hidden_size": 32},
    "kolibri1_1": {"mlp_only_layers": [0]},  # default: the first two, both of the two layers dense
    "lfm2_moe": {
        "layer_types": ["conv", "full_attention"],  # None by default: does not build
        "num_dense_layers": 1,  # the first 2 (both of the 2 layers) are dense
    },
    # Its routers are those of the text model; the multimodal class is tests/test_adapters.py's
    # (with images), and transformers 5.24 cannot run it (smar.upstream.UPSTREAM_DEFECTS).
    "llama4": {"@class": "Llama4ForCausalLM"},
    "longcat_flash": {
        "expert_ffn_hidden_size": 32,  # 2048
        "zero_expert_num": 2,  # 256 identity experts (the router chooses among 4 + these)
    },
    "minimax_m3_vl": {
        "projector_hidden_size": 64,  # 6144
        "merged_hidden_size": 128,  # text hidden size x spatial_merge_size**2, set before
        "text_config.shared_intermediate_size": 32,  # 3072
    },
    "mistral4": {"head_dim": 16},  # qk_nope + qk_rope; the rope covers half of it
    "muse_spark": {
        "text_config.moe_hidden_size": 32,  # the experts' width (4096)
        "projector_hidden_size": 32,  # 4096: a 16M vision adapter
        "out_hidden_size": 128,  # the vision tower's merged width: its width x merge_size**2
        # The audio pyramid's per-layer lists, for its 2 layers (4 entries up to width 2048).
        "audio_config.hidden_sizes": [16, 32],
        "audio_config.patch_sizes": [16, 6],
        "audio_config.depths": [2, 2],
    },
    # Its layers are blocks (Mamba, MoE, attention, MLP): the shrinking keeps Mamba and MoE only.
    "nemotron_h": {"layers_block_type": ["full_attention", "moe"]},
    "nemotron_h_omni": {
        # a RADIO vision tower and a Parakeet audio encoder around a Nemotron-H (hybrid Mamba and
        # MoE) language model; its class name ends in none of the usual suffixes
        "@class": "NemotronH_Omni_Reasoning_V3",
        "text_config.layers_block_type": ["full_attention", "moe"],
        "projector_hidden_size": 64,  # 4096: the vision projector alone would be 22M parameters
        "vision_hidden_size": 32,  # the projector's input width (1280): the tower's
    },
    "qwen3_omni_moe": {
        # The top class only generates (no forward); the thinker is the model that routes text.
        "@class": "Qwen3OmniMoeThinkerForConditionalGeneration",
        # read by its rope index but not declared by its config (checkpoints carry it)
        "vision_start_token_id": 151652,
        "audio_config.downsample_hidden_size": 16,  # 480: a 4M convolution stem
        "audio_config.output_dim": 32,  # = the text hidden size (3584)
    },
    "qwen4_exp": {
        # Its full-attention layers are indexed (QSA): the indexer's fields are None by default,
        # and the layer does not build without them.
        "text_config.indexer_n_heads": 2,
        "text_config.indexer_kv_heads": 1,
        "text_config.indexer_head_dim": 16,
        "text_config.indexer_budget": 8,
        "text_config.indexer_compress_ratio": 4,
    },
    "unlimited_ocr": {"vision_config.sam_config.downsample_channels": [64, 32]},  # 6M parameters
}
