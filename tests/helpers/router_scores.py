"""A router's own scoring, recorded apart from smar's capture: the reference that
tests/test_families.py and tests/test_families_multimodal.py compare smar's router reading with.

smar reads each router's output as raw logits ``(T, E)`` scored by a softmax, a sigmoid or a
sqrt(softplus) (smar.gating). A router that records probabilities (Gemma 4) read as logits would
be soft-maxed twice, and a sigmoid read as a softmax (MuseSpark's ``ACT2FN["sigmoid"]``) misreads
every score: both show here, against the input of the activation the router's MoE block runs.

Shapes legend: T tokens, E experts (E' the outputs of the router's linear layer), D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the functions that score a router's experts, by the name smar.gating gives the activation
ACTIVATIONS = {torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
               torch.softmax: "softmax", torch.Tensor.softmax: "softmax", F.softmax: "softmax",
               F.softplus: "sqrtsoftplus"}  # fmt: skip


class _Scores(torch.overrides.TorchFunctionMode):
    """Records, while active, the first expert-scoring activation (softmax, sigmoid, softplus)
    applied to all ``E`` scores of each of ``T`` tokens (its name, and its input where finite:
    Llama 4 and PhiMoE mask all but the top-k with -inf first), and the output of the first
    ``F.linear`` with the router's ``(E', D)`` logit weight, if it has one."""

    NAMES = ACTIVATIONS

    def __init__(self, tokens: int, experts: int, weight: torch.Tensor | None):
        super().__init__()
        self.tokens, self.experts, self.weight = tokens, experts, weight
        self.activation: str | None = None
        self.scores: torch.Tensor | None = None  # (T, E)
        self.linear: torch.Tensor | None = None  # (T, E')
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        x = args[0] if args else None
        T, E, w = self.tokens, self.experts, self.weight
        if (self.activation is None and func in self.NAMES and isinstance(x, torch.Tensor)
                and x.dim() >= 2 and x.shape[-1] == E and x.numel() == T * E):  # fmt: skip
            self.activation = self.NAMES[func]
            x = x.detach().reshape(T, E)
            self.scores = x.clone() if x.isfinite().all() else None
        if (self.linear is None and w is not None and func in (F.linear, torch._C._nn.linear)
                and len(args) > 1 and isinstance(args[1], torch.Tensor)
                and args[1].shape == w.shape and torch.equal(args[1], w.to(args[1]))):  # fmt: skip
            self.linear = out.detach().reshape(-1, w.shape[0]).clone()
        return out


def router_scores(
    model: torch.nn.Module, sites: list, batch: dict, tokens: int, widths: list[int]
) -> list[tuple]:
    """Each router's own scoring in one forward of ``model`` on ``batch``, recorded apart from
    smar's capture: ``(activation, scores)``, the name of the first expert-scoring activation
    that its MoE block (or the router itself) applies to all experts of each token, and that
    activation's input ``(T, E)``; where there is none or it saw masked scores, the output of the
    router's linear layer ``(T, E')`` (Mixtral soft-maxes the top-k only; E' > E where the layer
    also scores shared experts: Inkling). ``sites`` are :class:`smar.adapters.RouterSite`;
    ``tokens`` is ``T``; ``widths`` the ``E`` of each router's scores (Zaya's router scores a
    skip expert beside its experts)."""
    from smar.bias import logit_weight

    modes, handles = [], []
    for site, width in zip(sites, widths, strict=True):
        try:
            weight = logit_weight(site.module)
        except ValueError:  # several linear layers (Zaya's MLP router, Ernie-4.5-VL's two)
            weight = None
        mode = _Scores(tokens, width, weight)
        modes.append(mode)

        def enter(*_, m=mode):
            m.depth += 1
            if m.depth == 1:  # the router runs inside its block, or alone (JetMoE's attention)
                m.__enter__()

        def leave(*_, m=mode):
            m.depth -= 1
            if m.depth == 0:
                m.__exit__(None, None, None)

        for module in {id(m): m for m in (site.parent, site.module) if m is not None}.values():
            handles += [module.register_forward_pre_hook(enter),
                        module.register_forward_hook(leave, always_call=True)]  # fmt: skip
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return [(m.activation, m.scores if m.scores is not None else m.linear) for m in modes]


def assert_router_reads(model, sites, batch, mine: list[torch.Tensor],
                        tokens: int | None = None) -> None:  # fmt: skip
    """smar's reading of each router (``mine``, one ``(T, E)`` per site) equals the router's own
    pre-activation scores (:func:`router_scores`), and the activation smar applies is the one
    the router's MoE block runs; ``tokens``: the sequence's (default: ``input_ids``'). Where the
    linear layer also scores shared experts (Inkling), the routed ones come first."""
    tokens = batch["input_ids"].numel() if tokens is None else tokens
    theirs = router_scores(model, sites, batch, tokens, [z.shape[-1] for z in mine])
    assert len(mine) == len(theirs) == len(sites) > 0
    for site, z, (activation, scores) in zip(sites, mine, theirs, strict=True):
        assert z.shape[0] == tokens, site.name  # one row per token of the sequence
        assert scores is not None, f"{site.name}: no activation over its experts, no linear layer"
        if activation is not None:
            assert site.adapter.router == activation, site.name
        torch.testing.assert_close(z.float(), scores[:, : z.shape[-1]].float(), rtol=1e-5,
                                   atol=1e-6, msg=lambda m, n=site.name: f"{n}: {m}")  # fmt: skip
