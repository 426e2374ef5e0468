"""Request state: everything about one running sequence, and nothing about how it is run."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOP_K = 70  # the reference's default top-k, everywhere a call does not say otherwise


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 0 disable those filters (reference defaults:
    temperature 1, top_k 70, top_p 0)."""

    temperature: float = 1.0
    top_k: int = TOP_K
    top_p: float = 0.0
    seed: int = 0


GREEDY = SamplingParams(temperature=0.0, top_k=0)


def philox(seed: int, stream: int = 0) -> np.random.Generator:
    """The one RNG: Philox keyed by (seed, stream), so sample i of a seed is reproducible
    whatever the batch it ran in and whichever backend ran it."""
    return np.random.Generator(np.random.Philox(key=np.array([seed, stream], dtype=np.uint64)))


@dataclass(eq=False)  # a running sequence is itself, whatever its contents
class Sequence:
    prompt_ids: np.ndarray  # (T,) int64
    prompt_segs: np.ndarray  # (T,) int64, 1 = prefix, 2 = generated side
    window: tuple[int, int]  # vocabulary ids [lo, hi) this sequence may produce
    max_new_tokens: int
    params: SamplingParams = GREEDY
    stop_id: int | None = None  # stop after producing this id (it is kept in `generated`)
    forced: list[int] | None = None  # teacher-forced continuation (scoring) instead of sampling
    stream: int = 0
    # Leading prompt ids (all segment 1) that other sequences share, e.g. every question about
    # one face: prefilled once and copied (kv_cache.PrefixCache); 0 = prefill the whole prompt.
    shared_prefix: int = 0
    # Prompt positions [start, stop) that hold image codes: FaceModel builds a request's
    # sequences before its image is encoded and the engine thread writes the codes there
    # (Templates.place_codes) just before the first prefill.
    image_span: tuple[int, int] | None = None
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each generated id, in its window
    slot: int = -1

    def __post_init__(self) -> None:
        self.rng = philox(self.params.seed, self.stream)

    @property
    def done(self) -> bool:
        if self.forced is not None:
            return len(self.generated) >= len(self.forced)
        if self.generated and self.generated[-1] == self.stop_id:
            return True
        return len(self.generated) >= self.max_new_tokens

    @property
    def tokens_left(self) -> int:
        """Tokens still to produce, at most: a text row may stop sooner at its stop id."""
        if self.done:
            return 0
        total = len(self.forced) if self.forced is not None else self.max_new_tokens
        return total - len(self.generated)

    @property
    def writes_text(self) -> bool:
        """Its window is the wordpiece one (ids from 0), not the image codes after it: the
        text head is the costlier one."""
        return self.window[0] == 0

    @property
    def last_position(self) -> int:
        """Position of the newest token, i.e. where the next decode step feeds it."""
        return len(self.prompt_ids) + len(self.generated) - 1
