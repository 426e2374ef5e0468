"""Training rows for the three Talk2Face tasks, built with the runtime's own templates.

Using `facert.runtime.tasks.Templates` means a row is exactly what inference feeds the model;
the row then continues with what inference would produce, and only those continuation ids are
targets (all in segment 2). Each task has one vocabulary window (image codes or text), and its
loss is a softmax over that window, as sampling and score mode read it.

Attribute questions about one face are packed into one row: the face's prefix once, then every
question with its answer as its own group, which sees the prefix and its own earlier tokens only
and restarts at the position it would have alone. Each group thus computes exactly what its
unpacked row would (`group_mask_bias`), for a fraction of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facert.export.lm import MASK_VALUE
from facert.runtime.sequence import GREEDY
from facert.runtime.tasks import Templates

IGNORE = -100
UNK_RATE = 0.05  # to_image prompt words replaced by [UNK], so unknown user words are ignored


@dataclass
class Row:
    ids: list[int]
    segs: list[int]
    positions: list[int]
    groups: list[int]  # 0 for the prompt's segment 1, then k for the k-th segment-2 run
    targets: list[int]  # target at position i is the id at i + 1, or IGNORE


def _row(prompt_ids: np.ndarray, prompt_segs: np.ndarray, continuation: list[int]) -> Row:
    P, n = len(prompt_ids), len(continuation)
    ids = [*map(int, prompt_ids), *continuation]
    segs = [*map(int, prompt_segs), *([2] * n)]
    targets = [IGNORE] * (P - 1) + continuation + [IGNORE]
    groups = [int(s == 2) for s in segs]
    return Row(ids, segs, list(range(len(ids))), groups, targets[: len(ids)])


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


def attribute_row(t: Templates, codes: np.ndarray, answers: dict[str, str]) -> Row:
    """Every question of `answers` (name -> value, in order) about one face, packed."""
    packed = None
    for group, (name, value) in enumerate(answers.items(), start=1):
        answer = t.candidate_ids(value)
        seq = t.to_attribute(codes, name, forced=answer)
        row = _row(seq.prompt_ids, seq.prompt_segs, answer)
        if packed is None:
            packed = row
            continue
        question = row.segs.index(2)  # the prefix before it is already in the packed row
        packed.ids += row.ids[question:]
        packed.segs += row.segs[question:]
        packed.positions += row.positions[question:]
        packed.groups += [group] * (len(row.ids) - question)
        packed.targets += row.targets[question:]
    if packed is None:
        raise ValueError("no attribute questions to pack")
    return packed


def group_mask_bias(segs: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Additive mask, (B, T) segments and groups -> (B, 1, T, T): key j is visible to query i
    iff j is in segment 1 (the shared prefix), or j <= i in the same segment-2 group. For a row
    with one group it is `facert.export.lm.prefix_mask_bias` on every query but padding."""
    T = segs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segs.device).tril()  # (T, T) [i, j]
    prefix_key = (segs == 1)[:, None, None, :]  # (B, 1, 1, T)
    same_group = (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] > 0)
    visible = prefix_key | (same_group[:, None] & causal)  # (B, 1, T, T)
    return (1.0 - visible.float()) * MASK_VALUE


def collate(rows: list[Row], window_lo: int, length: int) -> tuple[torch.Tensor, ...]:
    """Right-pad to `length` with segment 0 (never attended to) -> ids, segs, positions,
    groups (B, T) and window-relative targets (B, T), IGNORE where there is no target."""
    T = length
    if (longest := max(len(r.ids) for r in rows)) > T:
        raise ValueError(f"a training row of {longest} ids is longer than {T}")
    ids, segs, positions, groups = (torch.zeros(len(rows), T, dtype=torch.long) for _ in range(4))
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.ids)
        ids[b, :n], segs[b, :n] = torch.tensor(r.ids), torch.tensor(r.segs)
        positions[b, :n], groups[b, :n] = torch.tensor(r.positions), torch.tensor(r.groups)
        tgt = torch.tensor(r.targets)
        targets[b, :n] = torch.where(tgt == IGNORE, tgt, tgt - window_lo)
    return ids, segs, positions, groups, targets
