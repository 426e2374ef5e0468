"""Training rows for the three Talk2Face tasks, built with the runtime's own templates.

Using `facert.runtime.tasks.Templates` means a row is exactly what inference feeds the model;
the row then continues with what inference would produce, and only those continuation ids are
targets (all in segment 2). Each task has one vocabulary window (image codes or text), and its
loss is a softmax over that window, as sampling and score mode read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facert.runtime.sequence import GREEDY
from facert.runtime.tasks import Templates

IGNORE = -100
UNK_RATE = 0.05  # to_image prompt words replaced by [UNK], so unknown user words are ignored


@dataclass
class Row:
    ids: list[int]
    segs: list[int]
    targets: list[int]  # target at position i is the id at i + 1, or IGNORE


def _row(prompt_ids: np.ndarray, prompt_segs: np.ndarray, continuation: list[int]) -> Row:
    P, n = len(prompt_ids), len(continuation)
    ids = [*map(int, prompt_ids), *continuation]
    segs = [*map(int, prompt_segs), *([2] * n)]
    targets = [IGNORE] * (P - 1) + continuation + [IGNORE]
    return Row(ids, segs, targets[: len(ids)])


def image_row(t: Templates, text: str, codes: np.ndarray, rng: np.random.Generator) -> Row:
    seq = t.to_image(text, GREEDY, 0)
    ids = seq.prompt_ids.copy()  # [CLS] to image [SEP] words [SEP], perhaps cut short
    end = len(ids) - int(ids[-1] == t.config.sep_id)
    words = slice(len(t.prompt_ids["to_image"]) + 2, end)
    unk = t.tokenizer.token_to_id("[UNK]")
    ids[words] = np.where(rng.random(len(ids[words])) < UNK_RATE, unk, ids[words])
    return _row(ids, seq.prompt_segs, [int(c) + t.config.lm.text_vocab_size for c in codes])


def caption_row(t: Templates, codes: np.ndarray, text: str) -> Row:
    seq = t.to_caption(codes, GREEDY)
    return _row(seq.prompt_ids, seq.prompt_segs, [*t.tokenizer.encode(text), t.config.sep_id])


def attribute_row(t: Templates, codes: np.ndarray, name: str, value: str) -> Row:
    answer = t.candidate_ids(value)
    seq = t.to_attribute(codes, name, forced=answer)
    return _row(seq.prompt_ids, seq.prompt_segs, answer)


def collate(rows: list[Row], window_lo: int, length: int) -> tuple[torch.Tensor, ...]:
    """Right-pad to `length` with segment 0 (never attended to) -> ids, segs (B, T) and
    window-relative targets (B, T), IGNORE where there is no target."""
    T = length
    if (longest := max(len(r.ids) for r in rows)) > T:
        raise ValueError(f"a training row of {longest} ids is longer than {T}")
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    segs = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.ids)
        ids[b, :n], segs[b, :n] = torch.tensor(r.ids), torch.tensor(r.segs)
        tgt = torch.tensor(r.targets)
        targets[b, :n] = torch.where(tgt == IGNORE, tgt, tgt - window_lo)
    return ids, segs, targets
