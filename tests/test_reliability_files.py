"""Damaged, edited or unusual files and folders: each is refused in one line that names the file
or folder, what is wrong and the fix (or, for a config.json whose ``architectures`` misleads,
loaded with the class its model type needs).

Each case builds its folder in ``tmp_path`` from a tiny Qwen3-MoE saved once (vocab 64, hidden
32, 2 layers, 4 experts, top-2) with a trained-looking ``smar_bias.safetensors``.
"""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

import smar  # noqa: E402
import smar.hf  # noqa: E402
from smar.errors import MissingFile, UsageError  # noqa: E402
from smar.hf.loading import load_model_folder  # noqa: E402
from smar.hf.saving import BIAS_FILE, FORMAT, checksum  # noqa: E402

TXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
           moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)  # fmt: skip
ROUTERS = ["model.layers.0.mlp.gate.modality_bias", "model.layers.1.mlp.gate.modality_bias"]


def _moe():
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**TXT)).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """``moe``: the MoE folder with its bias; ``dense``: a tiny dense Qwen3 folder."""
    root = tmp_path_factory.mktemp("base")
    model = _moe()
    model.save_pretrained(root / "moe")
    reg = smar.attach(model, smar.SMARConfig())
    with torch.no_grad():
        for b in reg.bias_parameters():
            b.copy_(torch.randn(b.shape))
    smar.hf.save_bias(reg, root / "moe")
    reg.detach()
    dense = {k: v for k, v in TXT.items() if k not in ("moe_intermediate_size", "num_experts",
                                                        "num_experts_per_tok")}  # fmt: skip
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**dense)).save_pretrained(root / "dense")
    return root


# --- builders: each makes tmp_path/"m" from the base and returns the call to make ---------------


def _copy(base, tmp, name="moe"):
    shutil.copytree(base / name, tmp / "m")
    return tmp / "m"


def _bias(tensors=None, meta=None, drop=(), raw=None):
    """A folder whose bias file holds ``tensors`` with ``meta`` (the saved ones by default,
    without the keys in ``drop``), or the bytes ``raw(saved bytes)``; the call loads it into a
    fresh model."""

    def build(base, tmp):
        d = _copy(base, tmp)
        file = d / BIAS_FILE
        if raw is not None:
            file.write_bytes(raw(file.read_bytes()))
        else:
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                saved, old = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            new = old if tensors is None else tensors
            saved["checksum"] = checksum(new)  # as saved: the tensors are what was written
            m = {k: v for k, v in {**saved, **(meta or {})}.items() if k not in drop}
            save_file(new, str(file), metadata=m)
        return lambda: smar.hf.load_bias(_moe(), d)

    return build


def _nan_bias(d, base=None):
    """What a diverged training saves: NaN in the bias, with a valid checksum."""
    reg = smar.attach(_moe(), smar.SMARConfig())
    with torch.no_grad():
        reg.bias_parameters()[0][1, 2] = float("nan")
    smar.hf.save_bias(reg, d)
    reg.detach()


def _bias_nan(base, tmp):
    d = _copy(base, tmp)
    _nan_bias(d)
    return lambda: smar.hf.load_bias(_moe(), d)


