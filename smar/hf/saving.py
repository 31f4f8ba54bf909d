"""Saving and loading the trained modality bias, beside the model's own files.

Format (``smar_bias.safetensors`` in the directory ``save_pretrained`` wrote, or in a PEFT
adapter's directory):

* one float32 tensor ``(M, E)`` per biased router, named ``<router module name>.modality_bias``,
  where the router module name is the router's name in the model *without* smar or PEFT around
  it (e.g. ``model.layers.0.mlp.gate``; a PEFT ``base_model.model.`` prefix is removed);
* metadata ``format = "smar-bias/1"``, ``smar_config`` = the :class:`smar.SMARConfig` as JSON,
  ``checksum = "sha256:<hex>"`` over the tensors' names, shapes and float32 bytes, and
  ``routers`` = four random projections of each router weight it was trained with (older files
  have none and still load, with a note that they were not checked): loaded into a model with
  other router weights (another model or checkpoint with the same router names), it is warned
  about in one line. Projections rather than a hash of the bytes, so that the same model in
  another dtype (bf16) agrees with them.

:func:`save_bias` overwrites an existing file, as ``save_pretrained`` does, atomically.

:func:`load_bias` refuses, in one line naming the file and the fix, a file that is not
safetensors, lacks or garbles its metadata, holds other tensors, fails its checksum (a file from
an older version has none and is still read) or holds NaN or inf: a bias like that would make
every output of the model NaN, or silently route every token to one expert.

The model's own weights are saved with the *original* router keys (the wrappers are taken out
while ``save_pretrained`` runs), so a plain ``from_pretrained`` loads every router weight;
:func:`load_bias` then attaches SMAR with the saved config and restores the bias::

    model = AutoModelForCausalLM.from_pretrained(path)
    reg = smar.hf.load_bias(model, path)      # outputs equal the trained model's
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import fields

import torch
from torch import Tensor, nn

from smar.adapters import Adapter
from smar.atomic import publish
from smar.errors import MissingFile, UsageError
from smar.routing import Regularizer, SMARConfig, attach

__all__ = ["BIAS_FILE", "FORMAT", "save_bias", "load_bias", "load_bias_into", "bias_origin",
           "original_state_dict"]  # fmt: skip

BIAS_FILE = "smar_bias.safetensors"
FORMAT = "smar-bias/1"
_PEFT_PREFIX = "base_model.model."
log = logging.getLogger(__name__)
_SUFFIX = ".modality_bias"


def _plain(name: str) -> str:
    """The router's name without PEFT's prefix and tuner layer (``.base_layer``)."""
    name = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
    return name.replace(".base_layer.", ".")


def original_state_dict(reg: Regularizer, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of the model with SMAR attached, re-keyed as the model without it: the
    wrappers' ``<router>.router.<param>`` become ``<router>.<param>`` and the bias is left out."""
    wrapped = [s.name for s in reg.sites if "wrapper" in s.extra]
    out = {}
    for key, value in state.items():
        new: str | None = key  # None: left out
        for name in wrapped:
            inner = f"{name}.router."
            at = key.find(inner)
            if at >= 0 and (at == 0 or key[at - 1] == "."):
                new = key[:at] + f"{name}." + key[at + len(inner) :]
                break
            if key.endswith(f"{name}.modality_bias") or key.endswith(".modality_bias"):
                new = None
                break
        if new is not None:
            out[new] = value
    return out


