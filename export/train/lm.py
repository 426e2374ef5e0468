"""Train the bundled model's small Talk2Face LM on VQGAN codes of synthetic faces (CPU).

Every step takes a batch of faces and trains the three tasks on them with the runtime's
templates: a fresh caption -> the face's codes (to_image), for every face of the batch; for the
first `text_faces` of them also the codes -> another fresh caption (to_caption), and the codes ->
every attribute's answer (to_attributes, the questions packed into one row). Drawing is the
hardest task, so it gets the most rows, and a second stage (STAGES) continues with drawing rows
and only a few reading rows. Some drawing captions name only a few attributes, as people's
descriptions do; captions to learn always name all of them. The LM is
`facert.export.lm.Talk2FaceLM` unchanged; only packed rows need a mask of their own.

    python -m facert.export.train.lm -o train-out   # needs vocab.txt and vqgan.safetensors there
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from facert.export.lm import Talk2FaceLM
from facert.export.vqgan import VQGAN
from facert.runtime.config import LMConfig, ModelConfig
from facert.runtime.images import scale_pixels
from facert.runtime.tasks import Templates
from facert.runtime.tokenizer import WordPieceTokenizer

from . import common
from . import vqgan as vq
from .common import Log, learning_rate, resume, save_checkpoint, script_main, set_lr, setup
from .data import (
    PROMPTS,
    SPECIAL_TOKENS,
    TRAIN_SEED,
    VALID_SEED,
    attribute_values,
    caption_of,
    faces,
)
from .sequences import IGNORE, attribute_row, caption_row, collate, group_mask_bias, image_row

N_LAYER, N_HEAD, N_EMBD = 4, 4, 192  # 2.1M parameters: the bundled files must stay small
# generate_faces keeps the best of this many drawings: faithfulness on 1000 held-out faces is
# 67.6% from one drawing, 82.7% from the best of 16 and 85.1% from the best of 32 (about 21x the
# time); the best of 4 and of 8 reached 79% and 81% on 300 faces.
IMAGE_CANDIDATES = 32
# Score mode reads each face this many ways (itself, mirrored, shifted right and left) and
# averages: attribute accuracy on 400 validation faces is 93.4% from one view, 94.4% from two,
# 94.7% from four (about 3.3x the time of one).
SCORE_VIEWS = 4
SEQ_LENGTH = 144  # longest template: 69-id caption prompt + a 55-word caption + [SEP], with room
N_FACES = 30000  # faces whose codes are precomputed: each is drawn about four times
BATCH, WARMUP = 32, 50
PARTIAL_CAPTIONS = 0.3  # share of drawing captions that name a random subset of attributes
# Rows are padded to one length per task so that torch.compile builds each graph once (about
# 1.7x faster steps): image 64 prompt ids + 64 codes; caption 69 + at most 55 words + [SEP];
# attributes 69 + 37 ids of eight questions and answers.
PAD_TO = {"image": 128, "caption": 128, "attr": 112}


@dataclass(frozen=True)
class Stage:
    """One pass over fresh batches with its own optimizer and learning-rate schedule."""

    name: str
    steps: int
    peak_lr: float
    text_faces: int  # faces of each batch that also train captioning and attribute answers


# Stage 1 learns the three tasks together. Drawing learns small attributes (eyewear, hair colour)
# last, so stage 2 spends most of each step on it; its few reading rows keep captions and
# answers from being forgotten (drawing rows alone drop both to near chance within 1200 steps).
STAGES = (Stage("tasks", 4000, 1e-3, 24), Stage("drawing", 2500, 3e-4, 8))
VALID_TEXT_FACES = 24
WEIGHTS, VOCAB = "lm.safetensors", "vocab.txt"


def bundled_config(text_vocab_size: int) -> ModelConfig:
    """facert.json of the bundled model, for a vocabulary of `text_vocab_size` entries."""
    lm = LMConfig(
        vocab_size=text_vocab_size + vq.CONFIG.n_embed, text_vocab_size=text_vocab_size,
        n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, n_ffn=4 * N_EMBD,
        max_positions=SEQ_LENGTH, seq_length=SEQ_LENGTH,
    )  # fmt: skip
    return ModelConfig(
        name="talk2face-synth", lm=lm, vqgan=vq.CONFIG, image_scaling=vq.IMAGE_SCALING,
        prompts=dict(PROMPTS), attributes=attribute_values(),
        cls_id=SPECIAL_TOKENS.index("[CLS]"), sep_id=SPECIAL_TOKENS.index("[SEP]"),
        image_candidates=IMAGE_CANDIDATES, reading_views=SCORE_VIEWS,
    )  # fmt: skip


@torch.no_grad()
def encode_faces(out_dir: Path, seed: int, n: int) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Codes (int64 [n, 64]) and attributes of faces 0..n-1 of a dataset, cached in out_dir."""
    path = out_dir / f"codes-{seed}-{n}.npz"
    if path.is_file():
        data = np.load(path)
        return data["codes"].astype(np.int64), json.loads(str(data["attributes"]))
    model = VQGAN(vq.CONFIG)
    model.load_state_dict(load_file(str(out_dir / vq.WEIGHTS)))
    model.eval()
    codes, attributes = [], []
    for start in range(0, n, 256):
        images, attrs = faces(seed, range(start, min(n, start + 256)), vq.CONFIG.resolution)
        codes.append(model.encode(torch.from_numpy(scale_pixels(images, vq.IMAGE_SCALING))))
        attributes += attrs
        print(f"encoded {start + len(attrs)}/{n} faces of seed {seed}", flush=True)
    codes = torch.cat(codes).numpy()
    np.savez(path, codes=codes.astype(np.int16), attributes=json.dumps(attributes))
    return codes, attributes


