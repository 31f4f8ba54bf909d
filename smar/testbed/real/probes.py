"""Evaluations of ``smar real`` that see format loss and fact loss apart.

Teacher-forced bits per byte supply the first answer tokens, where an answer's style is decided,
and exact greedy answers mix a lost fact with a lost sentence form. These look at each side:

* :func:`format_free`: the right answer's rank by log-likelihood among answers of the same kind
  after a fixed answer prefix ("The capital of Austria is" + " Vienna" / " Oslo" / ...): the fact,
  whatever form the model would give it;
* :func:`format_kept`: the share of greedy answers that keep the base model's answer frame (its
  words before the right answer, "The capital of Austria is"): the form, whatever the fact;
* :func:`first_token_logprobs` and :func:`first_token_kl`: the divergence from the stage-1 model
  over the first answer tokens of held-out chats, where the form is decided;
* :func:`code_scores`: greedy answers to "write a function" instructions: the share that parse
  (``ast``) and define the named function, and their length.

Shapes legend: N chats, K first answer tokens, V vocabulary.
"""

from __future__ import annotations

import ast
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from smar.testbed.real import decode
from smar.testbed.real.evaluate import _tokenizer, answer_scores

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from smar.testbed.real.evaluate import Ask, Cast

__all__ = ["candidate_ranks", "knowledge_scores", "format_free", "answer_frame", "format_kept",
           "first_token_logprobs", "first_token_kl", "code_answer", "code_closed",
           "code_scores"]  # fmt: skip


def _head(proc: Any, question: str) -> str:
    return proc.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                    add_generation_prompt=True)  # fmt: skip


@torch.no_grad()
def candidate_ranks(model: PreTrainedModel, proc: Any, items: list[dict], *, batch: int = 64,
                    cast: Cast | None = None) -> list[int]:  # fmt: skip
    """The rank (0: first) of each item's right answer (``candidates[0]``) among its candidates,
    by the summed log-likelihood of ``" " + candidate`` after the question's chat and the fixed
    ``prefix`` of the answer (items of :func:`smar.testbed.real.texts.knowledge_items`).

    The tokens all contexts share run once (:class:`~smar.testbed.real.decode.Prefix`), each
    context once (left-padded); a candidate's first token is scored from its context's last
    logits, and only candidates of two or more tokens run a second forward, from a copy of
    their context's key-value cache."""
    tok = _tokenizer(proc)
    contexts, tails = [], []
    for item in items:
        context = _head(proc, item["question"]) + item["prefix"]
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        contexts.append(ctx)
        tails.append(_tails(tok, context, ctx, item["candidates"]))
    prefix = decode.Prefix.of(model, contexts, cast)
    ranks = []
    for b in range(0, len(items), batch):
        logits, mask, cache = decode.forward(model, contexts[b : b + batch], prefix, cast=cast,
                                             left=True, logits_to_keep=1)  # fmt: skip
        first = logits[:, -1].float().log_softmax(-1)  # (B, V) each candidate's first token
        ranks += _ranks(model, tails[b : b + batch], first, mask, cache, cast)
    return ranks


