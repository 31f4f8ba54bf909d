"""Every MoE family of the installed transformers (enumerated from the library: tests/helpers/families.py),
as a tiny random model: smar finds the routers the model declares, captures exactly the logits the
model records itself, a zero bias changes no output bit, a large bias moves image tokens to the
expert it favours, and gradients reach router and bias.

Each family is built from its default config, shrunk, and where that alone does not run, its
recipe (``tests/helpers/families.py``: ``RECIPES``). Its status there says what must pass: full, capture
only (the bias is refused with a reason) or not supported (skipped with the reason); a family a
newer transformers adds skips as "not yet checked", and a known family that stops building fails.
The family table of docs/huggingface.md is written from this file's run by
``scripts/family_table.py``. The sweep builds about 70 models and runs in the default suite:
``python -m pytest -rs tests/test_families.py``.
"""

from __future__ import annotations

import pathlib
import re
import sys
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
import families  # noqa: E402
from router_scores import ACTIVATIONS, assert_router_reads  # noqa: E402

import smar  # noqa: E402
from smar.adapters import find_routers  # noqa: E402
from smar.bias import ModalityBiasRouter  # noqa: E402
from smar.upstream import upstream_defect  # noqa: E402

FAMILIES = families.families()
ALL = ("mlp", "attention")
# Families whose router records softmax probabilities as its router_logits output (read by smar
# from the router's linear layer): a family added here or missing is a test failure.
PROBABILITY_RECORDERS = {"gemma4", "diffusion_gemma"}
_BUILT: dict = {}


def tiny(family: str, bias: bool = False):
    """The family's tiny model and inputs; a skip for a family that is not supported, capture
    only (with ``bias``), not yet checked, or broken by a known transformers defect; a failure
    for a known family whose tiny model no longer builds or runs."""
    status = families.status(family)
    if status == "not yet checked":
        pytest.skip(f"{family}: not yet checked: new in transformers {transformers.__version__}; "
                    "give it a recipe and a status in tests/helpers/families.py")  # fmt: skip
    if status == "not supported":
        pytest.skip(f"{family}: not supported: {families.NOT_SUPPORTED[family]}")
    if bias and status == "capture only":
        pytest.skip(f"{family}: capture only: {families.CAPTURE_ONLY[family]}")
    if family not in _BUILT:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = families.build(family)
                defect = upstream_defect(model)
                if defect:
                    _BUILT[family] = (None, None, f"upstream defect: {defect}")
                    pytest.skip(_BUILT[family][2])
                batch = families.inputs(model)
                with torch.no_grad():
                    model(**batch)
            if not own_router_logits(model, batch):
                raise ValueError("the tiny model has no MoE layer")
            _BUILT[family] = (model, batch, None)
        except pytest.skip.Exception:
            raise
        except Exception as e:
            _BUILT[family] = (None, None, f"{type(e).__name__}: {str(e)[:300]}")
    model, batch, why = _BUILT[family]
    if why and why.startswith("upstream defect"):
        pytest.skip(why)
    if why:
        pytest.fail(f"{family} ({status}) no longer builds or runs as a tiny model: {why}; see "
                    "its recipe in tests/helpers/families.py", pytrace=False)  # fmt: skip
    return model, batch


def image_ids(batch: dict) -> torch.Tensor:
    """Modality ids ``(B, S)``: tokens 2..5 of each sample are image tokens."""
    ids = torch.zeros_like(batch["input_ids"])
    ids[:, 2:6] = 1
    return ids


def own_router_logits(model, batch) -> list[torch.Tensor]:
    """What the model records itself with ``output_router_logits=True``, each tensor once
    (JetMoE records its attention routers' logits twice: from the gating and from the block).
    A multimodal wrapper that drops its language model's router logits (Nemotron-H Omni) is
    answered by its language model, which runs the same computation on text inputs."""
    out = model(**batch, output_router_logits=True)
    if getattr(out, "router_logits", None) is None and hasattr(model, "language_model"):
        out = model.language_model(**batch, output_router_logits=True)
    found = []
    for key in ("encoder_router_logits", "router_logits", "decoder_router_logits"):
        value = getattr(out, key, None)
        if value is None:
            continue
        for z in value:
            z = z[1] if isinstance(z, tuple) else z  # Switch/NLLB: (logits, expert index)
            if isinstance(z, torch.Tensor) and not any(z is seen for seen in found):
                found.append(z)
    return found


