"""Adapters against the models themselves: tiny random transformers models, CPU, no downloads.

For every supported family the logits smar captures must equal the model's own recorded router
logits, the top-k of those logits must be the experts the model chose, a zero modality bias must
change no output bit, and a large bias must move image tokens to the expert it favours.

The model builders here are shared by tests/test_routing.py and tests/test_hf.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

import smar  # noqa: E402
import smar.hf  # noqa: E402
from smar.adapters import ADAPTERS, Adapter, find_routers  # noqa: E402
from smar.bias import ModalityBiasRouter  # noqa: E402
from smar.moe import MoEBlock  # noqa: E402
from smar.upstream import upstream_defect  # noqa: E402

B, S, IMG = 2, 12, 120  # batch, sequence, image placeholder token id
TXT = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=64,
)


@dataclasses.dataclass
class Case:
    """A tiny model, per-sample inputs, and how to read the model's own routing."""

    model: torch.nn.Module
    samples: list[dict]
    cat_keys: tuple[str, ...] = ()  # keys concatenated (not stacked) by the collator
    text_model: Callable | None = None  # LLaVA: the module whose output has router_logits
    bias: bool = True

    def collate(self, samples: list[dict]) -> dict:
        return {
            k: torch.cat([s[k] for s in samples])
            if k in self.cat_keys
            else torch.stack([s[k] for s in samples])
            for k in samples[0]
        }

    @property
    def batch(self) -> dict:
        return self.collate(self.samples)

    @property
    def image_mask(self) -> torch.Tensor:
        return self.batch["input_ids"] == IMG  # (B, S)


def _ids(g: torch.Generator, start_end: bool) -> torch.Tensor:
    ids = torch.randint(1, 100, (S,), generator=g)
    if start_end:
        ids[1], ids[6] = IMG + 1, IMG + 2
    ids[2:6] = IMG  # 4 image tokens per sample
    return ids


def _samples(extra: Callable[[torch.Generator, torch.Tensor], dict], start_end=False) -> list:
    out = []
    for i in range(B):
        g = torch.Generator().manual_seed(i)
        ids = _ids(g, start_end)
        labels = ids.masked_fill(ids == IMG, -100)
        out.append(
            dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **extra(g, ids))
        )
    return out


def _llava(text_config: dict) -> Case:
    vis = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=32,
    )
    cfg = transformers.LlavaConfig(
        vision_config=vis,
        text_config=text_config,
        image_token_index=IMG,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=4,
    )
    model = transformers.LlavaForConditionalGeneration(cfg)
    samples = _samples(lambda g, ids: dict(pixel_values=torch.randn(3, 16, 16, generator=g)))
    return Case(model, samples, text_model=lambda m: m.model.language_model)


def qwen3_moe_llava() -> Case:
    return _llava(
        dict(model_type="qwen3_moe", moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
             **TXT)
    )  # fmt: skip


def mixtral_llava() -> Case:
    return _llava(dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **TXT))


def upcycled_llava_qwen2() -> Case:
    txt = {k: v for k, v in TXT.items() if k != "head_dim"}
    case = _llava(dict(model_type="qwen2", **txt))
    smar.hf.upcycle_hf(case.model, num_experts=4, top_k=2)
    return case


def _grid_patches(g: torch.Generator, ids: torch.Tensor, channels: int) -> dict:
    return dict(
        pixel_values=torch.randn(16, channels, generator=g),  # 16 patches -> 4 tokens
        image_grid_thw=torch.tensor([[1, 4, 4]]),
        mm_token_type_ids=(ids == IMG).long(),
    )


def qwen3_vl_moe() -> Case:
    vis = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
               num_position_embeddings=16, deepstack_visual_indexes=[0])  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
            "mrope_interleaved": True}  # fmt: skip
    txt = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
               rope_parameters=rope, **TXT)  # fmt: skip
    cfg = transformers.Qwen3VLMoeConfig(
        vision_config=vis, text_config=txt, image_token_id=IMG, vision_start_token_id=IMG + 1,
        vision_end_token_id=IMG + 2, video_token_id=IMG + 3,
    )  # fmt: skip
    model = transformers.Qwen3VLMoeForConditionalGeneration(cfg)
    samples = _samples(lambda g, ids: _grid_patches(g, ids, 3 * 2 * 8 * 8), start_end=True)
    return Case(model, samples, cat_keys=("pixel_values", "image_grid_thw"))


