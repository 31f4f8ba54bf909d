"""The configuration of SMAR on a model: :class:`SMARConfig`, its weights and options, checked
when it is made. :func:`smar.attach` takes it; :mod:`smar.routing` re-exports it."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from smar.collective import STATS
from smar.errors import UsageError, WrongType
from smar.losses import _check_band, check_weight
from smar.modality import LEVELS, resolve_groups
from smar.pairs import check_pair_bands, resolve_pairs

__all__ = ["SMARConfig", "check_config"]


@dataclass
class SMARConfig:
    """Weights and options of the SMAR regularizer (defaults: docs/method.md#objective).

    Args:
        smar_weight: weight of the tolerance-band loss on the per-layer MRD.
        band: ``(low, high)`` band of the MRD, or a list of one pair per MoE layer.
        hinge: ``"linear"`` or ``"squared"``.
        lb_weight: weight of the (Switch) load-balancing loss; 0 turns it off.
        lb_variant: ``"switch"`` (1 when balanced) or ``"hf"`` (transformers' pooled version).
        z_weight: weight of the router z-loss.
        modality_bias: replace each router by a :class:`ModalityBiasRouter` with a trainable,
            zero-initialised bias ``(M, E)``.
        modality: ``"token"`` (image tokens are 1, every text token 0) or ``"sample"`` (every
            token of a multimodal sample is 1).
        num_modalities: ``M``, rows of the modality bias (0 text, 1 image, 2 video, 3 audio).
        text: the anchor modality id of the MRD.
        image: the other modality id of the MRD, or several (e.g. ``(1, 2, 3)``: image, video and
            audio); None (default): every id below ``num_modalities`` but ``text``, which with
            the default ``num_modalities=2`` is image (1) alone.
        pairs: which pairs of modalities are held in a band: ``"text"`` (default: text against
            each modality of ``image``), ``"all"`` (every pair), or a list of ``(i, j)``
            (docs/method.md#more-than-two-modalities).
        pair_bands: a band of its own for some pairs, ``{(i, j): (low, high)}`` (or a list of
            per-layer pairs), e.g. ``{(1, 2): (0.0, 0.5)}`` keeps image and video alike; the
            other pairs use ``band``.
        groups: modality ids counted as one before anything else: ``"visual"`` (video tokens
            count as image tokens), ``"nontext"`` (video and audio count as image), or a dict
            ``{from_id: to_id}``; None keeps every id.
        routers: which routers SMAR acts on: ``"mlp"`` (the feed-forward experts' routers, the
            default), ``"attention"`` (JetMoE's mixture-of-attention routers) or ``"all"``.
        stats: ``"global"``: when ``torch.distributed`` is initialised with several processes,
            the MRD, the band loss and load balancing are computed over the global batch of
            ``group`` (one all-reduce per forward; the loss and the router gradients then equal
            one process's on the concatenated batch). ``"local"``: over each rank's batch.
        group: the process group of ``stats="global"``; None is the default (world) group, the
            data-parallel group of DDP, FSDP and DeepSpeed ZeRO. With tensor, context or expert
            parallelism, pass the group of ranks that hold different tokens (see
            docs/distributed.md). Not saved with the config.
        carry: in training, a modality absent from the batch is represented by its routing the
            last time it was present (detached): the text reference of sample-level ids, where
            few batches hold a pure-text sample (docs/method.md#modality-ids).
        accumulate: under gradient accumulation, the statistics pool the micro-batches of the
            optimizer step so far (earlier ones detached; see :class:`smar.collective.StepSums`);
            the trainer (or your loop, with :meth:`Regularizer.step`) marks where steps end.
        check: ``"first"``: the first forward's logits and modality ids are checked at once, later
            forwards without waiting for the device (problems surface at
            :meth:`Regularizer.check`, which SMARTrainer calls at every logging step);
            ``"always"``: every forward is checked at once (one host-device sync per check).
    """

    smar_weight: float = 1.0
    band: tuple[float, float] | Sequence[tuple[float, float]] = (1.5, 2.0)
    hinge: str = "linear"
    lb_weight: float = 0.01
    lb_variant: str = "switch"
    z_weight: float = 0.0
    modality_bias: bool = True
    modality: str = "token"
    num_modalities: int = 2
    text: int = 0
    image: int | tuple[int, ...] | None = None
    pairs: str | Sequence[tuple[int, int]] = "text"
    pair_bands: dict[tuple[int, int], Any] | None = None
    groups: dict[int, int] | str | None = None
    routers: str = "mlp"
    stats: str = "global"
    group: Any = None
    accumulate: bool = False
    carry: bool = False
    check: str = "first"

    def __post_init__(self) -> None:
        for name in ("smar_weight", "lb_weight", "z_weight"):
            if not _number(getattr(self, name)):  # the type here, with its fix; values below
                raise WrongType(f"{name} must be a number >= 0; got {getattr(self, name)!r}",
                                f"e.g. {name}=1.0 ({name}=0.0 turns the term off)")  # fmt: skip
            check_weight(name, getattr(self, name))
        for name in ("modality_bias", "accumulate", "carry"):  # a string such as "no" is truthy
            if not isinstance(getattr(self, name), bool):
                raise WrongType(f"{name} must be True or False; got {getattr(self, name)!r}",
                                f"{name}=True or {name}=False")  # fmt: skip
        for name, allowed in (("hinge", ("linear", "squared")), ("lb_variant", ("switch", "hf")),
                              ("modality", LEVELS), ("routers", ("mlp", "attention", "all")),
                              ("stats", STATS), ("check", ("first", "always"))):  # fmt: skip
            _one_of(name, getattr(self, name), allowed)
        n = self.num_modalities
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise UsageError(f"num_modalities must be an integer >= 2; got {n!r}",
                             "e.g. num_modalities=2 (text and image)")  # fmt: skip
        self._check_modalities()
        groups = resolve_groups(self.groups, keep=self.modalities)
        if self.groups is not None and not isinstance(self.groups, str):
            self.groups = groups  # ids as integers: JSON keys are strings
        if isinstance(self.band, list) and self.band and _number(self.band[0]):
            self.band = tuple(self.band)  # a pair read from JSON or YAML
        # the types, then the values (the number of layers is checked when the model is known)
        if not (_pair(self.band) or _layer_pairs(self.band)):
            raise UsageError(
                f"band must be a (low, high) pair of numbers or a list of one pair per MoE layer; "
                f"got {self.band!r}", "e.g. band=(1.5, 2.0)"
            )  # fmt: skip
        _check_band(self.band, 1 if _pair(self.band) else len(self.band))

    def _check_modalities(self) -> None:
        if isinstance(self.image, list):
            self.image = tuple(self.image)  # read from JSON or YAML
        ids = (self.text, *(self.image if isinstance(self.image, tuple) else (self.image,)))
        ids = ids if self.image is not None else (self.text,)
        if any(isinstance(m, bool) or not isinstance(m, int) for m in ids):
            raise UsageError(
                f"text and image must be integer modality ids (0 text, 1 image, 2 video, 3 "
                f"audio), image also a tuple of them; got text={self.text!r}, image={self.image!r}",
                "e.g. text=0, image=1 (or image=(1, 2) for image and video)",
            )
        if not all(0 <= m < self.num_modalities for m in ids):
            raise UsageError(
                f"text={self.text} and image={self.image} must be < num_modalities="
                f"{self.num_modalities}; fix: num_modalities={max(ids) + 1}"
            )
        if len(set(ids)) != len(ids) or len(self.modalities) < 2:
            raise UsageError(
                f"text={self.text} and image={self.image} must be distinct ids, at least one "
                "besides text", "e.g. text=0, image=1"
            )  # fmt: skip
        if isinstance(self.pairs, list) and self.pairs and isinstance(self.pairs[0], list):
            self.pairs = [tuple(p) for p in self.pairs]  # read from JSON or YAML
        self.held_pairs  # noqa: B018  (checks the pairs)
        if self.pair_bands is not None:
            self.pair_bands = check_pair_bands(self.pair_bands)
            unknown = set(self.pair_bands) - {(min(p), max(p)) for p in self.held_pairs}
            if unknown:
                raise UsageError(
                    f"pair_bands names {sorted(unknown)}, not among the pairs held in a band "
                    f"{list(self.held_pairs)}; fix: add it to pairs= (or pairs='all')"
                )

    @property
    def modalities(self) -> tuple[int, ...]:
        """The ids SMAR compares, text first: ``(text, *image)``."""
        if self.image is None:
            return (self.text, *(m for m in range(self.num_modalities) if m != self.text))
        return (self.text, *(self.image if isinstance(self.image, tuple) else (self.image,)))

    @property
    def held_pairs(self) -> tuple[tuple[int, int], ...]:
        """The pairs of modalities held in a band, in the order their MRD is logged."""
        return resolve_pairs(self.pairs, text=self.text, modalities=self.modalities)

    def to_dict(self) -> dict:
        """The options as plain data (``group``, a live process group, is left out; the pairs of
        ``pair_bands`` as ``"i,j"`` keys, as JSON keeps them)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "group"}
        if self.pair_bands:
            out["pair_bands"] = {f"{i},{j}": band for (i, j), band in self.pair_bands.items()}
        return out

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("mlp", "attention") if self.routers == "all" else (self.routers,)


def _one_of(name: str, value: object, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        choices = " or ".join(repr(a) for a in allowed)
        raise UsageError(f"{name} must be {choices}; got {value!r}", f"e.g. {name}={allowed[0]!r}")


def _number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _pair(band: object) -> bool:
    return isinstance(band, (tuple, list)) and len(band) == 2 and all(map(_number, band))


def _layer_pairs(band: object) -> bool:
    return isinstance(band, (tuple, list)) and len(band) > 0 and all(map(_pair, band))


def check_config(config: object, who: str) -> SMARConfig:
    """``config`` as a :class:`SMARConfig` (None: the defaults), or one line naming the fix."""
    if config is None:
        return SMARConfig()
    if isinstance(config, SMARConfig):
        return config
    if isinstance(config, type) and issubclass(config, SMARConfig):
        raise WrongType(f"{who}: got the class SMARConfig, not a config",
                        "pass an instance: smar.SMARConfig() (or with options)")  # fmt: skip
    if isinstance(config, dict):
        raise WrongType(f"{who}: got a dict, not a SMARConfig", "pass smar.SMARConfig(**options)")
    raise WrongType(f"{who}: the config must be a smar.SMARConfig; got a {type(config).__name__} "
                    f"({config!r:.40})", "pass smar.SMARConfig(...)")  # fmt: skip
