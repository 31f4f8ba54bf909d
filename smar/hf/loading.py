"""One loader for model folders, used by every command that reads a trained model.

A folder is what ``save_pretrained`` (and :class:`smar.hf.SMARTrainer`) writes: a causal LM, a
LLaVA-style or native multimodal MoE model (the class its ``config.json`` names), a model
upcycled by :func:`smar.hf.upcycle_hf`, or a PEFT adapter folder (``adapter_config.json``: its
base model is loaded first, then the adapter). Where the folder holds ``smar_bias.safetensors``
the trained modality bias is attached with the saved config, so the model routes as it was
trained; ``bias=False`` looks at the model without it. :attr:`Loaded.note` says in one line which
of the two it is, and the commands print it.

    loaded = load_model_folder("out/checkpoint-100")
    print(loaded.note)          # "...: modality bias loaded (smar_bias.safetensors, 2 routers)"
    loaded.model(**batch)       # routes with the trained bias

A folder that cannot give a usable model is refused before (or while) it loads, in one line that
names the folder or file and the fix: no weights, weights that are not safetensors (smar never
loads pickles: unpickling can run code), a truncated or unreadable weights file, NaN or inf in a
weight, a config.json that is not JSON or does not match its weights (a layer, width or expert
count edited: transformers would fill the difference with random weights), a router choosing
more experts than it has, a tokenizer missing or not JSON (``tokenizer=True``), no MoE router
(``routers=True``). A bias file trained with other router weights is loaded with a warning, and
the note says so (as it says when an older file cannot be checked).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from smar.adapters import Adapter, RouterSite, find_routers
from smar.errors import MissingFile, UsageError
from smar.hf.config import _check_local
from smar.hf.inspect import load_model_dir
from smar.hf.saving import BIAS_FILE, bias_origin, load_bias
from smar.routing import Regularizer

__all__ = ["Loaded", "load_model_folder"]

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "vocab.txt", "spiece.model")  # fmt: skip
# the tokenizer's JSON files: a garbled one would otherwise fail deep inside transformers
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json", "vocab.json")  # fmt: skip
_RESAVE = "fix: load the model in a trusted session and save it again with save_pretrained"
_ORIGIN = {
    "same": "",
    "other": ", trained with other router weights than this model's: see the warning",
    "unrecorded": "; an older file that does not record its routers, so not checked against "
    "this model",
}


@dataclass
class Loaded:
    """A model loaded from a folder.

    Attributes:
        model: the model in eval mode (a ``PeftModel`` for an adapter folder).
        path: the folder.
        regularizer: SMAR attached with the trained bias, or None (no bias file, or
            ``bias=False``). It holds the bias wrappers: ``regularizer.detach()`` removes them.
        note: one line saying what was loaded, the bias included.
        tokenizer_path: the folder holding its tokenizer (the folder, or an adapter's base), when
            it was asked for (``tokenizer=True``).
    """

    model: nn.Module
    path: str
    regularizer: Regularizer | None
    note: str
    tokenizer_path: str | None = None


def _is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def _load_adapter_folder(path: Path) -> nn.Module:
    from peft import PeftModel

    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        if not isinstance(base, str) or not base:  # null when the base was built, not loaded
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"{path / ADAPTER_CONFIG} names no base_model_name_or_path; fix: write it with PEFT's "
            "save_pretrained, or merge the adapter into its base model and save that"
        ) from None
    base_dir = Path(base) if Path(base).is_absolute() else (path / base)
    if not base_dir.is_dir():
        base_dir = Path(base)
    if not base_dir.is_dir():
        raise UsageError(
            f"{path} is a PEFT adapter of {base!r}, which is not a local folder; fix: save the "
            "base model locally and set base_model_name_or_path in adapter_config.json to it"
        )
    check_weights(base_dir)
    _check_adapter_weights(path)
    return PeftModel.from_pretrained(_load(base_dir), str(path))


def load_model_folder(
    path: str | os.PathLike, *, bias: bool = True, weights: bool = True,
    adapter: Adapter | Sequence[Adapter] | None = None, tokenizer: bool = False,
    routers: bool = False,
) -> Loaded:  # fmt: skip
    """The model of a folder, with its trained modality bias where it has one.

    Args:
        path: a folder written by ``save_pretrained`` (model or PEFT adapter).
        bias: attach ``smar_bias.safetensors`` when the folder has it (False: the model as
            ``from_pretrained`` gives it).
        weights: load the weights (False: the architecture on the meta device, without bias).
        adapter: adapters for routers the model does not declare, as given to ``smar.attach``.
        tokenizer: require a tokenizer in the folder (or an adapter's base folder), checked
            before the model loads.
        routers: require a MoE router smar finds (a dense model is refused).

    Returns:
        A :class:`Loaded`.

    Raises:
        FileNotFoundError: ``path`` is not a folder, or has no config.json, weights or
            (``tokenizer=True``) tokenizer.
        ValueError: the weights are pickles, unreadable or not finite; a config.json that is
            not JSON, does not match its weights or gives a router more experts than it has; a
            tokenizer file that is not JSON; an adapter folder whose base model is not local; a
            bad bias file; (``routers=True``) no router.
    """
    _check_local(path)
    folder = Path(path).expanduser()
    is_adapter = _is_adapter_folder(folder)
    if not is_adapter:
        _check_config_json(folder)
    tokens = tokenizer_folder(folder, _adapter_base(folder) if is_adapter else None) if (
        tokenizer) else None  # fmt: skip
    if tokens is not None:
        check_json_files(tokens, TOKENIZER_JSON, "the tokenizer")
    if is_adapter:
        model, what = _load_adapter_folder(folder), "PEFT adapter"
    else:
        if weights:
            check_weights(folder)
        model, what = _load(folder, weights=weights), type_name(folder)
    model.eval()
    if weights:
        _check_finite(model, folder)
    sites = find_routers(model, adapter)
    _check_top_k(sites, folder)
    if routers and not sites:
        raise UsageError(
            f"{folder}: no MoE router smar knows in {type(model).__name__} (a dense model?); "
            "fix: upcycle it with smar.hf.upcycle_hf and save_pretrained, or pass adapter= "
            "(smar.adapters.Adapter) for a MoE architecture smar does not know"
        )
    if (folder / BIAS_FILE).exists() and not (folder / BIAS_FILE).is_file():
        raise UsageError(f"{folder} has a folder where {BIAS_FILE} should be",
                         "remove it, or pass bias=False / --no-bias")  # fmt: skip
    has_bias = (folder / BIAS_FILE).is_file()
    reg = None
    if has_bias and bias and weights:
        try:
            reg = load_bias(model, folder, adapter=adapter)
        except ValueError as e:  # attach's errors name the model class, not the folder
            if str(folder) in str(e):
                raise
            raise UsageError(f"{folder / BIAS_FILE}: {e}") from None
        origin = _ORIGIN[bias_origin(reg, folder)]
        note = f"modality bias loaded ({BIAS_FILE}, {len(reg.sites)} routers{origin})"
    elif has_bias:
        note = f"{BIAS_FILE} not loaded (--no-bias): the model without its trained bias"
    else:
        note = f"no {BIAS_FILE}: the model as saved"
    return Loaded(model, str(path), reg, f"{path} ({what}): {note}",
                  None if tokens is None else str(tokens))  # fmt: skip


def _load(folder: Path, weights: bool = True) -> nn.Module:
    """``load_model_dir``, its OS and deserialisation errors turned into one line naming the
    folder (transformers' own may name neither the file nor a fix)."""
    from safetensors import SafetensorError

    # never a pickle, whatever is there; the loading report tells a config edited against its
    # weights (missing, unexpected or reshaped weights) from a whole model
    # (reshaped weights are reported rather than raised, so the message can name one)
    kwargs = {"use_safetensors": True, "output_loading_info": True,
              "ignore_mismatched_sizes": True} if weights else {}  # fmt: skip
    try:
        with _quiet_transformers():
            # (model, loading info) with output_loading_info
            out: Any = load_model_dir(str(folder), weights=weights, **kwargs)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError, SafetensorError) as e:
        if "mismatched_sizes" in str(e) or "size mismatch" in str(e):
            raise UsageError(f"{folder}: config.json does not match its weights (shapes differ)",
                             _CONFIG_FIX) from None  # fmt: skip
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"{folder}: the model does not load ({first}); {_RESAVE}") from None
    if not weights:
        return out
    model, info = out
    wrong = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys",
                                                      "mismatched_keys")}  # fmt: skip
    if any(wrong.values()):
        what = "; ".join(f"{len(v)} {_KINDS[k]}, e.g. {_key(v[0])}" for k, v in wrong.items() if v)
        raise UsageError(f"{folder}: config.json does not match its weights ({what})", _CONFIG_FIX)
    return model


