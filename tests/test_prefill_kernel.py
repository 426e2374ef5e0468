"""Prefill in the fused CPU kernel (FusedDecoder.prefill, kernels/cpu/decode.cpp) against the
exact PyTorch model: final hidden states and every position's keys/values, the prefix-LM mask
(segment-1 keys seen by all, segment-2 keys causally, segment-0 keys never), prompts independent
of each other, every product level giving the same bits, and decoding on from a kernel prefill."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facert.kernels.decode import ISA_LEVELS, FusedDecoder, set_isa
from facert.runtime.config import load_config, load_weights
from facert.runtime.sequence import SamplingParams
from tests.test_decode_kernel import portable_library  # noqa: F401 (a fixture)

BUNDLED = Path(__file__).parents[1] / "facert" / "models" / "talk2face-synth"
# Relative to the largest value: float32 products in another order than torch's; int8 weights
# and activations (measured about 1-2e-2 on these models: their random or small weights make
# every layer's activations matter).
BOUNDS = {"fp32": 1e-4, "int8": 6e-2}


def decoder(model_dir: Path, precision: str, library=None) -> FusedDecoder:
    c = load_config(model_dir).lm
    w = load_weights(model_dir / "lm.safetensors")
    return FusedDecoder(w, c.n_head, c.layernorm_eps, precision, threads=2, library=library)


def prompts(model, rng) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A template's real prompt, a random segment-1 prefix with segment-2 tokens after it, and
    one that starts with segment-0 tokens (queries that see no key at all)."""
    seq = model.templates.to_image("a smiling young woman", SamplingParams(seed=1), 0)
    vocab = model.config.lm.vocab_size
    ids = [seq.prompt_ids, rng.integers(0, vocab, 37), rng.integers(0, vocab, 9)]
    segs = [seq.prompt_segs, np.r_[np.ones(20), np.full(17, 2)], np.r_[np.zeros(3), np.full(6, 2)]]
    return [np.asarray(a, np.int64) for a in ids], [np.asarray(s, np.int64) for s in segs]


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def cache(model, slots: int = 6) -> tuple[np.ndarray, np.ndarray]:
    c = model.config.lm
    shape = (c.n_layer, slots, c.n_head, c.seq_length, c.head_dim)  # (L, S, H, M, D)
    rng = np.random.default_rng(3)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(
        np.float32
    )


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_prefill_matches_the_exact_model(tiny_model_dir, tiny_model, precision):
    ids, segs = prompts(tiny_model, np.random.default_rng(0))
    rows = np.array([4, 1, 3])
    torch_backend = tiny_model.backend
    torch_backend.allocate(6, tiny_model.config.lm.seq_length)
    expected = torch_backend.prefill(rows, ids, segs)  # (B, C)
    k, v = cache(tiny_model)
    k_before = k.copy()
    hidden = decoder(tiny_model_dir, precision).prefill(k, v, rows, ids, segs)
    assert hidden.shape == expected.shape and hidden.dtype == np.float32
    bound = BOUNDS[precision]
    assert relative(hidden, expected) < bound
    for row, seg in zip(rows, segs):
        # Keys/values of segment-0 positions are never attended; past layer 0 they come from
        # queries that see no key, which the reference spreads over its padded batch.
        seen = np.flatnonzero(seg > 0)
        for ours, theirs in ((k, torch_backend.k_cache), (v, torch_backend.v_cache)):
            assert relative(ours[:, row][:, :, seen], theirs[:, row][:, :, seen].numpy()) < bound
    # only the prompts' positions of their rows are written
    written = np.zeros(k.shape[1:4:2], bool)  # (S, M)
    for row, prompt in zip(rows, ids):
        written[row, : len(prompt)] = True
    untouched = np.broadcast_to(~written[None, :, None, :, None], k.shape)
    assert np.array_equal(k[untouched], k_before[untouched])


