"""The testbed's configuration, in one module: the model's (:class:`TinyConfig`) and the run's,
small dataclasses with documented fields, and presets.

Presets are functions: :func:`demo_config` (``smar demo``), :func:`smoke_config` (``--smoke``,
tiny sizes for the tests) and :func:`sweep_config` (``smar sweep``). Change any field with
:func:`smar.testbed.overrides.apply_overrides` (``section.field=value``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import cast

from smar.errors import UsageError

STAGE_VERSION = 5  # bump when a stage's code changes what it produces


@dataclass
class TinyConfig:
    """Sizes and options of :class:`~smar.testbed.model.TinyModel` (``RunConfig.model``).

    Attributes:
        vocab_size: tokenizer vocabulary size (the ``<image>`` token included).
        image_token_id: id of the ``<image>`` placeholder; each image fills ``image_tokens``
            of them.
        dim: model width ``D``.
        n_layers: decoder layers.
        n_heads: attention heads.
        ffn_hidden: SwiGLU hidden width of each FFN (and of each expert).
        max_seq_len: longest sequence (RoPE table size).
        rope_theta: RoPE base.
        moe_layers: which layers hold MoE blocks: ``[]`` for a dense LM; ``upcycle`` fills it.
        num_experts: ``E`` of the MoE layers.
        top_k: experts per token.
        modality_bias: MoE routers get a trainable per-modality bias (docs/method.md#modality-bias).
        hard: MoE routers mask the other modality's experts (hard modality routing).
        partition: expert groups per modality for ``hard`` (default: halves).
        image_size: square image side in pixels.
        channels: image channels.
        patch_size: vision patch side; ``image_tokens = (image_size // patch_size) ** 2``.
        vision_dim: vision encoder width ``V``.
        vision_layers: vision transformer layers.
        vision_heads: vision attention heads.
        vision_classes: classes of the vision pretraining head (0: no head).
        vision_stem: channels of a 3x3 convolution before the patch embedding (0: none, linear
            patches as in ViT).
        vision_pool: how the pretraining head pools the patch features: ``"mean"`` or ``"max"``.
        vision_summary: add the image's pooled patch feature (what the pretraining head reads) to
            every patch feature before the projector, so that each image token carries the
            whole image's summary as well as its patch (a deep CLIP tower's patch features do).
    """

    vocab_size: int = 2048
    image_token_id: int = 1
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    moe_layers: list[int] = field(default_factory=list)
    num_experts: int = 4
    top_k: int = 2
    modality_bias: bool = False
    hard: bool = False
    partition: list[list[int]] | None = None
    image_size: int = 24
    channels: int = 3
    patch_size: int = 4
    vision_dim: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    vision_classes: int = 0
    vision_stem: int = 0
    vision_pool: str = "mean"
    vision_summary: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise UsageError(f"dim={self.dim} must split into n_heads={self.n_heads} even heads")
        if self.vision_dim % self.vision_heads:
            raise UsageError(f"vision_dim={self.vision_dim} must divide by {self.vision_heads}")
        if self.vision_pool not in ("mean", "max"):
            raise UsageError(f"vision_pool must be 'mean' or 'max'; got {self.vision_pool!r}")
        if self.image_size % self.patch_size:
            raise UsageError(
                f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
            )
        if not 0 <= self.image_token_id < self.vocab_size:
            raise UsageError(f"image_token_id={self.image_token_id} outside the vocabulary")
        bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
        if bad:
            raise UsageError(f"moe_layers {bad} outside [0, n_layers={self.n_layers})")
        if not 1 <= self.top_k <= self.num_experts:
            raise UsageError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")

    @property
    def image_tokens(self) -> int:
        """Image tokens per image (``P``)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict) -> TinyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown TinyConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class DataConfig:
    """Data options. ``text_files``: local text instead of the Shakespeare corpus;
    ``descriptions``: lines of text-only image descriptions in the stage-1 text (0: none);
    ``vision_examples``: images that stage 0 samples its batches from (half digits, half
    scenes)."""

    text_files: list[str] = field(default_factory=list)
    vocab_size: int = 2048
    skill_examples: int = 60000
    descriptions: int = 20000
    vision_examples: int = 10000
    image_size: int = 32
    eval_text: int = 1000
    eval_mm: int = 200
    prose_bytes: int = 60000
    seed: int = 0


@dataclass
class StageConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50


@dataclass
class InstructConfig:
    """Stage 2b, MoE-LLaVA's stage II: dense multimodal instruction tuning of the whole LM and
    the projector (the vision encoder stays frozen) on the stage-3 question/answer mix with
    ``text_ratio`` pure text, before stage 3. ``steps=0`` skips it (LLaVA's two stages)."""

    steps: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 20
    text_ratio: float = 0.25


BASES = ("upcycle", "native")