_KINDS = {"missing_keys": "missing", "unexpected_keys": "unexpected",
          "mismatched_keys": "of another shape"}  # fmt: skip


def _key(entry: object) -> str:
    """A loading report's entry: a weight's name, or (name, saved shape, config's shape)."""
    if isinstance(entry, tuple) and len(entry) == 3:
        name, saved, built = entry
        return f"{name[:80]} saved {list(saved)}, config.json makes {list(built)}"
    return str(entry)[:80]


_CONFIG_FIX = ("restore the config.json saved with these weights (an edited width, number of "
               "layers or experts changes which weights the model has)")  # fmt: skip


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a loading report before it raises; the one line here replaces it."""
    import transformers

    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(before)


def check_weights(folder: Path) -> None:
    """The folder's weights are safetensors files whose headers read (a truncated or garbled
    file fails here, naming itself, rather than deep inside transformers)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(
                f"{index} is not a safetensors index (no weight_map); {_RESAVE}"
            ) from None
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise MissingFile(
                f"{folder}: {index.name} names shards that are not there: {missing[:3]}",
                "copy every shard into the folder, or save the model again",
            )
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        _no_safetensors(folder, "model.safetensors", "save_pretrained(folder)")
        return
    for name in files:
        _check_safetensors(folder / name)


