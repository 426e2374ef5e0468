"""Contestant (a): the reference Talk2Face algorithm (spec §5), on the same weights.

Every generated token is one full prefix-LM forward over the whole sequence (no cache), its
last position's logits over the full vocabulary, top-k 70 (ties at the k-th kept), softmax,
one multinomial draw, appended with segment 2. A whole reference image takes minutes, so the
scenarios time single steps at a few sequence lengths and sum the interpolated costs over the
lengths a task passes through; `check` runs the real loop for a few steps to show the model
of the time holds, and `time_face` runs it to the end once for the headline ratio.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from facert.export.lm import Talk2FaceLM
from facert.runtime.backends.torch_backend import TorchBackend
from facert.runtime.config import LM_FILE, VQGAN_FILE, load_config, read_model
from facert.runtime.sequence import TOP_K


def pick(logits: torch.Tensor, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """The reference's sampler on a (V,) row; top_k 0 means greedy (argmax)."""
    if top_k == 0:
        return logits.argmax()
    kth = torch.topk(logits, top_k).values[-1]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[0]


@torch.inference_mode()
def generate(
    lm: Talk2FaceLM,
    ids: np.ndarray,
    segs: np.ndarray,
    steps: int,
    top_k: int = TOP_K,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Exactly the reference loop: `steps` full forwards of a growing sequence."""
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
    segs_t = torch.as_tensor(np.asarray(segs, dtype=np.int64))[None]
    two = torch.full((1, 1), 2, dtype=torch.int64)
    out = []
    for _ in range(steps):
        token = pick(lm(ids_t, segs_t)[0, -1], top_k, generator)
        ids_t = torch.cat([ids_t, token.view(1, 1)], dim=1)
        segs_t = torch.cat([segs_t, two], dim=1)
        out.append(int(token))
    return out


class Reference:
    """The reference algorithm on a model directory's weights, and a model of its running time."""

    name = "reference (full recompute, torch fp32)"

    def __init__(self, model_dir: Path):
        self.config = load_config(model_dir)
        files = read_model(model_dir, keep=(LM_FILE, VQGAN_FILE))
        self.backend = TorchBackend(files, self.config)  # the exact LM and VQGAN, fp32
        self.lengths: list[int] = []
        self.costs: list[float] = []

    def _sequence(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(length)
        return rng.integers(0, self.config.lm.vocab_size, length), np.ones(length, dtype=np.int64)

    def calibrate(self, lengths: list[int], repeats: int = 3) -> None:
        """Median seconds of one reference step (forward + sampling) at each sequence length."""
        self.lengths = sorted(set(lengths))
        self.costs = []
        for length in self.lengths:
            ids, segs = self._sequence(length)
            generate(self.backend.lm, ids, segs, 1)  # warm
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                generate(self.backend.lm, ids, segs, 1)
                times.append(time.perf_counter() - t)
            self.costs.append(statistics.median(times))

    def step_costs(self, prompt_len: int, steps: int) -> np.ndarray:
        """Modelled seconds of each step from a prompt of `prompt_len` ids (interpolated)."""
        return np.interp(np.arange(prompt_len, prompt_len + steps), self.lengths, self.costs)

    def check(self, prompt_len: int, steps: int) -> dict:
        """Run the real loop for `steps` steps and compare with the model's prediction."""
        ids, segs = self._sequence(prompt_len)
        t = time.perf_counter()
        generate(self.backend.lm, ids, segs, steps, generator=torch.Generator().manual_seed(0))
        measured = time.perf_counter() - t
        modelled = float(self.step_costs(prompt_len, steps).sum())
        return {"prompt_len": prompt_len, "steps": steps, "measured_s": measured,
                "modelled_s": modelled, "error": modelled / measured - 1}  # fmt: skip

    def time_face(self, prompt_len: int, seed: int = 0) -> dict:
        """The reference drawing one face, really run end to end: a full forward per code
        (256) from a prompt of `prompt_len` ids, then the VQGAN decode (minutes on the base
        shape). An id the full-vocabulary sampler drew outside the image codes (random
        weights do) is clipped to a code, which costs the decoder nothing."""
        ids, segs = self._sequence(prompt_len)
        lm, n = self.config.lm, self.config.vqgan.num_codes_per_image
        start = time.perf_counter()
        rng = torch.Generator().manual_seed(seed)
        tokens = generate(self.backend.lm, ids, segs, n, generator=rng)
        drawn = time.perf_counter()
        codes = np.clip(np.array(tokens) - lm.text_vocab_size, 0, lm.image_vocab_size - 1)
        self.backend.decode_images(codes[None])
        end = time.perf_counter()
        return {"prompt_len": prompt_len, "steps": n, "lm_s": drawn - start, "total_s": end - start}

    def vqgan_seconds(self) -> dict:
        """The reference's VQGAN encode and decode of one image (taming's math, torch fp32)."""
        vq = self.config.vqgan
        codes = np.zeros((1, vq.num_codes_per_image), dtype=np.int64)
        images = np.zeros((1, vq.in_channels, vq.resolution, vq.resolution), dtype=np.float32)
        out = {}
        for name, fn in (
            ("encode", lambda: self.backend.encode_images(images)),
            ("decode", lambda: self.backend.decode_images(codes)),
        ):
            fn()
            t = time.perf_counter()
            fn()
            out[name] = time.perf_counter() - t
        return out
