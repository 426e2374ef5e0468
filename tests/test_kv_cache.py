"""KV-cache decoding equals the full-recompute forward at every step."""

from __future__ import annotations

import numpy as np
import pytest

from facert.runtime.kv_cache import SlotPool, kv_bytes_per_slot
from facert.runtime.sequence import SamplingParams


def _full_vs_cached(backend, ids, segs, prompt_len, slot, window):
    full = backend.forward_logits(ids, segs)[:, window[0] : window[1]]  # (L, W)
    scale = np.abs(full).max()
    hidden = backend.prefill(np.array([slot]), [ids[:prompt_len]], [segs[:prompt_len]])
    step = backend.head(hidden, window)
    errors = [np.abs(step[0] - full[prompt_len - 1]).max() / scale]
    for p in range(prompt_len, len(ids)):
        step = backend.head(backend.decode(np.array([slot]), ids[p : p + 1], np.array([p])), window)
        errors.append(np.abs(step[0] - full[p]).max() / scale)
    return max(errors)


def test_decode_equals_full_recompute_for_many_steps(any_model):
    """A to_image prompt followed by 60 random image codes, decoded one at a time."""
    rng = np.random.default_rng(0)
    m = any_model
    seq = m.templates.to_image("a smiling young woman", SamplingParams(seed=1), 0)
    codes = rng.integers(m.config.lm.text_vocab_size, m.config.lm.vocab_size, 60)
    ids = np.concatenate([seq.prompt_ids, codes])
    segs = np.concatenate([seq.prompt_segs, np.full(60, 2)])
    err = _full_vs_cached(m.backend, ids, segs, len(seq.prompt_ids), 3, m.templates.image_window)
    assert err < 1e-5


@pytest.mark.parametrize("i", [0, 4, 5])
def test_golden_sequences_decode_like_full_forward(any_model, lm_golden, i):
    ids, segs = lm_golden[f"src{i}"], lm_golden[f"seg{i}"]
    prompt_len = int((segs == 1).sum())
    err = _full_vs_cached(
        any_model.backend, ids, segs, prompt_len, 0, (0, any_model.config.lm.vocab_size)
    )
    assert err < 1e-5


def test_batched_rows_with_different_lengths(any_model, lm_golden):
    """Two rows of different prompt lengths share every prefill and decode call."""
    b = any_model.backend
    rows = [0, 4]
    ids = [lm_golden[f"src{i}"] for i in rows]
    segs = [lm_golden[f"seg{i}"] for i in rows]
    plen = [int((s == 1).sum()) for s in segs]
    full = [b.forward_logits(x, s) for x, s in zip(ids, segs)]
    slots = np.array([5, 2])
    V = any_model.config.lm.vocab_size
    hidden = b.prefill(
        slots, [x[:p] for x, p in zip(ids, plen)], [s[:p] for s, p in zip(segs, plen)]
    )
    out = b.head(hidden, (0, V))
    for r in range(2):
        np.testing.assert_allclose(out[r], full[r][plen[r] - 1], atol=1e-5 * np.abs(full[r]).max())
    for t in range(min(len(x) - p for x, p in zip(ids, plen))):
        pos = np.array([p + t for p in plen])
        out = b.head(b.decode(slots, np.array([ids[r][pos[r]] for r in range(2)]), pos), (0, V))
        for r in range(2):
            np.testing.assert_allclose(out[r], full[r][pos[r]], atol=1e-5 * np.abs(full[r]).max())


def test_slot_pool_budget_and_reuse(tiny_model):
    cfg = tiny_model.config.lm
    per_slot = kv_bytes_per_slot(cfg, 334)
    assert per_slot == 2 * cfg.n_layer * cfg.n_embd * 334 * 4
    pool = SlotPool.for_budget(cfg, 334, 3 * per_slot + 1)
    assert pool.num_slots == 3
    taken = [pool.acquire() for _ in range(3)]
    assert sorted(taken) == [0, 1, 2] and pool.num_free == 0
    pool.release(taken[1])
    assert pool.acquire() == taken[1]
    for slot in (2, 0, 1):
        pool.release(slot)
    assert [pool.acquire() for _ in range(3)] == [0, 1, 2]  # lowest first, whatever the order
    with pytest.raises(ValueError):
        pool.release(7)


def test_rows_finishing_early_leave_and_the_rest_score_as_alone(any_model):
    """Teacher-forced rows of different lengths finish at different steps: each leaves the
    batch at once, freeing its slot, and the survivors score exactly as they do alone."""
    m = any_model
    codes = np.arange(m.config.vqgan.num_codes_per_image) % m.config.vqgan.n_embed
    answers = [[1010], [2000, 3746, 1010, 102], [1996, 2711, 102], [5907, 1024, 2402, 1012, 102]]

    def rows():
        return [m.templates.to_attribute(codes, "gender", forced=a) for a in answers]

    alone = []
    for seq in rows():
        m.engine.run([seq])
        alone.append(seq.logprobs)
    events = []
    m.engine.observers.append(events.append)
    try:
        batch = rows()
        m.engine.run(batch)
    finally:
        m.engine.observers.remove(events.append)
    assert [(e.kind, e.rows) for e in events] == [
        ("prefill", 4), ("decode", 3), ("decode", 3), ("decode", 2), ("decode", 1)
    ]  # fmt: skip
    for seq, ref in zip(batch, alone):
        np.testing.assert_allclose(seq.logprobs, ref, atol=1e-4)
    assert m.engine.idle


def test_a_full_pool_runs_to_completion(tiny_model_dir):
    """Every slot busy: the batch still completes and frees them all."""
    import facert

    m = facert.load(tiny_model_dir, backend="torch", num_slots=2)
    codes = np.zeros(m.config.vqgan.num_codes_per_image, dtype=np.int64)
    seqs = [m.templates.to_attribute(codes, "gender", forced=[1010, 102]) for _ in range(2)]
    m.engine.run(seqs)
    assert all(len(s.logprobs) == 2 for s in seqs) and m.engine.idle