def test_prefill_matches_the_exact_bundled_model():
    import facert

    model = facert.load(BUNDLED, backend="torch", progress=False)
    ids, segs = prompts(model, np.random.default_rng(1))
    model.backend.allocate(3, model.config.lm.seq_length)
    expected = model.backend.prefill(np.arange(3), ids, segs)
    k, v = cache(model, slots=3)
    hidden = decoder(BUNDLED, "fp32").prefill(k, v, np.arange(3), ids, segs)
    assert relative(hidden, expected) < BOUNDS["fp32"]
    assert relative(k[:, 0, :, : len(ids[0])], model.backend.k_cache[:, 0, :, : len(ids[0])]) < 1e-4


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_prompt_gets_the_same_bits_whatever_shares_its_call(tiny_model_dir, tiny_model,
                                                              precision):  # fmt: skip
    """Alone or with other prompts (more rows in the same products), at every product level
    (AVX-512, AVX2, portable, as far as this CPU has them), on 1 or 3 threads: the same bits."""
    rng = np.random.default_rng(2)
    ids, segs = prompts(tiny_model, rng)
    ids, segs = ids + [rng.integers(0, 600, 70)], segs + [np.ones(70, np.int64)]
    rows = np.array([0, 5, 2, 3])
    d = decoder(tiny_model_dir, precision)
    d.threads = 3
    runs = {}
    try:
        for level in ISA_LEVELS:
            if set_isa(level) != level:
                continue
            k, v = cache(tiny_model)
            runs[level] = (d.prefill(k, v, rows, ids, segs), k, v)
    finally:
        set_isa("avx512")
    hidden, k, v = runs["portable"]
    for level, (other_hidden, other_k, other_v) in runs.items():
        assert np.array_equal(_bits(other_hidden), _bits(hidden)), level
        assert np.array_equal(_bits(other_k), _bits(k)) and np.array_equal(_bits(other_v), _bits(v))
    d.threads = 1
    for b, row in enumerate(rows):
        k1, v1 = cache(tiny_model)
        alone = d.prefill(k1, v1, rows[b : b + 1], ids[b : b + 1], segs[b : b + 1])
        assert np.array_equal(_bits(alone[0]), _bits(hidden[b])), b
        T = len(ids[b])
        assert np.array_equal(_bits(k1[:, row, :, :T]), _bits(k[:, row, :, :T]))
        assert np.array_equal(_bits(v1[:, row, :, :T]), _bits(v[:, row, :, :T]))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_decoding_on_from_a_kernel_prefill(tiny_model_dir, tiny_model, precision):
    """Prefill a prompt, then decode 12 image codes teacher-forced: each step's logits match the
    exact model's full forward over the whole sequence."""
    window = tiny_model.templates.image_window
    seq = tiny_model.templates.to_image("an old man with glasses", SamplingParams(seed=1), 0)
    codes = np.random.default_rng(4).integers(window[0], window[1], 12)
    ids = np.concatenate([seq.prompt_ids, codes]).astype(np.int64)
    segs = np.concatenate([seq.prompt_segs, np.full(12, 2)]).astype(np.int64)
    n = len(seq.prompt_ids)
    exact = tiny_model.backend.forward_logits(ids, segs)[n - 1 : -1, window[0] : window[1]]
    d = decoder(tiny_model_dir, precision)
    k, v = cache(tiny_model, slots=2)
    steps = [d.head(d.prefill(k, v, np.array([1]), [ids[:n]], [segs[:n]]), window)[0]]
    for p in range(n, len(ids) - 1):
        hidden = d.step(k, v, np.array([1]), ids[p : p + 1], np.array([p]))
        steps.append(d.head(hidden, window)[0])
    assert relative(np.array(steps), exact) < BOUNDS[precision]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_portable_build_prefill_matches_the_exact_model(
    tiny_model_dir,
    tiny_model,
    precision,
    portable_library,  # noqa: F811
):
    ids, segs = prompts(tiny_model, np.random.default_rng(5))
    tiny_model.backend.allocate(3, tiny_model.config.lm.seq_length)
    expected = tiny_model.backend.prefill(np.arange(3), ids, segs)
    k, v = cache(tiny_model, slots=3)
    d = decoder(tiny_model_dir, precision, library=portable_library)
    assert relative(d.prefill(k, v, np.arange(3), ids, segs), expected) < BOUNDS[precision]


def test_prefill_refuses_out_of_range_arguments(tiny_model_dir, tiny_model):
    d = decoder(tiny_model_dir, "fp32")
    k, v = cache(tiny_model, slots=2)
    before = k.copy()
    ok = np.arange(5, dtype=np.int64)
    M = k.shape[3]
    for rows, ids, segs in (
        ([2], [ok], [np.ones(5)]),  # no such slot
        ([0], [np.arange(M + 1)], [np.ones(M + 1)]),  # longer than the cache
        ([0], [ok + 10**6], [np.ones(5)]),  # no such token
        ([0], [ok], [np.full(5, 3)]),  # no such segment
        ([0], [ok[:0]], [ok[:0]]),  # empty prompt
    ):
        with pytest.raises(ValueError, match="out of range"):
            d.prefill(k, v, np.array(rows), ids, segs)
    assert np.array_equal(k, before)
    with pytest.raises(ValueError, match="one segment id per token"):
        d.prefill(k, v, np.array([0]), [ok], [np.ones(4)])
    assert d.prefill(k, v, np.array([], np.int64), [], []).shape == (0, d.n_embd)