@torch.no_grad()
def knowledge_scores(model: PreTrainedModel, proc: Any, items: list[dict], *,
                     max_new_tokens: int, batch: int = 512, cast: Cast | None = None,
                     more: Ask | None = None,
                     ) -> tuple[list[str], list[int], list[str]]:  # fmt: skip
    """``(answers, ranks, more answers)``: the greedy answers to the items' questions
    (:func:`smar.testbed.real.evaluate.generate`) and their right answers' ranks
    (:func:`candidate_ranks`), from one forward of each question: its answer prefix and
    candidates are scored from the question's key-value cache before the answer is decoded from
    it. ``more``: other chats answered in the same decoding batch (their first answer tokens
    ride on the questions' forwards), their answers third. Where a question's tokens do not begin
    its context's (a tokenizer that merges across the two), the ranks are computed apart."""
    from smar.testbed.real.evaluate import _eos, chat_rows

    tok = _tokenizer(proc)
    texts = [_head(proc, it["question"]) for it in items]
    heads = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    contexts = [tok(t + it["prefix"], add_special_tokens=False)["input_ids"]
                for t, it in zip(texts, items, strict=True)]  # fmt: skip
    n = len(items)
    rows, limits = heads, [max_new_tokens] * n
    if more is not None:
        rows = heads + chat_rows(proc, more.chats)
        limits += [more.max_new_tokens] * len(more.chats)

    def stop(r: int, ids: list[int]) -> bool:  # (the questions end at eos or their limit)
        return r >= n and more is not None and more.stop is not None and more.stop(
            tok.decode(ids, skip_special_tokens=True))  # fmt: skip

    def answer(prefilled: Any = None) -> tuple[list[str], list[str]]:
        said = decode.greedy(model, rows, max_new_tokens=limits, eos=_eos(model, tok),
                             batch=batch, cast=cast, stop=stop, prefilled=prefilled)  # fmt: skip
        text = [tok.decode(ids, skip_special_tokens=True).strip() for ids in said]
        return text[:n], text[n:]

    if any(c[: len(h)] != h or len(c) == len(h) for h, c in zip(heads, contexts, strict=True)):
        said, others = answer()
        return said, candidate_ranks(model, proc, items, cast=cast), others
    tails = [_tails(tok, t + it["prefix"], c, it["candidates"])
             for t, it, c in zip(texts, items, contexts, strict=True)]  # fmt: skip
    ranks: list[int] = [0] * n

    def rank(index: list[int], last: torch.Tensor, mask: torch.Tensor, cache: Any) -> None:
        mine = [j for j, i in enumerate(index) if i < n]  # the batch's questions
        if not mine:
            return
        asked = [index[j] for j in mine]
        whole = len(mine) == len(index)  # else the questions' cache apart (a copy)
        at = torch.tensor(mine)
        own = cache if whole else decode.select_cache(cache, at)
        prefixes = [contexts[i][len(heads[i]) :] for i in asked]
        logits, full, _ = decode.extend(model, own, mask[at], prefixes, cast=cast, left=True,
                                        logits_to_keep=1)  # each answer prefix, last at the end
        first = logits[:, -1].float().log_softmax(-1)  # (B, V)
        for i, r in zip(asked, _ranks(model, [tails[i] for i in asked], first, full, own, cast),
                        strict=True):  # fmt: skip
            ranks[i] = r
        if whole:
            cache.crop(mask.shape[1] - full.shape[1])  # back to the questions, for decoding

    said, others = answer(rank)
    return said, ranks, others


def _tails(tok: Any, context: str, ctx: list[int], candidates: list[str]) -> list[list[int]]:
    """Each candidate's tokens after its context's (``" " + candidate``)."""
    return [tok(f"{context} {c}", add_special_tokens=False)["input_ids"][len(ctx) :]
            for c in candidates]  # fmt: skip


def _ranks(model: PreTrainedModel, tails: list[list[list[int]]], first: torch.Tensor,
           mask: torch.Tensor, cache: Any, cast: Cast | None) -> list[int]:  # fmt: skip
    """The rank of each context's first candidate among its ``tails`` (token lists), given the
    log-probabilities ``first (B, V)`` after each context and its key-value ``cache`` (``mask
    (B, S)``; left as it is): a candidate's first token is scored from ``first``; only candidates of
    two or more tokens run a forward, one per length, from their contexts' caches."""
    flat = [c for t in tails for c in t]  # every candidate's tokens
    owner = torch.tensor([i for i, t in enumerate(tails) for _ in t])  # (C,) its context
    nll = [-float(first[o, c[0]]) for o, c in zip(owner.tolist(), flat, strict=True)]
    widths: dict[int, list[int]] = {}  # candidates of two or more tokens, by their length - 1
    for r, c in enumerate(flat):
        if len(c) > 1:
            widths.setdefault(len(c) - 1, []).append(r)
    for _, rows in sorted(widths.items()):
        index = owner[rows]  # (C',) one forward per length: no padding
        mine = decode.select_cache(cache, index)  # each context's cache, once per candidate
        out = decode.extend(model, mine, mask[index], [flat[r][:-1] for r in rows],
                            cast=cast)[0]  # (C', length - 1, V): token j > 0 follows j - 1
        logp = out.float().log_softmax(-1)  # (C', width, V)
        for j, r in enumerate(rows):
            nll[r] -= float(logp[j].gather(-1, torch.tensor(flat[r][1:])[:, None]).sum())
    ranks, start = [], 0
    for t in tails:
        mine = nll[start : start + len(t)]  # right answer first
        ranks.append(sum(v < mine[0] for v in mine[1:]))  # ties count for the right answer
        start += len(t)
    return ranks