def glm4v_moe() -> Case:
    vis = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, image_size=32)  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
            "partial_rotary_factor": 0.5}  # fmt: skip
    txt = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
               n_shared_experts=1, first_k_dense_replace=0, n_group=2, topk_group=1,
               rope_parameters=rope, **TXT)  # fmt: skip
    cfg = transformers.Glm4vMoeConfig(
        vision_config=vis, text_config=txt, image_token_id=IMG, image_start_token_id=IMG + 1,
        image_end_token_id=IMG + 2, video_token_id=IMG + 3,
    )  # fmt: skip
    model = transformers.Glm4vMoeForConditionalGeneration(cfg)
    samples = _samples(lambda g, ids: _grid_patches(g, ids, 3 * 2 * 8 * 8), start_end=True)
    return Case(model, samples, cat_keys=("pixel_values", "image_grid_thw"))


def llama4() -> Case:
    vis = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
               vision_output_dim=32, image_size=16, patch_size=4, pixel_shuffle_ratio=0.5,
               projector_input_dim=32, projector_output_dim=32)  # fmt: skip
    txt = dict(TXT, intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4,
               num_experts_per_tok=1, attention_chunk_size=64, pad_token_id=0)  # fmt: skip
    cfg = transformers.Llama4Config(
        vision_config=vis, text_config=txt, image_token_index=IMG, boi_token_index=IMG + 1,
        eoi_token_index=IMG + 2,
    )  # fmt: skip
    model = transformers.Llama4ForConditionalGeneration(cfg)
    samples = _samples(
        lambda g, ids: dict(pixel_values=torch.randn(3, 16, 16, generator=g)), start_end=True
    )
    return Case(model, samples)


def aria() -> Case:
    vis = dict(model_type="idefics3_vision", hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4)  # fmt: skip
    txt = dict(TXT, intermediate_size=32, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1,
               pad_token_id=0)  # fmt: skip
    cfg = transformers.AriaConfig(
        vision_config=vis, text_config=txt, projector_patch_to_query_dict={16: 4},
        image_token_index=IMG,
    )  # fmt: skip
    model = transformers.AriaForConditionalGeneration(cfg)
    samples = _samples(
        lambda g, ids: dict(
            pixel_values=torch.randn(3, 16, 16, generator=g),
            pixel_mask=torch.ones(16, 16, dtype=torch.bool),
        )
    )
    return Case(model, samples)


def ernie4_5_vl_moe() -> Case:
    vis = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
               spatial_merge_size=2, temporal_merge_size=2)  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]}
    txt = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=[32, 16],
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, max_position_embeddings=64,
               mlp_layer_types=["sparse", "sparse"], rope_parameters=rope)  # fmt: skip
    cfg = transformers.Ernie4_5_VLMoeConfig(
        vision_config=vis, text_config=txt, image_token_id=IMG, image_start_token_id=IMG + 1,
        image_end_token_id=IMG + 2, video_token_id=IMG + 3, video_start_token_id=IMG + 4,
        video_end_token_id=IMG + 5,
    )  # fmt: skip
    model = transformers.Ernie4_5_VLMoeForConditionalGeneration(cfg)

    def extra(g, ids):
        out = _grid_patches(g, ids, 3 * 8 * 8)
        out["moe_mm_token_type_ids"] = out["mm_token_type_ids"]
        return out

    samples = _samples(extra, start_end=True)
    return Case(model, samples, cat_keys=("pixel_values", "image_grid_thw"), bias=False)


CASES = {
    "qwen3_moe_llava": qwen3_moe_llava,
    "mixtral_llava": mixtral_llava,
    "qwen3_vl_moe": qwen3_vl_moe,
    "llama4": llama4,
    "aria": aria,
    "glm4v_moe": glm4v_moe,
    "upcycled_llava_qwen2": upcycled_llava_qwen2,
    "ernie4_5_vl_moe": ernie4_5_vl_moe,
}


