"""How a router turns its outputs into expert scores, read from its source code.

transformers declares which module records ``router_logits`` and at which output index, not what
that output is. Most routers record raw logits and score experts with a softmax; some with a
sigmoid (DeepSeek-V3, Llama 4; MuseSpark through an activation module it holds), and some record
the probabilities themselves (Gemma 4's ``router_probabilities``), which a second softmax would
flatten to near-uniform. :func:`gating` and :func:`recorded_activation` tell these apart, so that
:mod:`smar.adapters` reads every family's routing as its canonical logits.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import torch
import torch.nn.functional as F
from torch import nn

from smar.checks import ROUTERS

__all__ = ["gating", "recorded_activation"]


def _held_activation(value: object) -> str | None:
    """The scoring a module attribute computes, when it is an activation (transformers'
    ``ACT2FN[name]`` gives modules: ``nn.Sigmoid``, ``SqrtSoftplusActivation``)."""
    if isinstance(value, nn.Sigmoid) or value in (torch.sigmoid, F.sigmoid):
        return "sigmoid"
    if type(value).__name__ == "SqrtSoftplusActivation":
        return "sqrtsoftplus"
    if isinstance(value, nn.Softmax) or value in (torch.softmax, F.softmax):
        return "softmax"
    return None


def gating(module: nn.Module) -> str:
    """How the router scores experts: ``"sigmoid"`` if its forward applies a sigmoid (DeepSeek-V3,
    Llama 4 style), written out (``torch.sigmoid``, ``.sigmoid()``) or through an activation
    module it holds and calls (MuseSpark: ``self.scoring_function = ACT2FN["sigmoid"]``);
    ``"sqrtsoftplus"`` for DeepSeek-V4's ``ACT2FN["sqrtsoftplus"]``; the value of a string
    attribute it switches on (Cohere2-MoE's ``expert_selection_fn``); else ``"softmax"``."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return "softmax"
    held = {**vars(module), **module._modules}
    for name, value in held.items():
        kind = _held_activation(value)
        if kind is not None and f"self.{name}(" in source:
            return kind
        # a switch read from the config (Cohere2-MoE: self.expert_selection_fn = "softmax")
        if isinstance(value, str) and value in ROUTERS and f"self.{name}" in source:
            return value
    return "sigmoid" if "sigmoid" in source else "softmax"


_ACTIVATIONS = {"softmax": "softmax", "sigmoid": "sigmoid"}
_CASTS = ("to", "type", "float", "double", "contiguous")


def _activation_of(node: ast.AST) -> str | None:
    """``"softmax"`` or ``"sigmoid"`` if the expression is that function's result (casts aside)."""
    while isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        if name in _ACTIVATIONS:
            return _ACTIVATIONS[name]
        if name in _CASTS and isinstance(f, ast.Attribute):
            node = f.value  # x.softmax(-1).to(dtype)
            continue
        return None
    return None


def recorded_activation(cls: type[nn.Module], index: int | None) -> str | None:
    """``"softmax"`` or ``"sigmoid"`` when the router output smar would read (``output[index]``)
    is the result of that activation: the router records probabilities, not logits (Gemma 4's
    ``router_probabilities``). None when it records logits, or when the source cannot tell."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    fn = tree.body[0]
    returns = [n.value for n in ast.walk(fn) if isinstance(n, ast.Return) and n.value is not None]
    if len(returns) != 1:
        return None
    value = returns[0]
    if isinstance(value, ast.Tuple):
        if index is None or index >= len(value.elts):
            return None
        value = value.elts[index]
    if isinstance(value, ast.Name):  # the last assignment to the returned name
        assigned = [n for n in ast.walk(fn) if isinstance(n, ast.Assign)
                    and any(getattr(t, "id", None) == value.id for t in n.targets)]  # fmt: skip
        if not assigned:
            return None
        value = max(assigned, key=lambda n: n.lineno).value
    return _activation_of(value)
