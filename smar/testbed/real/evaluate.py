"""Scores of ``smar real``: language likelihoods and answers, and multimodal accuracy.

* :func:`text_bpb`: bits per byte of texts (code, prose) after an unscored context, the model used
  as a plain language model (no chat template).
* :func:`answer_bpb`: bits per byte of the assistant's turns of chats (the base model's own answers
  to held-out instructions), through the chat template; :func:`answer_scores` adds the
  log-probabilities of their first answer tokens from the same forwards.
* :func:`generate`: greedy answers to a batch of chats (left-padded, batched).
* :func:`multimodal_accuracy`: per question type, the share of image questions whose greedy answer
  names the right choice first; :func:`image_answer_loss`: the teacher-forced loss of their
  answers; :func:`image_scores`: both from one forward of each question.

Every function takes a ``transformers`` processor or tokenizer with the chat template and runs
under ``torch.no_grad`` in eval mode, in the precision context it is given.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from smar.testbed.real import decode

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from PIL import Image
    from transformers import PreTrainedModel

    Cast = AbstractContextManager[Any]  # the precision context (bf16 autocast, or none)

__all__ = ["text_bpb", "answer_bpb", "answer_scores", "Ask", "chat_rows", "generate", "chosen",
           "multimodal_accuracy", "image_answer_loss", "image_scores"]


def _tokenizer(proc: Any) -> Any:
    return getattr(proc, "tokenizer", proc)


@torch.no_grad()
def _nll_sums(model: PreTrainedModel, ids: list[list[int]], starts: list[int], batch: int,
              cast: Cast,
              first: int = 0) -> tuple[list[float], list[torch.Tensor | None]]:  # fmt: skip
    """Summed NLL (nats) of ``ids[i][starts[i]:]`` given what precedes it, per sequence, and
    (``first > 0``) the log-probabilities ``(first, V)`` (float32) the model gives each of the
    first ``first`` scored tokens of each sequence (None for a sequence with fewer), from the same
    forward. The tokens every sequence shares before the first scored one run once
    (:class:`~smar.testbed.real.decode.Prefix`), and the batches hold sequences of like length
    (less padding); only the scored positions' logits are made and normalised (the output layer
    on their hidden states, :func:`~smar.testbed.real.decode.head`)."""
    fro = [max(s, 1) - 1 for s in starts]  # position p predicts token p + 1
    p = min([decode.shared_length(ids, until=decode.placeholders(model)), *fro]) if ids else 0
    prefix = decode.Prefix(model, ids[0][:p] if ids else [], cast)
    out: list[float] = [0.0] * len(ids)
    kept: list[torch.Tensor | None] = [None] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of like lengths
    out_layer = decode.head(model)  # logits of the scored positions only, where it can
    for b in range(0, len(ids), batch):
        part = order[b : b + batch]
        # token j at j - p: logits (B, W, V), or last hidden states (B, W, D)
        states = decode.forward(model, [ids[i] for i in part], prefix, cast=cast,
                                hidden=out_layer is not None)[0]  # fmt: skip
        for row, i in enumerate(part):
            r, at = ids[i], fro[i]
            logits = states[row, at - p : len(r) - 1 - p]  # (T, V) or (T, D)
            if out_layer is not None:
                with cast:
                    logits = out_layer(logits)
            logp = logits.float().log_softmax(-1)  # (T, V)
            target = torch.tensor(r[at + 1 :], dtype=torch.long)  # (T,)
            out[i] = -float(logp.gather(-1, target[:, None]).sum())
            if first and len(logp) >= first:
                kept[i] = logp[:first].clone()
    return out, kept


def _bpb(model: PreTrainedModel, tok: Any, rows: list[tuple[list[int], int]], batch: int,
         cast: Cast | None, first: int = 0) -> tuple[float, list[torch.Tensor | None]]:  # fmt: skip
    """Bits per byte of each row's tokens from its start on (``(ids, start)`` rows), pooled, and
    the first scored tokens' log-probabilities (:func:`_nll_sums`)."""
    ids, starts = [r for r, _ in rows], [s for _, s in rows]
    nbytes = sum(len(tok.decode(r[s:]).encode()) for r, s in rows)
    nll, kept = _nll_sums(model, ids, starts, batch, cast or contextlib.nullcontext(), first)
    return sum(nll) / math.log(2) / max(nbytes, 1), kept