def build(name: str) -> Case:
    """The case's tiny model, or a skip naming the transformers defect that breaks its class in
    the installed release (``smar.upstream.UPSTREAM_DEFECTS``)."""
    torch.manual_seed(0)
    case = CASES[name]()
    defect = upstream_defect(case.model)
    if defect:
        pytest.skip(f"upstream defect: {defect}")
    case.model.eval()
    return case


# ----------------------------------------------------------------------------------------------
# the model's own view of its routing


def own_router_logits(case: Case) -> list[torch.Tensor]:
    """The router logits transformers records itself (``output_router_logits=True``); for an
    upcycled model, those each MoE block keeps in ``last_router_logits``."""
    model, batch = case.model, case.batch
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    if blocks:
        model(**batch)
        return [b.last_router_logits for b in blocks]
    if case.text_model is None:
        return list(model(**batch, output_router_logits=True).router_logits)
    got = {}
    h = case.text_model(model).register_forward_hook(lambda m, a, o: got.setdefault("out", o))
    try:
        model(**batch, output_router_logits=True)
    except TypeError as e:
        # transformers >= 5.24: LlavaModel builds LlavaModelOutputWithPast(**outputs) from its
        # language model's output, which has no router_logits field. The language model has
        # recorded its own logits by then; smar's capture never asks the wrapper for them.
        if "router_logits" not in str(e) or "out" not in got:
            raise
    finally:
        h.remove()
    return list(got["out"].router_logits)


def own_choice(case: Case) -> list[torch.Tensor]:
    """The experts each MoE layer chose per token ``(T, K)``, sorted, read from its own router."""
    model, batch = case.model, case.batch
    sites = [m for m in model.modules() if type(m).__name__.endswith(("Router", "TopkRouter"))]
    sites = [m for m in sites if "Vision" not in type(m).__name__]
    chosen: list = []
    handles = []
    for block in model.modules():
        if isinstance(block, MoEBlock):
            handles.append(block.register_forward_hook(
                lambda m, a, o: chosen.append(m.route(a[0].reshape(-1, a[0].shape[-1]))[1])
            ))  # fmt: skip
        elif type(block).__name__ == "Ernie4_5_VLMoeMoeBlock":

            def hook(m, args, kwargs, out):
                vis = kwargs.get("moe_mm_token_type_ids", args[1] if len(args) > 1 else None)
                vis = vis.reshape(-1).bool()
                parts = {}
                ht = m.text_moe.gate.register_forward_hook(
                    lambda g, a, o: parts.setdefault(0, o[2])
                )
                hv = m.vision_moe.gate.register_forward_hook(
                    lambda g, a, o: parts.setdefault(1, o[2])
                )
                m.text_moe.gate(args[0].reshape(-1, args[0].shape[-1])[~vis])
                m.vision_moe.gate(args[0].reshape(-1, args[0].shape[-1])[vis])
                ht.remove(), hv.remove()
                k = parts[0].shape[-1]
                c = torch.empty(vis.shape[0], k, dtype=torch.long)
                c[~vis], c[vis] = parts[0], parts[1]
                chosen.append(c)

            handles.append(block.register_forward_hook(hook, with_kwargs=True))
    if not handles:
        # Hook what the MoE block consumes: the bias wrapper where there is one.
        wrappers = [m for m in model.modules() if isinstance(m, ModalityBiasRouter)]
        inner = {id(w.router) for w in wrappers}
        for r in [*wrappers, *(r for r in sites if id(r) not in inner)]:
            base = r.router if isinstance(r, ModalityBiasRouter) else r
            if type(base).__name__ == "Llama4Router":
                handles.append(r.register_forward_hook(
                    lambda m, a, o, k=base.top_k: chosen.append(torch.topk(o[0], k, dim=-1).indices)
                ))  # fmt: skip
            else:
                handles.append(r.register_forward_hook(lambda m, a, o: chosen.append(o[2])))
    model(**batch)
    for h in handles:
        h.remove()
    return [c.sort(dim=-1).values for c in chosen]