def save_bias(reg: Regularizer, path: str | os.PathLike) -> str | None:
    """Writes the regularizer's modality bias to ``path/smar_bias.safetensors``.

    Args:
        reg: the :class:`smar.routing.Regularizer` that :func:`smar.attach` returned (or
            ``SMARTrainer.smar``).
        path: the model's folder (made if missing); an earlier bias file there is replaced
            atomically.

    Returns:
        The file written, or None when the regularizer has no bias (``modality_bias=False``).
    """
    from safetensors.torch import save_file

    state = reg.bias_state_dict()
    if not state:
        return None
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, BIAS_FILE)
    tensors = {_plain(k): v.detach().float().cpu().contiguous() for k, v in state.items()}
    meta = {
        "format": FORMAT,
        "smar_config": json.dumps(reg.config.to_dict()),
        "checksum": checksum(tensors),
        "routers": json.dumps(router_fingerprint(reg)),
    }
    if os.path.exists(file):  # as save_pretrained does; atomically, so never half a file
        log.info("overwriting %s", file)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{BIAS_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        publish(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return file


def router_fingerprint(reg: Regularizer) -> list[float]:
    """Four random projections of each router's weight the bias sits on (in name order): which
    model the bias was trained with. They survive a change of dtype (bf16 loads agree to 1%)
    where a hash would not, and differ entirely between two models."""
    from smar.bias import logit_weight

    out: list[float] = []
    for site in sorted(reg.sites, key=lambda s: _plain(s.name)):
        w = logit_weight(site.module).detach().float().cpu().flatten()  # (E * D,)
        g = torch.Generator().manual_seed(w.numel())
        out += (w @ torch.randn(w.numel(), 4, generator=g) / w.numel() ** 0.5).tolist()
    return out


def _same_routers(recorded: list[float], mine: list[float]) -> bool:
    a, b = torch.tensor(recorded), torch.tensor(mine)
    return a.shape == b.shape and bool((a - b).norm() <= 0.01 * a.norm() + 1e-6)


def checksum(tensors: dict[str, Tensor]) -> str:
    """``sha256:<hex>`` over the tensors' names, shapes and float32 bytes, in name order: the
    safetensors format has no checksum of its own, so a flipped byte would load as a bias."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().float().cpu().contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _read(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """The bias tensors and the saved config (as a dict) of ``path/smar_bias.safetensors``,
    checked (see the module docstring); a ValueError names the file, the problem and the fix."""
    from safetensors import safe_open

    file = os.path.join(path, BIAS_FILE)
    if not os.path.isfile(file):
        raise MissingFile(
            f"no {BIAS_FILE} in {path}",
            "save it with smar.hf.save_bias(reg, path) (SMARTrainer's "
            "checkpoints and save_model() write it)",
        )
    fix = (
        f"fix: save it again with smar.hf.save_bias(reg, {os.fspath(path)!r}), or delete it (or "
        "pass bias=False / --no-bias) to use the model without its trained bias"
    )
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 (SafetensorError, OSError: any unreadable file)
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UsageError(f"{file} is not a readable safetensors file ({first}); {fix}") from None
    if meta.get("format") != FORMAT:
        raise UsageError(
            f"{file} is not a smar bias file (format {meta.get('format')!r}, expected "
            f"{FORMAT!r}); {fix}"
        )
    saved = _saved_config(file, meta, fix)
    if not tensors:
        raise UsageError(f"{file} holds no bias tensor; {fix}")
    other = sorted(k for k in tensors if not k.endswith(_SUFFIX))
    bad = sorted(k for k, t in tensors.items() if t.dim() != 2 or not t.is_floating_point())
    if other:
        raise UsageError(f"{file} holds tensors not named '<router>{_SUFFIX}': {other[:5]}; {fix}")
    if bad:
        raise UsageError(
            f"{file} holds tensors that are not floating-point (num_modalities, experts) "
            f"matrices: {bad[:5]}; {fix}"
        )
    if "checksum" in meta and meta["checksum"] != checksum(tensors):
        raise UsageError(
            f"{file}: checksum mismatch, the file was changed or corrupted after it was saved; "
            f"{fix}"
        )
    nonfinite = sorted(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
    if nonfinite:
        raise UsageError(
            f"{file} holds NaN or inf in {nonfinite[:3]} (the training diverged): every output "
            "would be NaN; fix: load an earlier checkpoint's bias, lower the learning rate and "
            "train again, or pass bias=False / --no-bias to use the model without it"
        )
    return tensors, saved


def _saved_config(file: str, meta: dict, fix: str) -> dict:
    """The ``smar_config`` metadata as a dict that :class:`SMARConfig` accepts."""
    if "smar_config" not in meta:
        raise UsageError(f"{file} has no smar_config in its metadata; {fix}")
    try:
        saved = json.loads(meta["smar_config"])
    except ValueError as e:
        raise UsageError(f"{file}: its smar_config metadata is not JSON ({e}); {fix}") from None
    if not isinstance(saved, dict):
        raise UsageError(
            f"{file}: its smar_config metadata must be a JSON object of SMARConfig options; got "
            f"{type(saved).__name__}; {fix}"
        )
    known = {f.name for f in fields(SMARConfig)} - {"group"}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise UsageError(
            f"{file}: its smar_config has unknown options {unknown} (a newer smar, or an edited "
            f"file); {fix}, or upgrade smar"
        )
    try:
        config = SMARConfig(**saved)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{file}: its smar_config is invalid ({e}); {fix}") from None
    if not config.modality_bias:
        raise UsageError(f"{file}: its smar_config has modality_bias=false; {fix}")
    return saved


def load_bias_into(reg: Regularizer, path: str | os.PathLike) -> None:
    """Copies the bias saved in ``path`` into an attached regularizer (same routers). A file that
    records other router weights than this model's (another model or checkpoint with the same
    router names) is loaded with a warning: its bias was trained for those routers."""
    tensors, _ = _read(path)
    file = os.path.join(path, BIAS_FILE)
    mine = {_plain(k): k for k in reg.bias_state_dict()}
    try:
        reg.load_bias_state_dict({mine.get(k, k): v for k, v in tensors.items()})
    except ValueError as e:
        raise UsageError(
            f"{file}: {e}; fix: load it into the model it was trained "
            "with (the same routers and num_modalities), or pass bias=False / --no-bias"
        ) from None
    origin = bias_origin(reg, path)
    if origin == "other":
        warnings.warn(
            f"{file} was trained with other router weights than this model's (another model or "
            "checkpoint with the same router names): its bias may not route as it did in "
            "training; fix: load it into the model saved beside it, or leave it out (bias=False "
            "/ --no-bias)", stacklevel=3,
        )  # fmt: skip
    elif origin == "unrecorded":
        log.info("%s records no router weights (saved by an older smar): loaded without "
                 "checking that it was trained with this model", file)  # fmt: skip


def bias_origin(reg: Regularizer, path: str | os.PathLike) -> str:
    """Whether ``path/smar_bias.safetensors`` was trained with the router weights ``reg`` sits
    on: ``"same"``, ``"other"`` (another model or checkpoint), or ``"unrecorded"`` (a file
    saved before bias files recorded their routers)."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, BIAS_FILE), framework="pt") as f:
        recorded = (f.metadata() or {}).get("routers")
    try:
        recorded = None if recorded is None else [float(x) for x in json.loads(recorded)]
    except (ValueError, TypeError):
        recorded = None  # an edited record checks nothing
    if recorded is None:
        return "unrecorded"
    return "same" if _same_routers(recorded, router_fingerprint(reg)) else "other"


def load_bias(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    config: SMARConfig | None = None,
    adapter: Adapter | Sequence[Adapter] | None = None,
) -> Regularizer:
    """Attaches SMAR to a loaded model with the saved config and restores the trained bias.

    Args:
        model: the model loaded from ``path`` (``from_pretrained``, or ``PeftModel.from_pretrained``
            for a PEFT adapter directory).
        path: a directory holding ``smar_bias.safetensors`` (see the module docstring).
        config: overrides the saved :class:`smar.SMARConfig` (e.g. other loss weights); its
            ``modality_bias`` must stay True.
        adapter: adapters for routers the model does not declare, as given to ``attach``.

    Returns:
        The attached regularizer; ``model``'s outputs equal the trained model's.
    """
    _, saved = _read(path)
    if config is None:
        config = SMARConfig(**saved)
        _check_kinds(model, path, config, adapter)  # (a caller's config: attach names the fix)
    elif not config.modality_bias:
        raise UsageError(
            f"load_bias({os.fspath(path)!r}, config=...): config.modality_bias must stay True to "
            f"hold the saved bias; fix: pass a config with modality_bias=True"
        )
    reg = attach(model, config, adapter=adapter)
    try:
        load_bias_into(reg, path)
    except Exception:
        reg.detach()
        raise
    return reg


def _check_kinds(
    model: nn.Module,
    path: str | os.PathLike,
    config: SMARConfig,
    adapter: Adapter | Sequence[Adapter] | None,
) -> None:
    """The saved config's ``routers`` (mlp, attention or all) names routers the model has: the
    file is at fault, not a config the caller could change."""
    from smar.adapters import find_routers

    if find_routers(model, adapter, kinds=config.kinds):
        return
    has = [k for k in ("mlp", "attention") if find_routers(model, adapter, kinds=k)]
    if has:
        raise UsageError(
            f"{os.path.join(path, BIAS_FILE)} was trained on {config.routers} routers (its "
            f"smar_config routers={config.routers!r}), which {type(model).__name__} does not "
            f"have (it has {' and '.join(has)} routers)",
            "load it into the model it was trained with, or leave it out (bias=False / --no-bias)",
        )