def _check_adapter_weights(folder: Path) -> None:
    if not (folder / "adapter_model.safetensors").is_file():
        _no_safetensors(folder, "adapter_model.safetensors", "the PEFT model's save_pretrained")
    _check_safetensors(folder / "adapter_model.safetensors")


def _no_safetensors(folder: Path, expected: str, how: str) -> None:
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt*") if p.is_file()
    )
    if pickles:
        raise UsageError(
            f"{folder} holds its weights as pickles ({', '.join(pickles[:3])}), which smar "
            "never loads (unpickling runs code); fix: load it in a trusted session and save "
            f"with safetensors ({how} writes {expected})"
        )
    raise MissingFile(
        f"{folder} has no weights ({expected})",
        f"write them with {how}, or copy the weight files into the folder",
    )


def _check_safetensors(file: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 (SafetensorError, OSError: any unreadable file)
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UsageError(
            f"{file} is not a readable safetensors file ({first}: truncated or corrupted); "
            "fix: copy it again from where it was saved, or save the model again"
        ) from None


def _check_finite(model: nn.Module, folder: Path) -> None:
    """safetensors has no checksum: a garbled weight loads as any number. NaN or inf in a
    weight would make every output NaN, so they are refused here, naming the weight."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not bool(p.isfinite().all()):
            raise UsageError(
                f"{folder}: weight {name} holds NaN or inf (a corrupted file or a diverged "
                "training); fix: copy the weights again, or load an earlier checkpoint"
            )


def _adapter_base(folder: Path) -> Path | None:
    try:
        base = Path(json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return base if base.is_absolute() or not (folder / base).is_dir() else folder / base


def tokenizer_folder(folder: Path, base: Path | None = None) -> Path:
    """The folder (or else an adapter's base folder) that holds a tokenizer: the commands that
    read a model need one, and find out before the model loads."""
    for where in (folder, base):
        if where is not None and any((Path(where) / f).is_file() for f in TOKENIZER_FILES):
            return Path(where)
    raise MissingFile(
        f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...)",
        f"save it into the folder: AutoTokenizer.from_pretrained(BASE_MODEL).save_pretrained("
        f"'{folder}')",
    )


def type_name(folder: Path) -> str:
    """The architecture a folder's config names, for messages."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "model"
    names = config.get("architectures") if isinstance(config, dict) else None
    return names[0] if names else str(config.get("model_type", "model"))


def _check_config_json(folder: Path) -> None:
    """config.json is a file that parses (transformers' own error for a garbled one suggests
    another transformers release)."""
    file = folder / "config.json"
    if not file.is_file():
        return  # missing, or a folder: said by load_model_dir, with the fix
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:100]
        raise UsageError(f"{file} is not readable JSON ({first})",
                         "restore the config.json saved with these weights (save_pretrained "
                         "writes it)") from None  # fmt: skip


def check_json_files(folder: str | os.PathLike, names: Iterable[str], what: str) -> None:
    """The JSON files ``names`` of a folder parse: a corrupt one is named in one line, where
    transformers would fail deep inside (or fall back and report it as missing)."""
    for name in names:
        path = Path(folder) / name
        if not path.exists():
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:100]
            fix = f"restore it: save {what} again with save_pretrained"
            raise UsageError(f"{path} is not readable JSON ({first})", fix) from None


def _check_top_k(sites: Sequence[RouterSite], folder: Path) -> None:
    """No router chooses more experts than it has (an edited num_experts_per_tok would fail in
    the first forward, inside torch.topk)."""
    for s in sites:
        try:
            k, e = s.top_k, s.num_experts
        except (ValueError, AttributeError):
            continue
        if k is not None and e is not None and k > e:
            raise UsageError(
                f"{folder}: config.json makes {s.name} choose top_k={k} of its {e} experts",
                f"set num_experts_per_tok to at most {e} (restore the config.json saved with "
                "these weights)",
            )