def text_bpb(model: PreTrainedModel, proc: Any, pairs: list[tuple[str, str]], *, batch: int = 4,
             max_tokens: int = 384, cast: Cast | None = None) -> float:  # fmt: skip
    """Bits per byte of each ``target`` after its ``context`` (pairs), pooled over the pairs.

    Sequences are cut at ``max_tokens`` (the target's bytes are counted up to the cut)."""
    tok = _tokenizer(proc)
    rows = []
    for context, target in pairs:
        c = tok(context, add_special_tokens=False)["input_ids"] if context else []
        t = tok(target, add_special_tokens=False)["input_ids"]
        rows.append(((c + t)[:max_tokens], len(c)))
    return _bpb(model, tok, rows, batch, cast)[0]


def _answer_rows(proc: Any, chats: list[list[dict]]) -> list[tuple[list[int], int]]:
    """``(ids, start)`` of each chat: all its turns, scored from the last (assistant) turn on."""
    tok = _tokenizer(proc)
    rows = []
    for chat in chats:
        head = proc.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        full = proc.apply_chat_template(chat, tokenize=False)
        h = tok(head, add_special_tokens=False)["input_ids"]
        rows.append((tok(full, add_special_tokens=False)["input_ids"], len(h)))
    return rows


def answer_bpb(model: PreTrainedModel, proc: Any, chats: list[list[dict]], *, batch: int = 8,
               cast: Cast | None = None) -> float:  # fmt: skip
    """Bits per byte of the last (assistant) turn of each chat, given the turns before it."""
    return _bpb(model, _tokenizer(proc), _answer_rows(proc, chats), batch, cast)[0]


def answer_scores(model: PreTrainedModel, proc: Any, chats: list[list[dict]], *, first: int = 4,
                  batch: int = 8,
                  cast: Cast | None = None) -> tuple[float, torch.Tensor]:  # fmt: skip
    """:func:`answer_bpb` and, from the same forwards, the log-probabilities ``(N, first, V)``
    of the first ``first`` answer tokens (chats whose answer is shorter are left out: the same
    ones for every model), as :func:`smar.testbed.real.probes.first_token_logprobs` gives."""
    bits, kept = _bpb(model, _tokenizer(proc), _answer_rows(proc, chats), batch, cast, first)
    return bits, torch.stack([k for k in kept if k is not None])


def _eos(model: Any, tok: Any) -> set[int]:
    """The tokens that end a greedy answer: the model's generation config's end-of-sequence
    tokens (as ``generate`` reads them), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tok.eos_token_id if eos is None else eos
    return set(eos) if isinstance(eos, (list, tuple)) else {eos} - {None}


@dataclass(frozen=True)
class Ask:
    """Chats to answer greedily in another evaluation's decoding batch (their rows decoded
    beside its rows: :func:`smar.testbed.real.probes.knowledge_scores`): each ends with the
    user's turn; an answer ends at ``max_new_tokens`` or where ``stop(its text)`` is true."""

    chats: list[list[dict]]
    max_new_tokens: int
    stop: Callable[[str], bool] | None = None


