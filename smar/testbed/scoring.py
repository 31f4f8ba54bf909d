"""Scoring of the testbed's benchmarks: text skills and multimodal questions by answer
log-likelihood among choices, held-out prose by bits per byte.

Scores are higher-is-better: accuracies for the choice benchmarks, ``1 / bits-per-byte`` for
prose (so that retention is ``bpb_before / bpb_after``). Benchmark names are ``text/<task>``
and ``mm/<question type>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from smar.errors import UsageError
from smar.testbed.data.images import ImageSample
from smar.testbed.data.questions import MMSample
from smar.testbed.data.skills import Example
from smar.testbed.data.tokenizer import Tokenizer

__all__ = [
    "ChoiceItem",
    "choice_logprobs",
    "choice_accuracy",
    "choice_correct",
    "prose_bits_per_byte",
    "unigram_bits_per_byte",
    "text_items",
    "mm_items",
]


@dataclass
class ChoiceItem:
    """A scored question: ``prompt`` ids (after the optional image), one id list per choice."""

    prompt: list[int]
    choices: list[list[int]]
    answer: int
    image: ImageSample | None = None


def text_items(examples: Sequence[Example], tok: Tokenizer) -> list[ChoiceItem]:
    return [
        ChoiceItem(tok.encode(e.prompt), [tok.encode(c) for c in e.choices], e.answer)
        for e in examples
    ]


def mm_items(samples: Sequence[MMSample], tok: Tokenizer) -> list[ChoiceItem]:
    return [
        ChoiceItem(tok.encode(s.prompt), [tok.encode(c) for c in s.choices], s.answer, s.image)
        for s in samples
    ]


@torch.no_grad()
def choice_logprobs(
    model: Callable[..., Any],
    items: Sequence[ChoiceItem],
    *,
    bos_id: int,
    pad_id: int,
    image_id: int,
    image_tokens: int,
    modality: str = "token",
    batch_size: int = 256,
) -> list[list[float]]:
    """Sum of log-probabilities of each choice's tokens after its prompt, per item.

    ``model(input_ids, pixel_values, attention_mask=, modality_ids=, logits=, position_ids=,
    attn_mask=)`` must return an object with ``logits``: ``(N, V)`` at the positions of the bool
    mask ``logits`` (B, S), or ``(B, S, V)`` (then read at those positions); see
    :meth:`smar.testbed.model.TinyModel.forward` for the packed sequences' positions and mask.
    Image items get ``image_tokens`` placeholders after ``<bos>``; with ``modality="sample"``
    every token of an image item has modality 1 (routing as in training).
    """
    # A choice's log-probability is the sum over its tokens, each read at the position before it.
    # Any sequence that starts with prompt + choice[:-1] (the choice's stem) holds every position
    # the choice needs, so one continuation per maximal stem scores all choices: choices of one
    # token (stem empty), and choices that share a stem ("top left", "top right"), need none of
    # their own. The continuations of an item are packed after its prefix in one sequence: each
    # at the positions it would have alone, attending to the prefix and to itself only, so that
    # the prefix (the image's tokens above all) runs once per item.
    packs = []  # (item, ids, positions, prefix length, image, [(stem start, its choices)])
    for i, it in enumerate(items):
        img = [image_id] * image_tokens if it.image is not None else []
        if any(not c for c in it.choices):
            raise UsageError(f"item {i} has an empty choice")
        prefix = [bos_id] + img + it.prompt
        P = len(prefix)
        stems = sorted({tuple(c[:-1]) for c in it.choices}, key=len, reverse=True)
        maximal = [
            st for k, st in enumerate(stems) if not any(o[: len(st)] == st for o in stems[:k])
        ]
        todo = set(range(len(it.choices)))
        seq, positions, groups = list(prefix), list(range(P)), []
        for st in maximal:
            mine = [
                j for j in sorted(todo) if st[: len(it.choices[j]) - 1] == tuple(it.choices[j][:-1])
            ]
            todo -= set(mine)
            groups.append((len(seq), len(st), mine))
            seq += st
            positions += range(P, P + len(st))
        packs.append((i, seq, positions, P, it.image, groups))
    out = [[0.0] * len(it.choices) for it in items]
    order = sorted(range(len(packs)), key=lambda k: len(packs[k][1]))  # similar lengths together
    for b in range(0, len(order), batch_size):
        chunk = [packs[k] for k in order[b : b + batch_size]]
        B, S = len(chunk), max(len(p[1]) for p in chunk)
        ids = torch.tensor([p[1] + [pad_id] * (S - len(p[1])) for p in chunk])  # (B, S)
        lengths = torch.tensor([len(p[1]) for p in chunk])
        mask = (torch.arange(S)[None, :] < lengths[:, None]).long()  # (B, S)
        # rows with two or more continuations need their positions and mask; rows with at most
        # one are laid out as one causal sequence already (and causal attention is faster)
        packed = any(sum(n > 0 for _, n, _ in p[5]) > 1 for p in chunk)
        pos: torch.Tensor | None = None
        attend: torch.Tensor | None = None  # set when packed
        if packed:
            pos = torch.tensor([p[2] + [0] * (S - len(p[2])) for p in chunk])  # (B, S)
            attend = torch.eye(S, dtype=torch.bool).repeat(B, 1, 1)  # (B, S, S); padding: itself
            causal = torch.ones(S, S, dtype=torch.bool).tril()
        read = torch.zeros(B, S, dtype=torch.bool)  # the positions whose predictions are read
        for r, (_, _, _, P, _, groups) in enumerate(chunk):
            read[r, P - 1] = True
            if attend is not None:
                attend[r, :P, :P] = causal[:P, :P]
            for a, n, _ in groups:
                read[r, a : a + n] = True
                if attend is not None:
                    attend[r, a : a + n, :P] = True
                    attend[r, a : a + n, a : a + n] = causal[:n, :n]
        images = [p[4].pixels for p in chunk if p[4] is not None]
        pixels = torch.stack(images) if images else None
        mod = (ids == image_id).long()
        if modality == "sample":
            has_image = torch.tensor([p[4] is not None for p in chunk])
            mod = has_image[:, None].long().expand(-1, S).clone()
        mod = mod.masked_fill(mask == 0, -1)
        row_of = torch.cumsum(read.reshape(-1), 0).reshape(read.shape) - 1  # (B, S) -> row of N
        logits = model(
            ids, pixels, attention_mask=mask, modality_ids=mod, logits=read, position_ids=pos,
            attn_mask=attend,
        ).logits  # fmt: skip
        if logits.dim() == 3:  # a model that gives every position's logits
            logits = logits[read]  # (N, V)
        logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
        # every log-probability this chunk needs, gathered at once: (row of logp, token)
        rows, toks, slots = [], [], []  # slots: (item, choice, how many values it sums)
        for r, (i, _, _, P, _, groups) in enumerate(chunk):
            last = int(row_of[r, P - 1])  # predicts every choice's first token
            for a, n, mine in groups:
                # the stem's first token predicts the choice's second (an empty stem: one-token
                # choices, read at the prefix alone)
                first = int(row_of[r, a]) if n else -1
                for j in mine:
                    c = items[i].choices[j]
                    rows.append(last)
                    rows.extend(range(first, first + len(c) - 1))
                    toks.extend(c)
                    slots.append((i, j, len(c)))
        values = logp[torch.tensor(rows), torch.tensor(toks)].tolist()
        k = 0
        for i, j, n in slots:
            out[i][j] = math.fsum(values[k : k + n])
            k += n
    return out


def choice_correct(logprobs: Sequence[Sequence[float]], answers: Sequence[int]) -> list[bool]:
    """Per item: whether the correct choice has the highest log-likelihood (ties count wrong)."""
    if len(logprobs) != len(answers) or not answers:
        raise UsageError("need one answer per item and at least one item")
    out = []
    for lp, a in zip(logprobs, answers, strict=True):
        best = max(range(len(lp)), key=lambda j: lp[j])
        out.append(best == a and sum(v == lp[a] for v in lp) == 1)
    return out


def choice_accuracy(logprobs: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Share of items whose correct choice has the highest log-likelihood (ties count wrong)."""
    right = choice_correct(logprobs, answers)
    return sum(right) / len(right)


