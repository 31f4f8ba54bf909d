"""Pairs of modalities held apart: which pairs, each pair's band, and their MRD.

With text and image only, SMAR holds one divergence per MoE layer in a band. Omni models route
text, image, video and audio through one set of experts; each *pair* of modalities then has its
own divergence ``D_ij`` (the MRD of docs/method.md#mrd between modalities ``i`` and ``j``), and
any of them may be held in a band of its own: text apart from each other modality (the default),
image and video kept alike (``(0, 0.5)``), or every pair (docs/method.md#more-than-two-modalities).

Everything here is pure and works on per-modality probability sums, so that the sums of every
modality come out of one product and go through one all-reduce (:mod:`smar.distributions`), and a
pair whose modalities are absent from the global batch is left out the same way on every rank.

Shapes legend:
    L  MoE layers      E  experts      M  modalities (in the order of ``modalities``)
    P  pairs held in a band
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from smar.distributions import jeffreys
from smar.errors import UsageError

__all__ = ["MODALITY_NAMES", "modality_name", "pair_name", "resolve_pairs", "pair_bands"]

MODALITY_NAMES = {0: "text", 1: "image", 2: "video", 3: "audio"}
PAIR_CHOICES = ("text", "all")
Pair = tuple[int, int]
# a band: (low, high), or one (low, high) per MoE layer (a list, or an (L, 2) tensor)
Band = Sequence[float] | Sequence[Sequence[float]] | Tensor


def modality_name(m: int) -> str:
    """``"text"``, ``"image"``, ``"video"``, ``"audio"`` for ids 0-3, ``"m<id>"`` beyond."""
    return MODALITY_NAMES.get(int(m), f"m{int(m)}")


def pair_name(pair: Pair) -> str:
    """``"text-video"``: the name of a pair in logs, reports and plots."""
    return f"{modality_name(pair[0])}-{modality_name(pair[1])}"


def _key(pair: Any) -> Pair:
    """A pair as a sorted tuple of two distinct non-negative ids (``D_ij = D_ji``)."""
    try:
        i, j = (int(x) for x in pair)
        ok = all(not isinstance(x, bool) and float(x) == int(x) for x in pair)
    except (TypeError, ValueError):
        ok = False
    if not ok or i < 0 or j < 0 or i == j:
        raise UsageError(f"a modality pair must be two distinct ids >= 0; got {pair!r}",
                         "e.g. (0, 2) for text-video")  # fmt: skip
    return (i, j) if i < j else (j, i)


def resolve_pairs(
    pairs: str | Sequence[Sequence[int]] | None,
    *,
    text: int = 0,
    modalities: Sequence[int] = (0, 1),
) -> tuple[Pair, ...]:
    """The pairs held in a band, text-anchored pairs written text first.

    Args:
        pairs: ``"text"`` (text against each other modality), ``"all"`` (every pair of
            ``modalities``), or a list of ``(i, j)`` pairs. None is ``"text"``.
        text: the text (anchor) modality id.
        modalities: the modality ids in use (``"text"`` and ``"all"`` pair these).

    Returns:
        The pairs in a fixed order: ``(text, m)`` first in the order of ``modalities``, then the
        others ``(i, j)`` with ``i < j``. With ``modalities=(0, 1)`` and the default, ``((0, 1),)``.
    """
    mods = tuple(int(m) for m in modalities)
    if pairs is None or pairs == "text":
        if text not in mods:
            raise UsageError(f"text={text} is not one of the modalities {mods}",
                             "give text one of them, or add it to the modalities")  # fmt: skip
        return tuple((text, m) for m in mods if m != text)
    if pairs == "all":
        keys = [(i, j) for a, i in enumerate(mods) for j in mods[a + 1 :]]
    elif isinstance(pairs, str) or not isinstance(pairs, Sequence) or not pairs:
        raise UsageError(
            f"pairs must be 'text', 'all' or a non-empty list of (i, j) modality pairs; got "
            f"{pairs!r}", "e.g. pairs='all' or pairs=[(0, 1), (1, 2)]",
        )  # fmt: skip
    else:
        keys = [_key(p) for p in pairs]
        if len(set(keys)) != len(keys):
            raise UsageError(f"pairs names a pair twice (D_ij = D_ji): {list(pairs)!r}",
                             "give each pair once")  # fmt: skip
    # text-anchored pairs text first, so that (0, 1) reads "text-image" whatever was given
    out = [(text, j if i == text else i) if text in (i, j) else _key((i, j)) for i, j in keys]
    return tuple(sorted(out, key=lambda p: (p[0] != text, p)))


def _band_rows(band: Any, num_layers: int) -> Tensor:
    """Validates ``band`` and returns it as a float tensor ``(L, 2)`` of (low, high).

    The values are checked in Python (a band tensor is read back once), never on the device.
    """
    fix = (f"band must be a (low, high) pair or a list of L={num_layers} pairs; got {band!r}; "
           "fix: e.g. band=(1.5, 2.0)")  # fmt: skip
    if isinstance(band, Tensor):
        band = band.tolist()
    try:
        rows = [[float(x) for x in pair] for pair in band]  # L pairs
        if len(band) == 2 and all(not isinstance(x, (list, tuple)) for x in band):
            raise TypeError  # a single pair
    except TypeError:
        try:
            rows = [[float(x) for x in band]] * num_layers  # one pair for every layer
        except (TypeError, ValueError) as e:
            raise UsageError(fix) from e
    except ValueError as e:
        raise UsageError(fix) from e
    if len(rows) != num_layers or any(len(r) != 2 for r in rows):
        raise UsageError(fix)
    if not all(math.isfinite(x) for r in rows for x in r):
        raise UsageError(f"band must be finite; got {band!r}", "e.g. band=(1.5, 2.0)")
    if any(x < 0 for r in rows for x in r):
        raise UsageError(f"band must be non-negative (D is a divergence, D >= 0); got {band!r}",
                         "e.g. band=(0.0, 0.5) keeps two modalities alike")  # fmt: skip
    if any(lo > hi for lo, hi in rows):
        raise UsageError(f"band must have low <= high; got {band!r}", "give (low, high)")
    return torch.tensor(rows, dtype=torch.float64)


def check_pair_bands(pair_bands: Mapping[Any, Any] | None) -> dict[Pair, Any]:
    """``{(i, j): band}`` with sorted pair keys; each band a pair or a list of per-layer pairs
    (its values checked; the number of layers is checked when the model is known)."""
    if pair_bands is None:
        return {}
    if not isinstance(pair_bands, Mapping):
        raise UsageError(
            f"pair_bands must be a dict {{(i, j): (low, high)}}; got {pair_bands!r}",
            "e.g. {(1, 2): (0.0, 0.5)} keeps image and video alike",
        )
    out: dict[Pair, Any] = {}
    for pair, band in pair_bands.items():
        if isinstance(pair, str):  # "1,2" or "1-2", as JSON keys come back
            pair = pair.replace("-", ",").split(",")
        key = _key(pair)
        if key in out:
            raise UsageError(f"pair_bands names the pair {key} twice (D_ij = D_ji)",
                             "give each pair once")  # fmt: skip
        single = isinstance(band, (tuple, list)) and len(band) == 2
        single = single and all(not isinstance(x, (tuple, list)) for x in band)
        _band_rows(band, 1 if single else len(band))
        out[key] = tuple(band) if single else band
    return out


def pair_bands(
    pairs: Sequence[Pair], band: Band, overrides: Mapping[Any, Any] | None, num_layers: int
) -> Tensor:
    """``(P, L, 2)``: each pair's band per layer, ``overrides[pair]`` where given, else ``band``."""
    own = check_pair_bands(overrides)
    unknown = set(own) - {_key(p) for p in pairs}
    if unknown:
        raise UsageError(
            f"pair_bands names {sorted(unknown)}, which is not among the pairs held in a band "
            f"{list(pairs)}; fix: add it to pairs= (or pairs='all')"
        )
    return torch.stack([_band_rows(own.get(_key(p), band), num_layers) for p in pairs])