def choice_from_logits(reg, logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """Top-k of captured logits (None for group-limited sigmoid routers: their choice is not the
    top-k of the logits)."""
    out = []
    for site, z in zip(reg.sites, logits, strict=True):
        if hasattr(site.module, "e_score_correction_bias"):
            out.append(None)
            continue
        experts = torch.topk(z, site.top_k, dim=-1).indices
        out.append(experts.sort(dim=-1).values)
    return out


# ----------------------------------------------------------------------------------------------
# tests

NAMES = list(CASES)


@pytest.mark.parametrize("name", NAMES)
def test_captured_logits_equal_model_own_and_choose_its_experts(name):
    case = build(name)
    with torch.no_grad():
        reference = own_router_logits(case)
        reg = smar.attach(case.model, smar.SMARConfig(modality_bias=False))
        mine_choice = own_choice(case)
        captured = reg.logits()
        assert len(captured) == len(reference) == len(reg.sites) > 0
        for mine, theirs in zip(captured, reference, strict=True):
            assert torch.equal(mine, theirs.reshape(mine.shape))
        for a, b in zip(choice_from_logits(reg, captured), mine_choice, strict=True):
            assert a is None or torch.equal(a, b)
    reg.detach()


@pytest.mark.parametrize("name", NAMES)
def test_zero_bias_changes_no_output_and_detach_restores(name):
    case = build(name)
    routers_before = [type(s.module) for s in find_routers(case.model)]
    with torch.no_grad():
        before = case.model(**case.batch).logits
        reg = smar.attach(case.model, smar.SMARConfig(modality_bias=case.bias))
        during = case.model(**case.batch).logits
    assert torch.equal(before, during)
    if case.bias:
        assert len(reg.bias_parameters()) == len(reg.sites)
    reg.detach()
    assert [type(s.module) for s in find_routers(case.model)] == routers_before


@pytest.mark.parametrize("name", [n for n in NAMES if n != "ernie4_5_vl_moe"])
def test_large_bias_sends_image_tokens_to_its_expert(name):
    case = build(name)
    reg = smar.attach(case.model)
    favoured = 3
    with torch.no_grad():
        for b in reg.bias_parameters():
            b[1, favoured] = 100.0  # image tokens strongly prefer expert 3
        chosen = own_choice(case)
    image = case.image_mask.reshape(-1)  # (T,)
    for c in chosen:
        assert (c[image] == favoured).any(dim=-1).all()
        assert not (c[~image] == favoured).all()
    reg.detach()


def test_ernie_has_no_modality_bias_but_is_captured():
    case = build("ernie4_5_vl_moe")
    with pytest.raises(ValueError, match="cannot add a modality bias"):
        smar.attach(case.model)
    reg = smar.attach(case.model, smar.SMARConfig(modality_bias=False))
    assert reg.sites[0].adapter.name == "ernie4.5-vl-moe"
    assert "hard modality split" in reg.sites[0].adapter.note
    reg.detach()


def test_every_builtin_adapter_is_covered():
    covered = set()
    for name in NAMES:
        covered |= {s.adapter.name for s in find_routers(build(name).model)}
    # DeepSpeed-MoE's TopKGate is not a transformers model: tests/test_deepspeed_moe.py
    assert {a.name for a in ADAPTERS} - {"deepspeed-moe"} <= covered


def test_adapter_validates_its_fields():
    with pytest.raises(ValueError, match="router must be"):
        Adapter("x", ("R",), router="relu")
    with pytest.raises(ValueError, match="at least one"):
        Adapter("x", ())


def test_attach_warns_of_a_known_transformers_defect_in_one_line(monkeypatch):
    """A class that the installed transformers cannot run gets one warning naming the release,
    the symptom and what to install; other classes and releases get none."""
    import smar.upstream as upstream

    case = build("mixtral_llava")
    cls = type(case.model).__name__
    release = transformers.__version__
    defect = upstream.UpstreamDefect(cls, (release,), "forward fails", "install another release")
    monkeypatch.setattr(upstream, "UPSTREAM_DEFECTS", (*upstream.UPSTREAM_DEFECTS, defect))
    with pytest.warns(UserWarning) as seen:
        smar.attach(case.model).detach()
    lines = [str(w.message) for w in seen if cls in str(w.message)]
    assert lines == [f"transformers {release}: {cls}: forward fails; install another release"]
    monkeypatch.setattr(upstream, "_transformers_release", lambda: "0.0.1")
    assert upstream_defect(case.model) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smar.attach(case.model).detach()