def format_free(model: PreTrainedModel, proc: Any, items: list[dict], **kw: Any) -> float:
    """The share of items whose right answer ranks first (:func:`candidate_ranks`)."""
    ranks = candidate_ranks(model, proc, items, **kw)
    return sum(r == 0 for r in ranks) / max(len(ranks), 1)


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def answer_frame(answer: str, gold: str) -> str | None:
    """The words of ``answer`` before the right answer ``gold`` (lower case, punctuation and
    spacing aside): "The capital of Austria is Vienna." -> "the capital of austria is"; None
    when the answer does not name ``gold``."""
    words, target = _words(answer), _words(gold)
    at = re.search(rf"(^| ){re.escape(target)}( |$)", words)
    return None if at is None else words[: at.start()].strip()


def format_kept(base_answers: list[str], answers: list[str], golds: list[str]) -> float:
    """The share of ``answers`` that begin with the base answer's frame (the base's words before
    the right answer), right or wrong: the base's sentence form kept."""
    kept = []
    for base, new, gold in zip(base_answers, answers, golds, strict=True):
        frame = answer_frame(base, gold)
        if frame is not None:
            kept.append(_words(new).startswith(frame))
    return sum(kept) / max(len(kept), 1)


def first_token_logprobs(model: PreTrainedModel, proc: Any, chats: list[list[dict]], *, k: int = 4,
                         batch: int = 8, cast: Cast | None = None) -> Tensor:  # fmt: skip
    """``(N, K, V)``: the log-probabilities the model gives each of the first ``k`` tokens of the
    last (assistant) turn of each chat, teacher-forced (float32). A chat whose answer is shorter
    than ``k`` tokens is left out (the same ones for every model). The same forwards as
    :func:`smar.testbed.real.evaluate.answer_scores`, which gives them with the bits per byte."""
    return answer_scores(model, proc, chats, first=k, batch=batch, cast=cast)[1]


def first_token_kl(reference: Tensor, logprobs: Tensor) -> float:
    """Mean over chats and positions of ``KL(reference || model)`` (nats), both ``(N, K, V)``
    log-probabilities."""
    p = reference.exp()
    return float((p * (reference - logprobs)).sum(-1).mean())


def code_answer(answer: str) -> str:
    """The code of an answer: its first fenced block (```python ... ```), else the answer."""
    fenced = re.search(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", answer, re.S)
    return fenced.group(1) if fenced else answer


def code_closed(answer: str) -> bool:
    """Whether ``answer``'s first fenced code block is closed: where a code answer ends (the
    answers are generated up to there, the base's too, so their lengths compare)."""
    return re.search(r"```(?:python|py)?\s*\n.*?```", answer, re.S) is not None


def _defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.walk(tree))


def code_scores(answers: list[str], names: list[str]) -> dict[str, float]:
    """``defines``: the share of answers whose code parses and defines the named function;
    ``chars``: their mean length in characters."""
    ok = [_defines(code_answer(a), n) for a, n in zip(answers, names, strict=True)]
    return {"defines": sum(ok) / max(len(ok), 1),
            "chars": sum(map(len, answers)) / max(len(answers), 1)}  # fmt: skip