def chat_rows(proc: Any, chats: list[list[dict]]) -> list[list[int]]:
    """The tokens of each chat (ending with the user's turn) up to the assistant's answer."""
    tok = _tokenizer(proc)
    return [tok(proc.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for c in chats]  # fmt: skip


@torch.no_grad()
def generate(model: PreTrainedModel, proc: Any, chats: list[list[dict]],
             images: list[list[Image.Image]] | None = None, *, max_new_tokens: int = 24,
             batch: int = 256, cast: Cast | None = None,
             stop: Callable[[str], bool] | None = None) -> list[str]:  # fmt: skip
    """Greedy answers to ``chats`` (each ends with the user's turn), batched
    (:func:`smar.testbed.real.decode.greedy`: the system prompt runs once, finished answers
    leave the batch).

    ``images``: one list of images per chat (for a processor), or None. ``stop(text)``: an
    answer whose text it accepts ends there (e.g. a closed code block)."""
    tok = _tokenizer(proc)
    inputs = None
    if images is None:
        rows = chat_rows(proc, chats)
    else:
        texts = [proc.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in chats]  # fmt: skip
        flat = [im for ims in images for im in ims]
        enc = proc(text=texts, images=flat or None, padding=True, return_tensors="pt",
                   add_special_tokens=False)  # fmt: skip
        rows = [r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"],
                                                      strict=True)]  # fmt: skip
        inputs = _pixels(enc, [{"images": ims} for ims in images])

    def ends(_: int, ids: list[int]) -> bool:
        return stop is not None and stop(tok.decode(ids, skip_special_tokens=True))

    share = images is None or not decode.routes_by_sample(model)
    new = decode.greedy(model, rows, max_new_tokens=max_new_tokens, eos=_eos(model, tok),
                        batch=batch, cast=cast, stop=ends if stop else None, inputs=inputs,
                        share=share)  # fmt: skip
    return [tok.decode(n, skip_special_tokens=True).strip() for n in new]


def chosen(answer: str, choices: list[str]) -> int | None:
    """The index of the choice named first in ``answer`` (as a word), or None."""
    best, where = None, len(answer) + 1
    low = answer.lower()
    for i, c in enumerate(choices):
        m = re.search(rf"\b{re.escape(c.lower())}\b", low)
        if m and (m.start() < where or (m.start() == where and best is not None
                                        and len(c) > len(choices[best]))):  # fmt: skip
            best, where = i, m.start()
    return best


def multimodal_accuracy(model: PreTrainedModel, proc: Any, samples: list[dict], *,
                        batch: int = 80, cast: Cast | None = None) -> dict[str, float]:  # fmt: skip
    """Accuracy per question type (``sample["task"]``) of greedy answers to image questions
    (samples of :func:`smar.testbed.real.data.qa_chat`, scored by :func:`chosen`)."""
    chats = [s["messages"][:-1] for s in samples]
    answers = generate(model, proc, chats, [s["images"] for s in samples], max_new_tokens=8,
                       batch=batch, cast=cast)  # fmt: skip
    return _accuracy(samples, answers)


def _accuracy(samples: list[dict], answers: list[str]) -> dict[str, float]:
    right: dict[str, list[bool]] = {}
    for s, a in zip(samples, answers, strict=True):
        right.setdefault(s["task"], []).append(chosen(a, s["choices"]) == s["answer"])
    return {t: sum(r) / len(r) for t, r in right.items()}


def _labelled(proc: Any, samples: list[dict]) -> tuple[dict, list[list[int]], list[torch.Tensor]]:
    """``(inputs, rows, labels)``: the samples as training labels them
    (:func:`smar.testbed.real.data.collate`), each row and its labels without padding."""
    from smar.testbed.real.data import collate

    tok = _tokenizer(proc)
    side, tok.padding_side = tok.padding_side, "right"
    try:
        inputs = collate(proc, samples)
    finally:
        tok.padding_side = side
    keep = inputs["attention_mask"].bool()  # (N, S)
    rows = [r[k].tolist() for r, k in zip(inputs["input_ids"], keep, strict=True)]
    return inputs, rows, [r[k] for r, k in zip(inputs["labels"], keep, strict=True)]