def init_weights(lm: Talk2FaceLM) -> None:
    """GPT-2 style: N(0, 0.02), zero biases, residual projections scaled by depth."""
    for name, p in lm.named_parameters():
        if name.endswith("bias") and "ln" not in name:
            nn.init.zeros_(p)
        elif p.dim() == 2:
            std = 0.02 / (2 * lm.cfg.n_layer) ** 0.5 if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, std=std)


def make_rows(
    t: Templates, codes: np.ndarray, attributes: list[dict], indices, step: int, text_faces: int
):
    """The step's rows per task: (image rows, caption rows, attribute rows); `step` counts
    across stages, so every step draws fresh captions."""
    rng = np.random.default_rng([3, step])
    names = list(t.config.attributes)
    image, text, answers = [], [], []
    for k, i in enumerate(indices):
        a = attributes[i]
        said = ()
        if rng.random() < PARTIAL_CAPTIONS:
            said = tuple(map(str, rng.choice(names, rng.integers(1, len(names)), replace=False)))
        image.append(image_row(t, caption_of(a, 2 * step, i, said), codes[i], rng))
        if k < text_faces:
            text.append(caption_row(t, codes[i], caption_of(a, 2 * step + 1, i)))
            order = rng.permutation(names)
            answers.append(attribute_row(t, codes[i], {str(n): a[n] for n in order}))
    return image, text, answers


def full_hidden(lm: Talk2FaceLM):
    """(B, T) ids, segments, positions, groups -> (B, T, C) hidden states of a full forward."""

    def hidden(ids, segs, positions, groups):  # (B, T) each -> (B, T, C)
        return lm.hidden(ids, segs, positions, group_mask_bias(segs, groups))

    return hidden


def task_loss(lm: Talk2FaceLM, hidden, rows, window, length: int) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over a task's targets, softmax over its window; and top-1 accuracy."""
    ids, segs, positions, groups, targets = collate(rows, window[0], length)
    h = hidden(ids, segs, positions, groups)  # (B, T, C)
    keep = targets != IGNORE  # (B, T)
    logits = lm.logits(h[keep], window)  # (N, W)
    loss = F.cross_entropy(logits, targets[keep])
    return loss, (logits.argmax(-1) == targets[keep]).float().mean().item()


