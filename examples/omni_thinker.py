"""SMAR on an omni MoE model: text, image, video and audio through one set of experts.

A tiny, randomly initialised Qwen3-Omni-MoE thinker (2 MoE layers, 4 experts, top-2) trains 60
steps with text, an image, a video and audio in every batch. SMAR holds text apart from each
other modality (band 1.5-2.0) and keeps image and video alike (band 0-0.5); then ``smar
analyze``'s page shows the MRD matrix of each layer and each pair by layer.

    python examples/omni_thinker.py [--out DIR]

With a real checkpoint: ``model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(...)``,
then ``smar.attach(model.thinker, config)`` and your own data through its processor.
"""

import argparse
import tempfile

import torch
import transformers

import smar
from smar.analyze import Source, analyze, routing_record, write_analysis

IMG, VID, AUD, VSTART, ASTART, END = 100, 101, 102, 103, 104, 105


def tiny_thinker() -> torch.nn.Module:
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  deepstack_visual_indexes=[0])  # fmt: skip
    audio = dict(d_model=32, output_dim=32, downsample_hidden_size=16, encoder_layers=2,
                 encoder_attention_heads=2, encoder_ffn_dim=64)  # fmt: skip
    config = transformers.Qwen3OmniMoeThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio, image_token_id=IMG,
        video_token_id=VID, audio_token_id=AUD, audio_start_token_id=ASTART,
    )  # fmt: skip
    config.vision_start_token_id = VSTART  # read by its rope index (checkpoints carry it)
    return transformers.Qwen3OmniMoeThinkerForConditionalGeneration(config)


def batch(model, g: torch.Generator) -> dict:
    """Text, an image (4 tokens), a video (8) and audio (5), laid out as the processor does."""
    vc = model.config.vision_config
    patch = 3 * vc.temporal_patch_size * vc.patch_size**2

    def text(n):
        return torch.randint(0, 90, (n,), generator=g).tolist()

    seq = text(3) + [VSTART] + [IMG] * 4 + [END] + text(2) + [VSTART] + [VID] * 8 + [END]
    seq += text(2) + [ASTART] + [AUD] * 5 + [END] + text(4)
    ids = torch.tensor([seq])
    return dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
        pixel_values=torch.randn(16, patch, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]]),
        pixel_values_videos=torch.randn(32, patch, generator=g),
        video_grid_thw=torch.tensor([[2, 4, 4]]), video_second_per_grid=torch.tensor([1.0]),
        input_features=torch.randn(1, 128, 40, generator=g),
        feature_attention_mask=torch.ones(1, 40, dtype=torch.long),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the analyze page (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = tiny_thinker()
    config = smar.SMARConfig(num_modalities=4, pairs="all", pair_bands={(1, 2): (0.0, 0.5)})
    reg = smar.attach(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        out = model(**batch(model, g))
        loss = out.loss + reg.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            t = reg.terms()
            pairs = ", ".join(f"{k[9:]} {v:.2f}" for k, v in t.items() if k.startswith("smar/mrd/"))
            print(f"step {step:2d}  lm {out.loss.item():.3f}  band {t['smar/band']:.3f}  {pairs}")

    # the analysis: the trained thinker's routing on 8 new batches, every pair of modalities
    def routed():
        model.eval()
        with torch.no_grad():
            for _ in range(8):
                model(**batch(model, g))
                yield [z.detach() for z in reg.logits()], reg.modality_ids.flatten()

    held = {p: config.pair_bands.get(p, config.band) for p in config.held_pairs}
    info = {"model": "tiny Qwen3-Omni-MoE thinker, 4 experts, top-2"}
    source = Source("omni thinker + SMAR", routed, top_k=2, total=8, modalities=(0, 1, 2, 3),
                    pairs=held, info=info)  # fmt: skip
    analysis = analyze(source, progress=False)
    out_dir = args.out or tempfile.mkdtemp(prefix="smar-omni-")
    paths = write_analysis([analysis], out_dir)
    record = routing_record(analysis)
    outside = {p["pair"]: sum(1 for v, b in ((v, p["band"]) for v in p["mrd"])
                              if not b[0] <= v <= b[1]) for p in record["pairs"]}  # fmt: skip
    print(f"analyze page: {paths['html']}; layers outside their band per pair: {outside}")


if __name__ == "__main__":
    main()