def pair_divergences(
    sums: Tensor, counts: Tensor, modalities: Sequence[int], pairs: Sequence[Pair]
) -> tuple[Tensor, Tensor]:
    """D ``(P, L)`` and presence ``(P,)`` from per-modality sums ``(L, M, E)`` and counts ``(M,)``.

    A pair is present when both of its modalities have a valid token (in the counts given: the
    global ones under ``group=``). An absent modality's distribution is the zero vector (finite),
    so that its pairs' terms stay finite and drop out of the loss with weight 0.
    """
    index = {m: k for k, m in enumerate(modalities)}
    P = sums / counts.clamp_min(1.0)[None, :, None]  # (L, M, E); finite even when absent
    D = torch.stack([jeffreys(P[:, index[i], :], P[:, index[j], :]) for i, j in pairs])  # (P, L)
    present = torch.stack([(counts[index[i]] > 0) & (counts[index[j]] > 0) for i, j in pairs])
    return D, present  # (P, L), (P,)


def pair_band_loss(D: Tensor, present: Tensor, b: Tensor, hinge: str) -> Tensor:
    """The band loss over the present pairs and layers: mean of the hinges.

    Args:
        D: ``(P, L)``.  present: ``(P,)`` bool.  b: ``(P, L, 2)``.  hinge: linear or squared.

    Each pair's hinges are summed on their own, so that with one pair the loss is, bit for bit,
    the two-modality loss; a pair that is absent adds an exact 0.
    """
    below = (b[..., 0] - D).clamp_min(0)  # (P, L)
    above = (D - b[..., 1]).clamp_min(0)  # (P, L)
    h = below + above if hinge == "linear" else below.square() + above.square()  # (P, L)
    w = present.to(h.dtype)  # (P,)
    total = torch.stack([(h[p] * w[p]).sum() for p in range(h.shape[0])]).sum()
    n = (w * h.shape[1]).sum()
    # Layers without both modalities are skipped; with none at all the loss is a graph-connected 0.
    return total / n.clamp_min(1.0)