@dataclass
class TuneConfig:
    """Stage 3: upcycling and visual instruction tuning.

    ``base``: ``"upcycle"`` (MoE-LLaVA: the dense stage-1 LM's FFNs become ``num_experts`` copies
    at stage 3) or ``"native"`` (VITA on Mixtral: stage 1 pretrains a MoE LM whose experts differ
    from the start, with load balancing at ``lb_weight``; stage 3 tunes it without upcycling).
    ``layers``, ``num_experts`` and ``top_k`` shape the MoE layers either way.
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 20
    text_ratio: float = 0.025
    text_len: int = 48
    trainable: str = "moe"
    layers: str = "all"
    num_experts: int = 4
    top_k: int = 2
    noise: float = 0.0
    label_prompt: bool = True
    smar_weight: float = 1.0
    band: tuple[float, float] = (1.5, 2.0)
    lb_weight: float = 0.01
    base: str = "upcycle"

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise UsageError(f"tune.base must be one of {BASES}; got {self.base!r}")


@dataclass
class RunConfig:
    """Everything the pipeline needs; ``arms`` and ``controls`` say which stage-3 runs to make."""

    data: DataConfig = field(default_factory=DataConfig)
    model: TinyConfig = field(
        default_factory=lambda: TinyConfig(
            dim=96,
            n_layers=4,
            n_heads=4,
            ffn_hidden=256,
            max_seq_len=128,
            image_size=32,
            patch_size=4,
            vision_dim=64,
            vision_layers=2,
            vision_heads=4,
            vision_stem=16,
            vision_pool="max",
            vision_summary=True,
        )
    )
    vision: StageConfig = field(default_factory=lambda: StageConfig(1600, 32, 3e-3, 60))
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(1100, 16, 2e-3, 60))
    align: StageConfig = field(default_factory=lambda: StageConfig(600, 32, 3e-3, 20))
    instruct: InstructConfig = field(
        default_factory=lambda: InstructConfig(steps=2000, lr=1e-3, text_ratio=0.5)
    )
    tune: TuneConfig = field(default_factory=TuneConfig)
    # the demo shows `none` and `smar` over three seeds with the no-image and image-gradient-stop
    # controls on each (what the verdict and the two shares of the forgetting need); `smar sweep`
    # covers the other arms and the text-ratio controls
    arms: list[str] = field(default_factory=lambda: ["none", "smar"])
    controls: bool = True
    control_seeds: int = 0  # the text-ratio controls run on this many of the seeds
    # the shuffled-image control on every seed beside the no-image one (images present but
    # carrying no answer: separates the image tokens' share from the answers' predictability)
    shuffled_control: bool = False
    # the image-gradient-stop control on every seed beside the no-image one: `none` whose image
    # tokens give nothing to the MoE weights' gradients, the projector still learning (the share
    # of the forgetting that passes through those updates: what routing by modality can act on)
    stop_control: bool = True
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    text_ratios: list[float] = field(default_factory=list)
    bands: list[tuple[float, float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    workers: int = 2
    out: str = "runs/demo"


def demo_config() -> RunConfig:
    return RunConfig()


def smoke_config() -> RunConfig:
    """Tiny sizes: the whole pipeline in well under two minutes (used by the tests)."""
    return RunConfig(
        data=DataConfig(
            vocab_size=512,
            skill_examples=3000,
            image_size=16,
            eval_text=1000,
            eval_mm=20,
            prose_bytes=4000,
            descriptions=500,
            vision_examples=500,
        ),
        model=TinyConfig(
            dim=32,
            n_layers=2,
            n_heads=2,
            ffn_hidden=64,
            max_seq_len=128,
            image_size=16,
            vision_dim=32,
            vision_layers=1,
            vision_heads=2,
            vision_stem=4,
            vision_pool="max",
            vision_summary=True,
        ),
        vision=StageConfig(20, 32, 2e-3, 2),
        pretrain=StageConfig(60, 8, 3e-3, 5),
        align=StageConfig(20, 8, 2e-3, 2),
        instruct=InstructConfig(steps=10, batch_size=8, warmup=2, text_ratio=0.5),
        tune=TuneConfig(steps=15, batch_size=8, warmup=2, text_len=16),
        arms=["none", "smar", "hard_sample"],
        seeds=[0],
        control_seeds=1,
        out="runs/smoke",
    )


def sweep_config() -> RunConfig:
    """Arms x seeds for the confidence intervals of the README (long; not in CI)."""
    cfg = RunConfig(out="runs/sweep", seeds=[0, 1, 2, 3, 4], control_seeds=1)
    cfg.arms = ["none", "lb", "bias_lb", "smar_lb", "smar", "hard", "smar_sample", "hard_sample"]
    return cfg


def config_from_dict(d: dict) -> RunConfig:
    d = dict(d)
    cfg = RunConfig(
        data=DataConfig(**d.pop("data")),
        model=TinyConfig.from_dict(d.pop("model")),
        vision=StageConfig(**d.pop("vision")),
        pretrain=StageConfig(**d.pop("pretrain")),
        align=StageConfig(**d.pop("align")),
        instruct=InstructConfig(**d.pop("instruct", {})),
        tune=TuneConfig(**{**d.pop("tune")}),
    )
    cfg.tune.band = cast(tuple[float, float], tuple(cfg.tune.band))  # a JSON list; validated
    d["bands"] = [tuple(b) for b in d.get("bands", [])]
    for k, v in d.items():
        setattr(cfg, k, v)
    return cfg