@pytest.fixture(autouse=True)
def _detach_all():
    yield
    for model, _, _ in _BUILT.values():
        reg = getattr(model, "_smar_regularizer", None) if model is not None else None
        if reg is not None and reg() is not None:
            reg().detach()


def test_families_are_enumerated_from_the_library():
    assert len(FAMILIES) >= 60
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "jetmoe", "gpt_oss"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_routers_found_and_captured_as_the_model_records_them(family):
    model, batch = tiny(family)
    with torch.no_grad():
        own = own_router_logits(model, batch)
        sites = find_routers(model, kinds=ALL)
        assert len(sites) == len(own) > 0
        with smar.record(model, kinds=ALL) as rec:
            model(**batch)
            mine = rec.logits()
    assert len(mine) == len(own)
    # Routers that record probabilities (Gemma 4) are read as the logits they soft-max: what the
    # model records is then their softmax, never smar's logits themselves (a second softmax
    # would flatten the routing).
    probs = {s.adapter.from_linear for s in sites} == {True}
    assert probs == (family in PROBABILITY_RECORDERS), family
    # Each recorded tensor is one captured tensor (JetMoE's module order puts the MLP router
    # before the attention router that runs first).
    unmatched = list(mine)
    for theirs in own:
        theirs = theirs.reshape(unmatched[0].shape)
        if probs:
            hit = next(i for i, a in enumerate(unmatched)
                       if torch.allclose(torch.softmax(a.float(), -1), theirs.float(), atol=1e-6))  # fmt: skip
            assert not torch.allclose(unmatched[hit].sum(-1), torch.ones(theirs.shape[0]))
        else:
            hit = next(i for i, a in enumerate(unmatched) if torch.equal(a, theirs))
        unmatched.pop(hit)


