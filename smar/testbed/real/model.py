"""The vision-language model of ``smar real``: a standard ``LlavaForConditionalGeneration`` around
the real language model, its FFNs upcycled with :func:`smar.hf.upcycle_hf` (MoE-LLaVA).

The vision tower is a tiny CLIP vision model (a standard transformers config, trained here: the
testbed's stage 0), LLaVA's two-layer projector maps its patch features to the LM's width, and
each image takes the places of ``<image>`` placeholder tokens (a special token added to the
tokenizer; its embedding starts at the mean of the others). The language model's weights are
copied unchanged, so on text the new model computes the base model's logits exactly; upcycling
copies each MLP into every expert, which changes them only by rounding (``text_gap``).

Layers: ``"alternate"`` (every other decoder layer, MoE-LLaVA's choice) by default: half the MLPs
become 4 experts top-2, the others stay dense and shared by both modalities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )

__all__ = ["VisionSpec", "IMAGE_TOKEN", "CHAT_TEMPLATE", "build_vlm", "build_run_vlm", "text_gap"]

IMAGE_TOKEN = "<image>"

# SmolLM2-Instruct's own chat template (its tokenizer's), reading TRL's typed content as well as
# plain strings: an image item becomes the <image> placeholder the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class VisionSpec:
    """The tiny CLIP vision tower: ``image_size // patch_size`` squared tokens per image."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_vlm(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
              vision: VisionSpec = VisionSpec(), num_experts: int = 4, top_k: int = 2,
              layers: str | Sequence[int] = "alternate", chat_template: str | None = None,
              ) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase,
                         LlavaProcessor]:  # fmt: skip
    """``(model, tokenizer, processor)``: LLaVA around ``base`` (a ``...ForCausalLM``), upcycled.

    ``tokenizer`` gets the ``<image>`` token (a copy is returned; the base's is unchanged); the
    processor's chat template is ``chat_template`` (e.g. :data:`CHAT_TEMPLATE` for SmolLM2) or the
    tokenizer's.
    """
    import copy

    import transformers

    import smar.hf

    tok: Any = copy.deepcopy(tokenizer)  # Any: its stubs give one token's id as int | list[int]
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = base.config.to_dict()
    vocab = max(text["vocab_size"], image_id + 1)
    text.update(vocab_size=vocab)
    text.pop("architectures", None)
    vis = transformers.CLIPVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=4 * vision.hidden_size,
        num_hidden_layers=vision.layers, num_attention_heads=vision.heads,
        image_size=vision.image_size, patch_size=vision.patch_size,
    )  # fmt: skip
    cfg = transformers.LlavaConfig(
        vision_config=vis, text_config=text, image_token_index=image_id,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=vision.tokens_per_image,
        tie_word_embeddings=base.config.tie_word_embeddings,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(cfg)
    state = dict(base.model.state_dict())
    emb = state["embed_tokens.weight"]  # (V, D)
    extra = vocab - emb.shape[0]
    state["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)])
    model.model.language_model.load_state_dict(state)
    if not base.config.tie_word_embeddings:
        head = base.lm_head.weight.detach()
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.cat([head, head.mean(0, keepdim=True)
                                                  .expand(extra, -1)]))  # fmt: skip
    smar.hf.upcycle_hf(model, num_experts=num_experts, top_k=top_k, layers=layers)
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessorPil(  # no torchvision needed
            size={"shortest_edge": vision.image_size},
            crop_size={"height": vision.image_size, "width": vision.image_size},
        ),
        tokenizer=tok, patch_size=vision.patch_size, vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
        chat_template=chat_template or getattr(tok, "chat_template", None),
    )  # fmt: skip
    return model.eval(), tok, processor


def build_run_vlm(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, vision: VisionSpec,
                  layers: str | Sequence[int],
                  ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:  # fmt: skip
    """``(model, processor)`` as ``smar real run`` trains them: :func:`build_vlm` with SmolLM2's
    chat template and right padding (training batches), its random parts from seed 0."""
    torch.manual_seed(0)
    model, _, proc = build_vlm(base, tokenizer, vision=vision, layers=layers,
                               chat_template=CHAT_TEMPLATE)  # fmt: skip
    proc.tokenizer.padding_side = "right"
    return model, proc


def text_gap(base: PreTrainedModel, model: PreTrainedModel, *, tokens: int = 64,
             seed: int = 0) -> float:  # fmt: skip
    """The largest ``|logit difference|`` between the base LM and the vision-language model on
    two sequences of random text tokens (the base's vocabulary)."""
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, tokens), generator=g)
    with torch.no_grad():
        a = base(input_ids=ids).logits
        b = model(input_ids=ids).logits[..., :vocab]
    return float((a - b).abs().max())
