"""Scores of ``smar real``: language likelihoods and answers, and multimodal accuracy.

* :func:`text_bpb`: bits per byte of texts (code, prose) after an unscored context, the model used
  as a plain language model (no chat template).
* :func:`answer_bpb`: bits per byte of the assistant's turns of chats (the base model's own answers
  to held-out instructions), through the chat template.
* :func:`generate`: greedy answers to a batch of chats (left-padded, batched).
* :func:`multimodal_accuracy`: per question type, the share of image questions whose greedy answer
  names the right choice first.

Every function takes a ``transformers`` processor or tokenizer with the chat template and runs
under ``torch.no_grad`` in eval mode, in the precision context it is given.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch

__all__ = ["text_bpb", "answer_bpb", "generate", "chosen", "multimodal_accuracy"]


def _tokenizer(proc):
    return getattr(proc, "tokenizer", proc)


@torch.no_grad()
def _nll_sums(model, ids: list[list[int]], starts: list[int], batch: int, cast) -> list[float]:
    """Summed NLL (nats) of ``ids[i][starts[i]:]`` given what precedes it, per sequence."""
    out = []
    for b in range(0, len(ids), batch):
        rows, firsts = ids[b : b + batch], starts[b : b + batch]
        width = max(map(len, rows))
        x = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with cast:
            logits = model(input_ids=x, attention_mask=mask).logits
        logp = logits[:, :-1].float().log_softmax(-1)
        tok = logp.gather(-1, x[:, 1:, None])[..., 0]  # (B, S-1)
        for i, (r, s) in enumerate(zip(rows, firsts, strict=True)):
            out.append(-float(tok[i, max(s, 1) - 1 : len(r) - 1].sum()))
    return out


def _bpb(model, tok, rows: list[tuple[list[int], int]], batch: int, cast) -> float:
    """Bits per byte of each row's tokens from its start on (``(ids, start)`` rows), pooled."""
    ids, starts = [r for r, _ in rows], [s for _, s in rows]
    nbytes = sum(len(tok.decode(r[s:]).encode()) for r, s in rows)
    nll = sum(_nll_sums(model, ids, starts, batch, cast or contextlib.nullcontext()))
    return nll / math.log(2) / max(nbytes, 1)


def text_bpb(model, proc, pairs: list[tuple[str, str]], *, batch: int = 4, max_tokens: int = 384,
             cast=None) -> float:  # fmt: skip
    """Bits per byte of each ``target`` after its ``context`` (pairs), pooled over the pairs.

    Sequences are cut at ``max_tokens`` (the target's bytes are counted up to the cut)."""
    tok = _tokenizer(proc)
    rows = []
    for context, target in pairs:
        c = tok(context, add_special_tokens=False)["input_ids"] if context else []
        t = tok(target, add_special_tokens=False)["input_ids"]
        rows.append(((c + t)[:max_tokens], len(c)))
    return _bpb(model, tok, rows, batch, cast)


def answer_bpb(model, proc, chats: list[list[dict]], *, batch: int = 4, cast=None) -> float:
    """Bits per byte of the last (assistant) turn of each chat, given the turns before it."""
    tok = _tokenizer(proc)
    rows = []
    for chat in chats:
        head = proc.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        full = proc.apply_chat_template(chat, tokenize=False)
        h = tok(head, add_special_tokens=False)["input_ids"]
        rows.append((tok(full, add_special_tokens=False)["input_ids"], len(h)))
    return _bpb(model, tok, rows, batch, cast)


@torch.no_grad()
def generate(model, proc, chats: list[list[dict]], images=None, *, max_new_tokens: int = 24,
             batch: int = 16, cast=None) -> list[str]:  # fmt: skip
    """Greedy answers to ``chats`` (each ends with the user's turn), batched with left padding.

    ``images``: one list of images per chat (for a processor), or None."""
    tok = _tokenizer(proc)
    side = tok.padding_side
    tok.padding_side = "left"
    answers = []
    try:
        for b in range(0, len(chats), batch):
            part = chats[b : b + batch]
            texts = [proc.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in part]  # fmt: skip
            kw = {"text": texts}
            if images is not None:
                kw["images"] = [im for ims in images[b : b + batch] for im in ims] or None
            inputs = proc(**kw, padding=True, return_tensors="pt", add_special_tokens=False)
            with cast or contextlib.nullcontext():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)  # fmt: skip
            new = out[:, inputs["input_ids"].shape[1] :]
            answers += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return answers


def chosen(answer: str, choices: list[str]) -> int | None:
    """The index of the choice named first in ``answer`` (as a word), or None."""
    best, where = None, len(answer) + 1
    low = answer.lower()
    for i, c in enumerate(choices):
        m = re.search(rf"\b{re.escape(c.lower())}\b", low)
        if m and (m.start() < where or (m.start() == where and len(c) > len(choices[best]))):
            best, where = i, m.start()
    return best


def multimodal_accuracy(model, proc, samples: list[dict], *, batch: int = 16,
                        cast=None) -> dict[str, float]:  # fmt: skip
    """Accuracy per question type (``sample["task"]``) of greedy answers to image questions
    (samples of :func:`smar.testbed.real.data.qa_chat`, scored by :func:`chosen`)."""
    chats = [s["messages"][:-1] for s in samples]
    answers = generate(model, proc, chats, [s["images"] for s in samples], max_new_tokens=8,
                       batch=batch, cast=cast)  # fmt: skip
    right: dict[str, list[bool]] = {}
    for s, a in zip(samples, answers, strict=True):
        right.setdefault(s["task"], []).append(chosen(a, s["choices"]) == s["answer"])
    return {t: sum(r) / len(r) for t, r in right.items()}