class _Activations(TorchFunctionMode):
    """Records which expert-scoring activations run on ``(T, E)`` routing tensors."""

    _NAMES = ACTIVATIONS

    def __init__(self, tokens: int, experts: int):
        super().__init__()
        self.tokens, self.experts = tokens, experts
        self.seen, self.seen_top = set(), set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if func in self._NAMES and isinstance(x, torch.Tensor) and x.dim() >= 2:
            rows, width = x.numel() // x.shape[-1], x.shape[-1]
            if rows == self.tokens and width >= self.experts:  # all experts (and shared ones)
                self.seen.add(self._NAMES[func])
            elif rows == self.tokens and width > 1:  # the top-k chosen
                self.seen_top.add(self._NAMES[func])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_gating_read_as_the_router_scores_its_experts(family):
    """The activation smar scores experts with is the one the MoE block applies to the router's
    logits (a sigmoid through an activation module read as a softmax was MuseSpark's defect,
    DeepSeek-V4's sqrt(softplus) another)."""
    model, batch = tiny(family)
    sites = [s for s in find_routers(model, kinds=ALL) if s.num_experts]
    T = batch["input_ids"].numel()
    for site in sites:
        block = site.parent if site.parent is not None else site.module
        mode = _Activations(T, site.num_experts)

        def enter(*_, m=mode):
            m.__enter__()  # a hook that returns something would replace the inputs or outputs

        def leave(*_, m=mode):
            m.__exit__(None, None, None)

        handles = [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            for h in handles:
                h.remove()
        # an activation on all E scores of each token is the gating; else the one on the top-k
        # chosen (Mixtral: a softmax over the top-k logits; Kolibri: a sigmoid)
        seen = mode.seen or mode.seen_top or {"softmax"}
        assert site.adapter.router in seen, (site.name, mode.seen, mode.seen_top)


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_logits_are_the_routers_own_pre_activation_scores(family):
    """What smar reads from each router is what the router's own activation receives (the input
    of its softmax, sigmoid or softplus over all experts; else its linear layer's output), and is
    scored with that activation. Before smar.gating (commit dcfca77) five families failed this:
    Gemma 4 and diffusion_gemma (probabilities read as logits: rows summing to 1, a second
    softmax), MuseSpark and inkling2 (a sigmoid through ACT2FN read as a softmax), DeepSeek-V4
    (sqrt(softplus) read as a softmax); inkling2_loop, not supported, had inkling2's."""
    model, batch = tiny(family)
    sites = find_routers(model, kinds=ALL)
    with torch.no_grad(), smar.record(model, kinds=ALL) as rec:
        model(**batch)
        mine = rec.logits()
    assert_router_reads(model, sites, batch, mine)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_bias_is_bit_identical_and_a_large_bias_routes_image_tokens(family):
    model, batch = tiny(family, bias=True)
    with torch.no_grad():
        before = model(**batch)[0]
        reg = smar.attach(model, smar.SMARConfig(routers="all"))
        reg.set_modality(image_ids(batch))
        assert torch.equal(model(**batch)[0], before)
        unbiased = [z.clone() for z in reg.logits()]
        assert len(reg.bias_parameters()) == len(reg.sites)
        favoured = 3
        for b in reg.bias_parameters():
            b[1, favoured] = 100.0
        chosen = experts_chosen(model, reg, batch)
        biased = reg.logits()
    image = image_ids(batch).reshape(-1).bool()  # (T,)
    for experts in chosen:
        assert (experts[image] == favoured).any(dim=-1).all()
    # Text tokens get no bias: the first router to run sees their logits unchanged (later ones
    # see hidden states that attention mixed with the re-routed image tokens).
    assert any(torch.equal(a[~image], b[~image]) for a, b in zip(unbiased, biased, strict=True))
    reg.detach()
    assert not any(isinstance(m, ModalityBiasRouter) for m in model.modules())


def experts_chosen(model, reg, batch) -> list[torch.Tensor]:
    """The experts each router chose per token ``(T, K)``: the router's own index output where
    it returns one, else the top-k of its logits (which its MoE block takes)."""
    outputs = []
    handles = [
        w.register_forward_hook(lambda m, a, o: outputs.append(o))
        for w in model.modules()
        if isinstance(w, ModalityBiasRouter)
    ]
    model(**batch)
    for h in handles:
        h.remove()
    chosen = []
    for site, out, z in zip(reg.sites, outputs, reg.logits(), strict=True):
        outs = out if isinstance(out, tuple) else (out,)
        index = [t.reshape(z.shape[0], -1) for t in outs if isinstance(t, torch.Tensor)
                 and not t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == site.top_k
                 and t.numel() == z.shape[0] * site.top_k]  # fmt: skip
        experts = index[0] if index else torch.topk(z, site.top_k, dim=-1).indices  # (T, K)
        chosen.append(experts.sort(dim=-1).values)
    return chosen


@pytest.mark.parametrize("family", sorted(set(families.CAPTURE_ONLY) & set(FAMILIES)))
def test_capture_only_families_refuse_the_bias_with_a_reason(family):
    model, batch = tiny(family)
    with pytest.raises(ValueError, match=r"modality_bias=False") as refused:
        smar.attach(model)
    assert type(refused.value) is smar.UsageError and len(str(refused.value)) > 60  # reason, fix
    smar.attach(model, smar.SMARConfig(modality_bias=False)).detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_router_and_bias(family):
    model, batch = tiny(family, bias=True)
    reg = smar.attach(model, smar.SMARConfig(routers="all"))
    reg.set_modality(image_ids(batch))
    model.zero_grad()
    model(**batch)
    reg.loss().backward()
    for site, bias in zip(reg.sites, reg.bias_parameters(), strict=True):
        weight = smar.bias.logit_weight(site.module)
        assert weight.grad is not None and weight.grad.abs().sum() > 0, site.name
        assert bias.grad is not None and bias.grad.abs().sum() > 0, site.name
    reg.detach()
    model.zero_grad()


def test_docs_family_table_agrees_with_the_declared_statuses():
    """docs/huggingface.md's table (written from a run by scripts/family_table.py) says of each
    family what tests/helpers/families.py declares, so neither can change without the other."""
    text = (pathlib.Path(__file__).parents[1] / "docs" / "huggingface.md").read_text()
    block = text.split("<!-- families:begin -->")[1].split("<!-- families:end -->")[0]
    said, status = {}, None
    for row in re.findall(r"^\| ([^|]*) \| ([^|]*) \|", block, re.M):
        label, members = row
        if label.strip() and label.strip() != "status" and not label.startswith("---"):
            status = label.split(",")[0].strip()
        for family in re.findall(r"[a-z0-9_]+", members):
            said[family] = status
    assert len(said) >= 60
    for family in set(said) & set(FAMILIES):
        assert said[family] == families.status(family), family
    release = re.search(r"on transformers (\S+):", block).group(1)
    if release == transformers.__version__:  # the table lists every family of its release
        assert {f for f in FAMILIES if families.status(f) != "not yet checked"} <= set(said)