def _pixels(inputs: dict, samples: list[dict]) -> Callable[[slice], dict[str, Any]]:
    """The ``pixel_values`` of ``samples[s]`` (each sample's images, in order)."""
    first = [0, *itertools.accumulate(len(s["images"]) for s in samples)]

    def of(s: slice) -> dict[str, Any]:
        n = slice(first[s.start], first[s.stop])
        return {"pixel_values": inputs["pixel_values"][n]} if n.stop > n.start else {}

    return of


@torch.no_grad()
def image_scores(model: PreTrainedModel, proc: Any, samples: list[dict], *, batch: int = 80,
                 cast: Cast | None = None) -> tuple[dict[str, float], float]:  # fmt: skip
    """:func:`multimodal_accuracy` and :func:`image_answer_loss` from one forward of each
    question: its answer's tokens are scored from the question's key-value cache (cropped back
    after) before the greedy answer is decoded from it."""
    inputs, rows, labels = _labelled(proc, samples)
    heads = [r[: int(lab.ne(-100).nonzero()[0])] for r, lab in zip(rows, labels, strict=True)]
    nll = [0.0, 0.0]  # summed NLL, answer tokens

    def score(index: list[int], last: torch.Tensor, mask: torch.Tensor, cache: Any) -> None:
        answers = [rows[i][len(heads[i]) :] for i in index]
        logp0 = last.float().log_softmax(-1)  # (B, V) each answer's first token
        for i, a in enumerate(answers):
            nll[0] -= float(logp0[i, a[0]])
        nll[1] += sum(map(len, answers))
        if max(map(len, answers)) < 2:
            return
        # token j > 0 follows j - 1
        logits = decode.extend(model, cache, mask, [a[:-1] for a in answers], cast=cast)[0]
        cache.crop(-logits.shape[1])  # back to the question alone, for decoding (minus: remove)
        for i, a in enumerate(answers):
            logp = logits[i, : len(a) - 1].float().log_softmax(-1)  # (len - 1, V)
            nll[0] -= float(logp.gather(-1, torch.tensor(a[1:])[:, None]).sum())

    tok = _tokenizer(proc)
    new = decode.greedy(model, heads, max_new_tokens=8, eos=_eos(model, tok), batch=batch,
                        cast=cast, inputs=_pixels(inputs, samples), prefilled=score,
                        share=not decode.routes_by_sample(model))  # fmt: skip
    said = [tok.decode(n, skip_special_tokens=True).strip() for n in new]
    return _accuracy(samples, said), nll[0] / max(nll[1], 1)


@torch.no_grad()
def image_answer_loss(model: PreTrainedModel, proc: Any, samples: list[dict], *, batch: int = 40,
                      cast: Cast | None = None) -> float:  # fmt: skip
    """Mean NLL (nats per token) of the assistant's answers to held-out image questions,
    teacher-forced and labelled as in training (:func:`smar.testbed.real.data.collate`): whether
    a run still learns the multimodal task."""
    inputs, rows, labels = _labelled(proc, samples)
    # the shared tokens end before the first labelled one
    p = min([decode.shared_length(rows, until=decode.placeholders(model)),
             *(int(lab.ne(-100).nonzero()[0]) - 1 for lab in labels if lab.ne(-100).any())])
    p = 0 if decode.routes_by_sample(model) else p  # (its image rows' prefix routes as image)
    prefix = decode.Prefix(model, rows[0][:p], cast)
    pixels = _pixels(inputs, samples)
    total, count = 0.0, 0
    for b in range(0, len(rows), batch):
        e = min(b + batch, len(rows))
        logits = decode.forward(model, rows[b:e], prefix, cast=cast, **pixels(slice(b, e)))[0]
        for i, lab in enumerate(labels[b:e]):
            target = lab[p + 1 :]  # token j (j > p) is predicted at j - 1 - p
            scored = target != -100
            logp = logits[i, : len(target)][scored].float().log_softmax(-1)  # (T, V)
            total -= float(logp.gather(-1, target[scored][:, None]).sum())
            count += int(scored.sum())
    return total / max(count, 1)
