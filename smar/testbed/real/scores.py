"""The scores of one ``smar real`` model: language (bits per byte, knowledge accuracy), the
multimodal accuracy per question type, and the probes that see format and fact loss apart
(:mod:`smar.testbed.real.probes`), with the stage-1 model's first-token log-probabilities cached
as their reference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from smar.errors import CorruptFile
from smar.experts import bucketed_rows, prepacked
from smar.testbed.io import load_tensors, save_tensors, set_aside
from smar.testbed.real import evaluate, probes, texts
from smar.testbed.real.precision import autocast, bf16_weights

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, PreTrainedModel, ProcessorMixin

    from smar.testbed.real.evaluate import Cast
    from smar.testbed.real.run import RealConfig

__all__ = ["score", "first_token_reference"]

CHAT_TOKENS = 48  # the base's answers to chat instructions
KNOWLEDGE_TOKENS = 16  # answers to knowledge questions ("The capital of Kenya is Nairobi.")
CODE_TOKENS = 96  # answers to "write a function" instructions
FIRST_TOKENS = 4  # the first answer tokens of held-out chats compared with the stage-1 model


# Bumped when the base's answers change (code answers end at their closed code block since 2):
# cached base answers of another version are generated again.
ANSWERS = 2
# Bumped when the evaluation changes what it answers or scores, rounding included (cached
# stage-1 scores of another version are computed again). 2: the shared prefix runs once, code
# answers end at their closed code block. 3: bf16 weights reordered once for oneDNN
# (smar.experts.prepacked), which rounds some products otherwise. 4: the code instructions
# decoded in the knowledge questions' batch (other batch sizes: other rounding in bf16).
EVALUATION = 4


@contextlib.contextmanager
def _inference(model: PreTrainedModel, precision: str) -> Iterator[None]:
    """Evaluation's settings: bf16 weights for bf16 autocast (the same products, no cast at each
    call), reordered once for oneDNN (:func:`smar.experts.prepacked`), and the experts' rows
    padded to a few sizes (:func:`smar.experts.bucketed_rows`)."""
    with contextlib.ExitStack() as stack:
        if precision == "bf16":
            stack.enter_context(bf16_weights(model))
            stack.enter_context(prepacked(model))
        stack.enter_context(bucketed_rows())
        yield


def score(model: LlavaForConditionalGeneration, proc: ProcessorMixin, cfg: RealConfig,
          answers: dict, images: list[dict],
          reference: torch.Tensor | None = None) -> dict:  # fmt: skip
    """Every benchmark of one model: language (bits per byte, knowledge accuracy), the
    multimodal accuracy per question type, and the format and fact probes
    (:mod:`smar.testbed.real.probes`; the first-token KL against ``reference``, the stage-1
    model's log-probabilities)."""
    model.eval()
    with _inference(model, cfg.eval_precision):
        return _score(model, proc, cfg, answers, images, reference, autocast(cfg.eval_precision))


def _score(model: LlavaForConditionalGeneration, proc: ProcessorMixin, cfg: RealConfig,
           answers: dict, images: list[dict], reference: torch.Tensor | None,
           cast: Cast) -> dict:  # fmt: skip
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in answers["chat_eval"]]  # fmt: skip
    known = [(q, g) for q, g, a in answers["knowledge"] if texts.is_right(a, g)]
    items = {it["question"]: it for it in texts.knowledge_items()}
    ask = evaluate.Ask([[{"role": "user", "content": q}] for q, _, _ in answers["code"]],
                       CODE_TOKENS, probes.code_closed)  # decoded beside the questions
    if known:
        said, ranks, coded = probes.knowledge_scores(model, proc, [items[q] for q, _ in known],
                                                     max_new_tokens=KNOWLEDGE_TOKENS, cast=cast,
                                                     more=ask)  # fmt: skip
    else:
        said, ranks = [], []
        coded = evaluate.generate(model, proc, ask.chats, max_new_tokens=CODE_TOKENS, cast=cast,
                                  stop=ask.stop)  # fmt: skip
    code = texts.humaneval()[: cfg.eval_code]
    prose = [("", p) for p in texts.prose(cfg.eval_prose)]
    chat_bpb, firsts = evaluate.answer_scores(model, proc, chats, first=FIRST_TOKENS, batch=32,
                                              cast=cast)  # fmt: skip
    multimodal, image_loss = evaluate.image_scores(model, proc, images, cast=cast)
    language = {
        "chat_bpb": chat_bpb,
        "code_bpb": evaluate.text_bpb(model, proc, code, cast=cast),
        "prose_bpb": evaluate.text_bpb(model, proc, prose, cast=cast),
    }
    if known:  # (a model that answers none of them right has no knowledge to retain)
        language["knowledge"] = sum(
            texts.is_right(a, g) for a, (_, g) in zip(said, known, strict=True)
        ) / len(known)
    return {
        "language": language,
        "probes": _probes(answers, known, said, ranks, coded, firsts, reference),
        "knowledge_asked": len(known),
        "knowledge_answers": [[q, a] for (q, _), a in zip(known, said, strict=True)],
        "multimodal": multimodal,
        "image_answer_loss": image_loss,
    }


def _probes(answers: dict, known: list[tuple[str, str]], said: list[str], ranks: list[int],
            coded: list[str], firsts: torch.Tensor,
            reference: torch.Tensor | None) -> dict:  # fmt: skip
    """Format and fact apart: the format-free knowledge score (the right answers' ``ranks``) and
    the base's answer frame kept (the known questions), the answers to code instructions
    (``coded``), and the first-token KL to stage 1."""
    base = {q: a for q, _, a in answers["knowledge"]}
    code = answers["code"]
    mine, theirs = probes.code_scores(coded, [n for _, n, _ in code]), probes.code_scores(
        [a for _, _, a in code], [n for _, n, _ in code])  # fmt: skip
    out = {
        "format_free": sum(r == 0 for r in ranks) / len(ranks) if ranks else None,
        "format_kept": probes.format_kept([base[q] for q, _ in known], said, [g for _, g in known])
        if known
        else None,  # fmt: skip
        "code_defines": mine["defines"],
        "code_length": mine["chars"] / max(theirs["chars"], 1.0),  # relative to the base's
        "code_answers": [[q, a] for (q, _, _), a in zip(code, coded, strict=True)],
    }
    if reference is not None:
        out["first_token_kl"] = probes.first_token_kl(reference, firsts)
    return out


def first_token_reference(model: PreTrainedModel, proc: ProcessorMixin, precision: str,
                          answers: dict, path: Path) -> torch.Tensor:  # fmt: skip
    """The stage-1 model's log-probabilities of the first answer tokens of the held-out chats
    ``(N, K, V)``, cached in the stage folder (a corrupt file is set aside and rebuilt)."""
    if path.exists():
        try:
            return load_tensors(path)[0]["logprobs"]
        except (CorruptFile, KeyError) as e:
            set_aside(path, getattr(e, "why", str(e)))
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in answers["chat_eval"]]  # fmt: skip
    with _inference(model, precision):
        ref = probes.first_token_logprobs(model, proc, chats, k=FIRST_TOKENS,
                                          cast=autocast(precision))  # fmt: skip
    save_tensors(path, {"logprobs": ref.contiguous()})
    return ref