@torch.no_grad()
def prose_bits_per_byte(
    model: Callable[..., Any],
    tok: Tokenizer,
    text: str,
    *,
    seq_len: int,
    max_bytes: int = 60_000,
    batch_size: int = 16,
    windows_out: list[tuple[float, int]] | None = None,
) -> float:
    """Bits per byte of ``text[:max_bytes]`` under the model, in non-overlapping windows.

    ``windows_out``, if given, receives one ``(bits, bytes)`` pair per window (for a bootstrap
    over windows; the bytes of a window are those of its decoded target tokens).
    """
    text = text[:max_bytes]
    ids = torch.tensor([tok.bos_id] + tok.encode(text))
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise UsageError(f"held-out text too short for one window of {seq_len} tokens")
    nats = 0.0
    windows = [ids[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)]
    for b in range(0, n, batch_size):
        w = torch.stack(windows[b : b + batch_size])  # (B, S+1)
        logits = model(w[:, :-1]).logits
        per_token = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1), reduction="none"
        ).view(w.shape[0], -1)  # (B, S)
        nats += per_token.sum().item()
        if windows_out is not None:
            for row, window in zip(per_token.sum(1).tolist(), w[:, 1:].tolist(), strict=True):
                windows_out.append((row / math.log(2), len(tok.decode(window).encode("utf-8"))))
    n_bytes = len(tok.decode(ids[1 : n * seq_len + 1].tolist()).encode("utf-8"))
    return nats / math.log(2) / n_bytes


def unigram_bits_per_byte(
    tok: Tokenizer, train_ids: torch.Tensor, text: str, *, max_bytes: int = 60_000
) -> float:
    """Bits per byte of a unigram model (add-one smoothed token frequencies of ``train_ids``)."""
    counts = torch.bincount(train_ids, minlength=tok.vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    ids = torch.tensor(tok.encode(text[:max_bytes]))
    n_bytes = len(tok.decode(ids.tolist()).encode("utf-8"))
    return float(-logp[ids].sum() / math.log(2) / n_bytes)