def losses(lm: Talk2FaceLM, hidden, t: Templates, batch) -> tuple[torch.Tensor, dict]:
    image, text, answers = batch
    total, metrics = 0.0, {}
    for task, rows, window in (
        ("image", image, t.image_window), ("caption", text, t.text_window),
        ("attr", answers, t.text_window),
    ):  # fmt: skip
        loss, acc = task_loss(lm, hidden, rows, window, PAD_TO[task])
        total = total + loss
        metrics[task] = loss.item()
        metrics[f"{task}_acc"] = acc
    return total, metrics


def train(out_dir: Path) -> Path:
    """Train (or resume) every stage and write `lm.safetensors` in out_dir. Each stage starts
    from the weights the one before wrote (`lm-<stage>.safetensors`); a stage whose weights
    exist is skipped."""
    setup(1)
    tokenizer = WordPieceTokenizer(out_dir / VOCAB)
    config = bundled_config(tokenizer.vocab_size)
    t = Templates(config, tokenizer)
    codes, attributes = encode_faces(out_dir, TRAIN_SEED, N_FACES)
    valid_codes, valid_attributes = encode_faces(out_dir, VALID_SEED, 48)
    valid = make_rows(t, valid_codes, valid_attributes, range(48), 0, VALID_TEXT_FACES)
    lm = Talk2FaceLM(config.lm)
    init_weights(lm)
    first_step = 0
    for stage in STAGES:
        path = out_dir / f"lm-{stage.name}.safetensors"
        if path.is_file():  # finished in an earlier run
            lm.load_state_dict(load_file(str(path)))
        else:
            train_stage(lm, stage, first_step, out_dir / f"lm-{stage.name}.ckpt", t, codes,
                        attributes, valid)  # fmt: skip
            common.save_weights(lm, path)
        first_step += stage.steps
    common.save_weights(lm, out_dir / WEIGHTS)
    return out_dir / WEIGHTS


def train_stage(
    lm: Talk2FaceLM, stage: Stage, first_step: int, checkpoint: Path, t: Templates,
    codes: np.ndarray, attributes: list[dict], valid,
) -> None:  # fmt: skip
    """One stage from a fresh AdamW, resuming from its checkpoint if there is one."""
    decay, rest = [], []
    for name, p in lm.named_parameters():
        (decay if p.dim() == 2 and name != "wpe.weight" else rest).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=stage.peak_lr, betas=(0.9, 0.98),
    )  # fmt: skip
    start = resume(checkpoint, lm=lm, optimizer=optimizer)
    train_hidden = torch.compile(full_hidden(lm), dynamic=False)
    log = Log(f"lm {stage.name}", stage.steps, every=10)
    for step in range(start, stage.steps):
        lm.train()
        lr = learning_rate(step, stage.steps, stage.peak_lr, WARMUP)
        set_lr(optimizer, lr)
        data_step = first_step + step
        indices = np.random.default_rng([4, data_step]).choice(N_FACES, BATCH, replace=False)
        rows = make_rows(t, codes, attributes, indices, data_step, stage.text_faces)
        with common.fast_products():  # the weights stay fp32
            loss, metrics = losses(lm, train_hidden, t, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        log.add(step, lr, **metrics)
        if (step + 1) % 100 == 0 or step + 1 == stage.steps:
            lm.eval()
            with torch.no_grad():
                _, v = losses(lm, full_hidden(lm), t, valid)
            print("lm valid  " + "  ".join(f"{k} {x:.4f}" for k, x in v.items()), flush=True)
            save_checkpoint(checkpoint, step + 1, lm=lm, optimizer=optimizer)


if __name__ == "__main__":
    script_main(__doc__, train)
