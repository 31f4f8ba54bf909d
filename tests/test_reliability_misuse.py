"""The library misused: `attach`, `SMARConfig`, `SMARTrainer` and `adapter=` given the wrong thing.
Each is one line (a `smar.UsageError`; a wrong type is also a `TypeError`), names the fix, and
leaves the model as it was: no hook, no wrapper, the same weights."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import smar  # noqa: E402
import smar.hf  # noqa: E402
from smar.errors import WrongType  # noqa: E402
from smar.modality import modality_ids  # noqa: E402


def _moe(**over):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
               num_experts_per_tok=2, head_dim=16)  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**cfg, **over}))


def _dense():
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16)  # fmt: skip
    return transformers.Qwen3ForCausalLM(cfg)


def _unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any("Bias" in type(m).__name__ for m in model.modules())
    assert getattr(model, "_smar_regularizer", None) is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _refused(call, model, error, pattern):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=pattern) as e:
        call()
    assert "\n" not in str(e.value) and "fix:" in str(e.value), str(e.value)
    _unchanged(model, before)


@pytest.mark.parametrize(
    "config, pattern",
    [
        ({"smar_weight": 1.0}, r"got a dict, not a SMARConfig; fix: pass smar\.SMARConfig"),
        (smar.SMARConfig, r"got the class SMARConfig, not a config; fix: pass an instance"),
        ("band", r"must be a smar\.SMARConfig; got a str"),
    ],
    ids=["dict", "class", "str"],
)
def test_attach_with_something_else_than_a_config(config, pattern):
    model = _moe()
    _refused(lambda: smar.attach(model, config), model, WrongType, pattern)
    with pytest.raises(TypeError):  # still the TypeError it was
        smar.attach(model, config)


def test_smar_trainer_with_a_string_config(tmp_path):
    model = _moe()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    _refused(lambda: smar.hf.SMARTrainer(model=model, args=args, smar_config="band"), model,
             WrongType, r"SMARTrainer\(smar_config=\.\.\.\): the config must be a smar\.SMARConfig")  # fmt: skip


@pytest.mark.parametrize("adapter", ["foo", ["foo"], 3], ids=["str", "list_of_str", "int"])
def test_adapter_that_is_not_an_adapter(adapter):
    model = _moe()
    _refused(lambda: smar.attach(model, adapter=adapter), model, WrongType,
             r"adapter= takes smar\.adapters\.Adapter objects.*fix: build one")  # fmt: skip


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = _moe()
    with pytest.raises(smar.UsageError, match=r"is on the meta device .*fix: load or materialise"):
        smar.attach(model)
    assert not any("Bias" in type(m).__name__ for m in model.modules())


def test_top_k_above_the_experts_is_refused_before_the_forward_crashes():
    model = _moe()
    for layer in model.model.layers:
        layer.mlp.gate.top_k = 6  # as num_experts_per_tok=6 over 4 experts builds it
    _refused(lambda: smar.attach(model), model, smar.UsageError,
             r"model\.layers\.0\.mlp\.gate chooses top_k=6 of its 4 experts.*fix: set it to at "
             r"most 4")  # fmt: skip


def test_no_router_is_a_usage_error_with_the_right_routers_fix():
    model = _moe()
    _refused(lambda: smar.attach(model, smar.SMARConfig(routers="attention")), model,
             smar.UsageError, r"has mlp routers only, not the attention routers asked for; fix: "
             r"pass SMARConfig\(routers='mlp'\)")  # fmt: skip
    dense = _dense()
    _refused(lambda: smar.attach(dense), dense, smar.UsageError,
             r"no router found in Qwen3ForCausalLM.*smar\.hf\.upcycle_hf")  # fmt: skip


@pytest.mark.parametrize(
    "options, error, pattern",
    [
        (dict(smar_weight="1"), WrongType, r"smar_weight must be a number >= 0; got '1'"),
        (dict(lb_weight=None), WrongType, r"lb_weight must be a number >= 0; got None"),
        (dict(z_weight=True), WrongType, r"z_weight must be a number >= 0; got True"),
        (dict(modality_bias=1), WrongType, r"modality_bias must be True or False; got 1"),
        (dict(groups=5), WrongType, r"groups must be a name of"),
        (dict(band="1.5,2"), smar.UsageError, r"band must be a \(low, high\) pair"),
        (dict(band=(1.5,)), smar.UsageError, r"band must be a \(low, high\) pair"),
        (dict(band=None), smar.UsageError, r"band must be a \(low, high\) pair"),  # crashed
        (dict(band=5), smar.UsageError, r"band must be a \(low, high\) pair"),  # crashed
        (dict(band=(1, "2")), smar.UsageError, r"band must be a \(low, high\) pair"),  # accepted
        (dict(band=[]), smar.UsageError, r"band must be a \(low, high\) pair"),  # accepted
        (dict(routers=None), smar.UsageError, r"routers must be 'mlp' or 'attention' or 'all'"),
        (dict(text="0"), smar.UsageError, r"text and image must be integer modality ids"),
        (dict(num_modalities=None), smar.UsageError, r"num_modalities must be an integer >= 2"),
        (dict(hinge=None), smar.UsageError, r"hinge must be 'linear' or 'squared'"),
        (dict(accumulate="yes"), smar.UsageError, r"accumulate must be True or False"),
    ],
)
def test_smar_config_fields_of_the_wrong_type_are_one_line(options, error, pattern):
    with pytest.raises(error, match=pattern) as e:
        smar.SMARConfig(**options)
    assert "\n" not in str(e.value) and "; fix: " in str(e.value)


def test_reentrant_checkpointing_in_your_own_loop_is_warned_at_attach_and_at_the_loss():
    model = _moe().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.warns(UserWarning, match="not connected to the graph.*use_reentrant': False"):
        reg = smar.attach(model)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids)
    with pytest.warns(UserWarning, match="not connected to the graph"):
        loss = reg.loss()
    assert not loss.requires_grad  # what the warning is about
    reg.detach()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = smar.attach(model)
        model(input_ids=ids, labels=ids)
        assert reg.loss().requires_grad  # non-reentrant: connected, and no warning


def test_a_config_with_every_weight_zero_is_not_warned_about():
    """Monitoring only (every loss weight 0): a loss of 0 without a graph is what was asked."""
    model = _moe().train()
    reg = smar.attach(model, smar.SMARConfig(smar_weight=0.0, lb_weight=0.0))
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(reg.loss()) == 0.0


# ---------------------------------------------- upcycling: top_k above the experts, wrong types
@pytest.mark.parametrize(
    "options, error, pattern",
    [
        (dict(num_experts=2, top_k=4), smar.UsageError,
         r"top_k=4 must be <= num_experts=2.*; fix: top_k=2 or num_experts>=4"),
        (dict(num_experts="2", top_k=1), WrongType, r"num_experts='2' must be an integer >= 1"),
        (dict(num_experts=2, top_k=0), smar.UsageError, r"top_k=0 must be an integer >= 1"),
        (dict(num_experts=2, top_k=1, noise=None), WrongType, r"noise=None must be a finite"),
        (dict(num_experts=2, top_k=1, noise="x"), WrongType, r"noise='x' must be a finite"),
    ],
    ids=["top_k_above", "str_experts", "top_k_0", "noise_none", "noise_str"],
)  # fmt: skip
def test_upcycle_options_are_one_line_before_any_change(options, error, pattern):
    from smar.moe import SwiGLU
    from smar.upcycle import upcycle

    torch.manual_seed(0)
    mlp = SwiGLU(8, 16)
    with pytest.raises(error, match=pattern) as e:
        upcycle(mlp, **options)
    assert "\n" not in str(e.value) and "fix:" in str(e.value)
    dense = _dense()
    _refused(lambda: smar.hf.upcycle_hf(dense, **options), dense, error, pattern)
    assert not any("MoE" in type(m).__name__ for m in dense.modules())  # no layer upcycled


# ---------------------------------------------- the image token id of the model's config
@pytest.mark.parametrize("attr", ["image_token_id", "image_token_index"])
@pytest.mark.parametrize("token", [64, 1000])
def test_an_image_token_outside_the_vocabulary_is_refused(attr, token):
    model = _moe()
    setattr(model.config, attr, token)
    _refused(lambda: smar.attach(model), model, smar.UsageError,
             rf"the image token id {token} in Qwen3MoeForCausalLM's config is outside its "
             r"vocabulary \(64 embeddings\).*; fix: set it to the id of the placeholder token "
             r"your data holds \(< 64\)")  # fmt: skip


@pytest.mark.parametrize("token", ["5", 3.5, True])
def test_an_image_token_that_is_not_an_integer_is_refused(token):
    model = _moe()
    model.config.image_token_id = token
    _refused(lambda: smar.attach(model), model, smar.UsageError,
             rf"config's image_token_id={token!r} is not a token id.*fix: set "
             r"config\.image_token_id to the placeholder's id")  # fmt: skip


def test_an_image_token_in_the_vocabulary_still_attaches_and_eos_is_warned_about():
    model = _moe(eos_token_id=1)
    model.config.image_token_id = 10  # an ordinary id of the vocabulary: the tests' own setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = smar.attach(model)
    ids = torch.tensor([[3, 10, 10, 4]])
    model(input_ids=ids)
    assert reg.modality_ids.tolist() == [0, 1, 1, 0]
    reg.detach()
    model.config.image_token_id = 1  # the eos token: every end of text would count as image
    with pytest.warns(UserWarning, match=r"image token id 1 is also the eos token.*fix: give"):
        smar.attach(model).detach()


@pytest.mark.parametrize(
    "token_ids, error",
    [({1: "5"}, smar.UsageError), ({1: 3.5}, smar.UsageError), ({1: None}, smar.UsageError),
     ({1: [5, "a"]}, smar.UsageError), ({1: -1}, smar.UsageError), ([5], WrongType),
     (5, WrongType)],
)  # fmt: skip
def test_modality_ids_with_token_ids_of_the_wrong_kind(token_ids, error):
    ids = torch.tensor([[3, 5, 5, 4]])
    with pytest.raises(error, match=r"token_ids.*fix: e\.g\. token_ids=\{1: image_token_id\}") as e:
        modality_ids(ids, token_ids=token_ids)
    assert "\n" not in str(e.value)
    # what was valid stays valid: one id, a list, a tensor, JSON keys, -1 (ignore)
    for ok in ({1: 5}, {1: [5]}, {1: torch.tensor([5])}, {"1": 5}):
        assert modality_ids(ids, token_ids=ok).tolist() == [[0, 1, 1, 0]]
    assert modality_ids(ids, token_ids={-1: 5}).tolist() == [[0, -1, -1, 0]]


# ---------------------------------------------- no router: the fix for what the model holds
def test_no_router_in_a_custom_moe_names_its_router_module():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = torch.nn.Linear(8, 4)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    model = torch.nn.Sequential(Block(), Block())
    _refused(lambda: smar.attach(model), model, smar.UsageError,
             r"no router found in Sequential.*0\.router \(Linear\) is named like a router; fix: "
             r"give it a class of its own \(class MyRouter\(nn\.Linear\): pass\) and pass "
             r"adapter=smar\.adapters\.Adapter\(name, classes=\('MyRouter',\), index=None")  # fmt: skip


def test_no_router_with_an_adapter_that_matches_nothing_says_so():
    dense = _dense()
    adapter = smar.adapters.Adapter("mine", classes=("MyRouter",))
    _refused(lambda: smar.attach(dense, adapter=adapter), dense, smar.UsageError,
             r"adapter= given for \['MyRouter'\]\); no module is named like a router: a dense "
             r"model\?; fix: upcycle it with smar\.hf\.upcycle_hf")  # fmt: skip


def test_smar_trainer_refuses_a_wrong_adapter_and_a_meta_model(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    model = _moe()
    _refused(lambda: smar.hf.SMARTrainer(model=model, args=args, smar_adapter="foo"), model,
             WrongType, r"adapter= takes smar\.adapters\.Adapter objects")  # fmt: skip
    with torch.device("meta"):
        meta = _moe()
    with pytest.raises(smar.UsageError, match=r"meta device.*model\.to_empty\(device="):
        smar.hf.SMARTrainer(model=meta, args=args)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in meta.modules())