def _huge_last_float(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<f", 3.4e38)  # 4 garbled data bytes: a finite, huge bias


def _config(**changes):
    """A folder whose config.json has ``changes`` (None removes the key); the call inspects it
    (``weights=True``: loads it)."""
    weights = changes.pop("weights", False)

    def build(base, tmp):
        d = _copy(base, tmp)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        cfg = {k: v for k, v in cfg.items() if v is not None}
        (d / "config.json").write_text(json.dumps(cfg))
        if weights:
            return lambda: load_model_folder(d)
        return lambda: smar.hf.inspect_model_dir(str(d))

    return build


def _folder(edit, name="moe", **kw):
    """The folder after ``edit(folder, base)``, loaded by ``load_model_folder(**kw)``."""

    def build(base, tmp):
        d = _copy(base, tmp, name)
        edit(d, base)
        return lambda: load_model_folder(d, **kw)

    return build


def _rm(*names):
    return lambda d, base: [(d / n).unlink() for n in names]


def _truncate(d, base):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garble_header(d, base):
    data = bytearray((d / "model.safetensors").read_bytes())
    data[10:40] = b"\xff" * 30
    (d / "model.safetensors").write_bytes(bytes(data))


def _inf_weight(d, base):
    from safetensors.torch import load_file

    state = load_file(str(d / "model.safetensors"))
    state["model.norm.weight"][3] = float("inf")
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def _pickled(d, base):
    from safetensors.torch import load_file

    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def _missing_shard(d, base):
    shard = "model-00002-of-00002.safetensors"
    index = {"metadata": {}, "weight_map": {"model.norm.weight": shard}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "model.safetensors").unlink()


def _pickled_adapter(d, base):
    (d / "config.json").unlink()
    config = {"base_model_name_or_path": str(base / "moe"), "peft_type": "LORA"}
    (d / "adapter_config.json").write_text(json.dumps(config))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")


def _copy_bias(d, base):
    shutil.copy(base / "moe" / BIAS_FILE, d)


def _nothing(d, base):
    pass


FIX_BIAS = r"fix: save it again with smar\.hf\.save_bias"
FIX_UPCYCLE = r"fix: upcycle the dense model again .*or remove smar_upcycle"
UNREADABLE = r"not a readable safetensors file .*"
UPCYCLE = dict(num_experts=4, top_k=2, layers=[0])
# (id, builder, exception, regex on the message, which must also name tmp_path's folder)
CASES = [
    # 1. a bias that is not finite, or garbled
    ("bias_nan", _bias_nan, UsageError, r"holds NaN or inf .*fix: load an earlier"),
    ("bias_inf_old_file_without_checksum",
     _bias({k: torch.full((2, 4), float("inf")) for k in ROUTERS}, drop=("checksum",)),
     UsageError, r"holds NaN or inf .*fix:"),
    ("bias_4_garbled_bytes", _bias(raw=_huge_last_float), UsageError,
     r"checksum mismatch.*" + FIX_BIAS),
    # 2. tampered bias files
    ("bias_no_smar_config", _bias(drop=("smar_config",)), UsageError,
     r"no smar_config .*" + FIX_BIAS),
    ("bias_config_not_json", _bias(meta={"smar_config": "{oops"}), UsageError,
     r"not JSON .*" + FIX_BIAS),
    ("bias_config_json_list", _bias(meta={"smar_config": "[1, 2]"}), UsageError,
     r"JSON object .*got list.*" + FIX_BIAS),
    ("bias_config_unknown_key", _bias(meta={"smar_config": '{"foo": 1}'}), UsageError,
     r"unknown options \['foo'\].*" + FIX_BIAS),
    ("bias_config_bad_value", _bias(meta={"smar_config": '{"hinge": "cubic"}'}), UsageError,
     r"smar_config is invalid \(hinge.*" + FIX_BIAS),
    ("bias_config_without_bias", _bias(meta={"smar_config": '{"modality_bias": false}'}),
     UsageError, r"modality_bias=false.*" + FIX_BIAS),
    ("bias_not_smar_format", _bias(meta={"format": "pt"}), UsageError,
     r"not a smar bias file .*" + FIX_BIAS),
    ("bias_truncated", _bias(raw=lambda b: b[: len(b) // 2]), UsageError, UNREADABLE + FIX_BIAS),
    ("bias_empty", _bias(raw=lambda b: b""), UsageError, UNREADABLE + FIX_BIAS),
    ("bias_text_file", _bias(raw=lambda b: b"some notes\n"), UsageError, UNREADABLE + FIX_BIAS),
    ("bias_no_tensor", _bias({}), UsageError, r"holds no bias tensor.*" + FIX_BIAS),
    ("bias_other_names", _bias({"weight": torch.zeros(2, 4)}), UsageError,
     r"not named '<router>\.modality_bias'.*" + FIX_BIAS),
    ("bias_other_routers", _bias({"model.layers.7.mlp.gate.modality_bias": torch.zeros(2, 4)}),
     UsageError, r"missing \[.*layers\.0.*unexpected .*layers\.7.*fix: load it into the model"),
    ("bias_wrong_shape", _bias({k: torch.zeros(3, 4) for k in ROUTERS}), UsageError,
     r"saved bias \(3, 4\).*fix: load it into the model it was trained with"),
    ("bias_nan_through_the_loader", _folder(_nan_bias), UsageError,
     r"smar_bias\.safetensors holds NaN or inf .*--no-bias"),
    # 3. config.json: a bad smar_upcycle, an unknown model type
    ("upcycle_unknown_key", _config(smar_upcycle={"foo": 1}), UsageError,
     r"config\.json smar_upcycle: missing \['num_experts'.*unknown \['foo'\].*" + FIX_UPCYCLE),
    ("upcycle_string", _config(smar_upcycle="yes"), UsageError,
     r"smar_upcycle must be a dict.*got 'yes'.*" + FIX_UPCYCLE),
    ("upcycle_top_k_above_experts", _config(smar_upcycle={**UPCYCLE, "num_experts": 2, "top_k": 3}),
     UsageError, r"top_k must be an integer from 1 to num_experts=2; got 3.*" + FIX_UPCYCLE),
    ("upcycle_bad_layers", _config(smar_upcycle={**UPCYCLE, "layers": "odd"}), UsageError,
     r"layers must be.*" + FIX_UPCYCLE),
    ("upcycle_of_a_moe_model", _config(smar_upcycle=UPCYCLE), UsageError,
     r"config\.json smar_upcycle: .*upcycle.*" + FIX_UPCYCLE),
    ("upcycle_of_a_moe_model_loaded", _config(smar_upcycle=UPCYCLE, weights=True), UsageError,
     r"config\.json smar_upcycle: .*upcycle.*" + FIX_UPCYCLE),
    ("config_unknown_model_type", _config(model_type="no_such_model"), UsageError,
     r"config\.json: .*fix: save the model with save_pretrained"),
    # 4. model folders
    ("dense_model_routers_required", _folder(_nothing, "dense", routers=True), UsageError,
     r"no MoE router smar knows in Qwen3ForCausalLM.*fix: upcycle it"),
    ("dense_model_with_a_bias_file", _folder(_copy_bias, "dense"), UsageError,
     r"smar_bias\.safetensors: no router found in Qwen3ForCausalLM.*upcycle_hf"),
    ("no_config", _folder(_rm("config.json")), MissingFile,
     r"has no config\.json; fix: pass a folder written by save_pretrained"),
    ("config_without_weights", _folder(_rm("model.safetensors")), MissingFile,
     r"has no weights \(model\.safetensors\); fix: write them with save_pretrained"),
    ("weights_truncated", _folder(_truncate), UsageError,
     r"model\.safetensors is " + UNREADABLE + r"truncated or corrupted\); fix: copy it again"),
    ("weights_garbled_header", _folder(_garble_header), UsageError,
     r"model\.safetensors is " + UNREADABLE + "fix: copy it again"),
    ("weights_inf", _folder(_inf_weight), UsageError,
     r"weight model\.norm\.weight holds NaN or inf .*fix: copy the weights again"),
    ("weights_missing_shard", _folder(_missing_shard), MissingFile,
     r"names shards that are not there: \['model-00002.*fix: copy every shard"),
    ("weights_pickled", _folder(_pickled), UsageError,
     r"pickles \(pytorch_model\.bin\), which smar never loads.*fix: .*save with safetensors"),
    ("adapter_pickled", _folder(_pickled_adapter), UsageError,
     r"pickles \(adapter_model\.bin\).*fix: .*save with safetensors"),
    ("no_tokenizer", _folder(_nothing, tokenizer=True), MissingFile,
     r"has no tokenizer .*fix: save it into the folder"),
]  # fmt: skip


@pytest.mark.parametrize("name,build,error,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_file_is_one_line_naming_it_and_the_fix(base, tmp_path, name, build, error, pattern):
    call = build(base, tmp_path)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert type(info.value) is error, repr(info.value)  # the documented kind, not a subclass
    assert str(tmp_path / "m") in message, message
    assert "\n" not in message and re.search(pattern, message), message


# A config.json whose "architectures" names no class for its model type: the model type decides.
ARCHITECTURES = [None, ["pipeline"], ["Trainer"], ["LlamaForCausalLM"], "Qwen3MoeForCausalLM",
                 ["NoSuchModel", "Qwen3MoeForCausalLM"]]  # fmt: skip


@pytest.mark.parametrize("names", ARCHITECTURES, ids=str)
def test_architectures_that_mislead_load_the_class_of_the_model_type(base, tmp_path, names):
    _config(architectures=names)(base, tmp_path)
    table = smar.hf.inspect_model_dir(str(tmp_path / "m"))
    assert table.startswith("Qwen3MoeForCausalLM") and "2 routers" in table, table
    loaded = load_model_folder(tmp_path / "m")
    assert type(loaded.model).__name__ == "Qwen3MoeForCausalLM"
    assert "modality bias loaded" in loaded.note  # the saved weights and bias, not random ones
    saved = _moe().model.embed_tokens.weight
    assert torch.equal(loaded.model.model.embed_tokens.weight, saved)


def test_bias_file_round_trips_with_its_checksum_and_old_files_still_load(base, tmp_path):
    d = _copy(base, tmp_path)
    reg = smar.hf.load_bias(_moe(), d)
    bias = {k: v.detach().clone() for k, v in reg.bias_state_dict().items()}
    reg.detach()
    _bias(drop=("checksum",))(base, tmp_path / "old")  # a file from before the checksum
    old = smar.hf.load_bias(_moe(), tmp_path / "old" / "m")
    for k, v in old.bias_state_dict().items():
        assert torch.equal(v, bias[k])
    from safetensors import safe_open

    with safe_open(str(d / BIAS_FILE), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == FORMAT and meta["checksum"] == checksum(tensors)
