"""The fused CPU sampling kernel against a plain numpy reference of the same semantics, plus
properties (filters, tie rules, the distribution of draws) and wrapper validation."""

import numpy as np
import pytest

from facert.kernels.sampling import sample

FLOAT_MAX = np.float32(np.finfo(np.float32).max)
# Distance from a decision boundary (a CDF step or the top-p cut) within which float rounding may
# legitimately flip the outcome; rows that close are not compared.
BOUNDARY = 1e-6


def sanitize(x: np.ndarray) -> np.ndarray:
    """NaN counts as masked, +inf as the largest float (the kernel's contract)."""
    return np.minimum(np.where(np.isnan(x), -np.inf, x), FLOAT_MAX).astype(np.float32)


def filtered_probs(
    row: np.ndarray, t: float, k: int, p: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Temperature, top-k, softmax, top-p for one sampling row (t > 0, not fully masked).

    Returns the kept indices (ascending), their renormalised probabilities and the distance of the
    closest top-p decision from its boundary (inf when top-p is off)."""
    vocab = row.shape[0]
    x = sanitize(sanitize(row) / np.float32(t))  # [V] float32, like the kernel
    keep = x > -np.inf
    if 0 < k < vocab:
        kth = np.sort(x)[::-1][k - 1]
        keep &= x >= kth  # ties with the k-th value survive
    idx = np.flatnonzero(keep)  # [n]
    w = np.exp(x[idx].astype(np.float64) - np.float64(x.max()))
    probs = w / w.sum()
    margin = np.inf
    if 0 < p < 1:
        order = np.lexsort((idx, -probs))  # probability descending, lower index on ties
        before = np.concatenate(([0.0], np.cumsum(probs[order])[:-1]))  # mass admitted earlier
        admitted = (np.arange(idx.size) == 0) | (before <= p)
        if idx.size > 1:
            margin = float(np.abs(before[1:] - p).min())
        chosen = np.sort(order[admitted])
        idx, probs = idx[chosen], probs[chosen] / probs[chosen].sum()
    return idx, probs, margin


def reference_row(row: np.ndarray, t: float, k: int, p: float, u: float) -> tuple[int, float]:
    """The token for one row and the distance of u (or the top-p cut) from its nearest boundary."""
    if not t > 0:
        return int(np.argmax(sanitize(row))), np.inf
    if not (sanitize(row) > -np.inf).any():
        return 0, np.inf
    idx, probs, margin = filtered_probs(row, t, k, p)
    cdf = np.cumsum(probs)
    margin = min(margin, float(np.abs(cdf - u).min()))
    crossed = np.flatnonzero(cdf > u)
    token = idx[crossed[0]] if crossed.size else idx[probs > 0][-1]
    return int(token), margin


def make_logits(rng: np.random.Generator, rows: int, vocab: int) -> np.ndarray:
    """[rows, vocab] float32 with a mix of heavy ties, masked (-inf) tokens and masked rows."""
    logits = rng.normal(0.0, 3.0, (rows, vocab)).astype(np.float32)
    kind = rng.integers(0, 5, rows)
    logits[kind == 1] = np.round(logits[kind == 1])  # many exact ties
    masked = rng.random((rows, vocab)) < 0.2
    logits[(kind == 2)[:, None] & masked] = -np.inf
    nearly_all = rng.random((rows, vocab)) < 0.995  # fewer finite tokens than top-k asks for
    logits[(kind == 3)[:, None] & nearly_all] = -np.inf
    if rows > 2:
        logits[rows // 2] = -np.inf  # every token masked
    return logits


def random_params(rng: np.random.Generator, rows: int, vocab: int) -> tuple[np.ndarray, ...]:
    temperature = rng.choice(np.array([0.0, 0.7, 1.0, 1.5], np.float32), rows)
    top_k = rng.choice(np.array([0, 1, 5, 70, 2000, vocab], np.int32), rows)  # 2000: large-k path
    top_p = rng.choice(np.array([0.0, 0.5, 0.9, 1.0], np.float32), rows)
    uniform = rng.random(rows, dtype=np.float32)
    return temperature, top_k, top_p, uniform


@pytest.mark.parametrize(
    ("rows", "vocab", "seed"),
    [
        (64, 1, 0),
        (64, 2, 1),
        (64, 7, 2),
        (64, 100, 3),
        (48, 1000, 4),
        (40, 31546, 5),
        (1, 31546, 6),
    ],
)
def test_matches_reference(rows: int, vocab: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(3):
        logits = make_logits(rng, rows, vocab)
        params = random_params(rng, rows, vocab)
        got = sample(logits, *params)
        assert got.dtype == np.int64 and got.shape == (rows,)
        skipped = 0
        for r in range(rows):
            t, k, p, u = (a[r].item() for a in params)
            want, margin = reference_row(logits[r], t, k, p, u)
            if margin < BOUNDARY:
                skipped += 1
                continue
            assert got[r] == want, f"row {r}: t={t} k={k} p={p} u={u}"
        assert skipped <= max(1, rows // 20)


def test_top_k_one_is_greedy() -> None:
    rng = np.random.default_rng(10)
    logits = rng.normal(0.0, 3.0, (64, 31546)).astype(np.float32)  # continuous: no tied maximum
    ones = np.ones(64, np.float32)
    got = sample(logits, ones, np.ones(64, np.int32), np.zeros(64, np.float32), rng.random(64))
    np.testing.assert_array_equal(got, logits.argmax(axis=1))


def test_tokens_stay_inside_top_k_and_nucleus() -> None:
    rng = np.random.default_rng(11)
    rows, vocab = 256, 500
    logits = rng.normal(0.0, 2.0, (rows, vocab)).astype(np.float32)
    logits[:, ::7] = np.round(logits[:, ::7])  # some ties
    temperature = rng.choice(np.array([0.7, 1.0, 1.5], np.float32), rows)
    top_k = rng.choice(np.array([0, 5, 70], np.int32), rows)
    top_p = rng.choice(np.array([0.0, 0.5, 0.9], np.float32), rows)
    got = sample(logits, temperature, top_k, top_p, rng.random(rows, dtype=np.float32))
    for r in range(rows):
        x = logits[r] / temperature[r]
        if top_k[r]:
            assert x[got[r]] >= np.sort(x)[::-1][top_k[r] - 1]
        kept, _, _ = filtered_probs(logits[r], temperature[r], top_k[r], top_p[r])
        assert got[r] in kept


def test_ties_at_the_kth_value_are_kept() -> None:
    # k = 2 but four tokens share the 2nd-largest value: all of them stay candidates, so a tied
    # token at sorted position 4 (index 4) is drawn when u is large.
    logits = np.array([[1.0, 5.0, 5.0, 5.0, 5.0, 0.0]], np.float32)
    draw = [
        sample(logits, [1.0], [2], [0.0], [u])[0]
        for u in np.linspace(0.0, 0.999, 50, dtype=np.float32)
    ]
    assert set(draw) == {1, 2, 3, 4}
    assert sample(logits, [1.0], [2], [0.0], [0.99])[0] == 4


def test_exact_boundaries() -> None:
    # Equal logits make every sum exact, so the boundary rules are visible: the draw is the first
    # token whose CDF is strictly above u, and top-p admits a token when the mass before it is
    # exactly top_p.
    flat = np.zeros((4, 4), np.float32)
    ones, off = np.ones(4), np.zeros(4)
    draws = sample(flat, ones, off, off, [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_array_equal(draws, [0, 1, 2, 3])
    nucleus = sample(flat, ones, off, np.full(4, 0.5), [0.0, 0.3, 0.6, 0.99])
    np.testing.assert_array_equal(nucleus, [0, 0, 1, 2])  # {0, 1, 2}: mass before token 2 is 0.5


def test_greedy_takes_first_maximum() -> None:
    logits = np.array(
        [[1.0, 3.0, 3.0, 2.0], [np.nan, 0.0, 0.0, -1.0], [-np.inf] * 4, [0.0, np.inf, 1.0, np.inf]],
        np.float32,
    )
    got = sample(logits, [0.0, -1.0, 0.0, 0.0], [0] * 4, [0.0] * 4, [0.5] * 4)
    np.testing.assert_array_equal(got, [1, 1, 0, 1])


def test_masked_tokens_are_never_drawn() -> None:
    rng = np.random.default_rng(12)
    logits = np.full((1000, 8), -np.inf, np.float32)
    logits[:, 3] = 0.0
    logits[:, 5] = np.nan
    logits[:500, 6] = 1.0
    got = sample(logits, np.ones(1000), np.zeros(1000), np.zeros(1000), rng.random(1000))
    assert set(got[:500]) == {3, 6} and set(got[500:]) == {3}
    every_masked = np.full((1, 8), -np.inf, np.float32)
    assert sample(every_masked, [1.0], [0], [0.9], [0.3])[0] == 0


def test_draw_frequencies_follow_filtered_softmax() -> None:
    rng = np.random.default_rng(13)
    vocab, draws = 200, 40_000
    row = rng.normal(0.0, 2.0, vocab).astype(np.float32)
    t, k, p = 0.8, 60, 0.9
    kept, probs, _ = filtered_probs(row, t, k, p)
    got = sample(
        np.broadcast_to(row, (draws, vocab)),
        np.full(draws, t),
        np.full(draws, k),
        np.full(draws, p),
        rng.random(draws, dtype=np.float32),
    )
    counts = np.bincount(got, minlength=vocab)
    assert counts.sum() == counts[kept].sum()  # nothing outside the filtered set
    expected = probs * draws
    chi2 = float((((counts[kept] - expected) ** 2) / expected).sum())
    dof = kept.size - 1
    assert dof > 5
    assert chi2 < dof + 5.0 * np.sqrt(2.0 * dof)  # ~5 sigma above the chi-square mean


def test_converts_dtypes_and_layout() -> None:
    rng = np.random.default_rng(14)
    logits = rng.normal(0.0, 1.0, (100, 6)).T  # float64, not C-contiguous: [6, 100]
    params = ([1.0] * 6, [0, 3, 0, 3, 0, 3], [0.0, 0.0, 0.9, 0.9, 0.5, 0.5], rng.random(6))
    got = sample(logits, *params)
    np.testing.assert_array_equal(got, sample(np.ascontiguousarray(logits, np.float32), *params))
    assert sample(np.zeros((0, 6), np.float32), [], [], [], []).shape == (0,)


@pytest.mark.parametrize(
    ("logits", "temperature", "top_k", "top_p", "uniform"),
    [
        (np.zeros(5), [1.0], [0], [0.0], [0.5]),  # 1-D logits
        (np.zeros((2, 0)), [1.0] * 2, [0] * 2, [0.0] * 2, [0.5] * 2),  # empty vocabulary
        (np.zeros((2, 5)), [1.0], [0] * 2, [0.0] * 2, [0.5] * 2),  # short temperature
        (np.zeros((2, 5)), [1.0] * 2, [[0, 0]], [0.0] * 2, [0.5] * 2),  # 2-D top_k
        (np.zeros((2, 5)), [1.0] * 2, [0] * 2, [0.0] * 3, [0.5] * 2),  # long top_p
        (np.zeros((2, 5)), [1.0] * 2, [0] * 2, [0.0] * 2, 0.5),  # scalar uniform
        (np.zeros((2, 5)), [1.0] * 2, [0] * 2, [0.0] * 2, [0.5, 1.0]),  # u outside [0, 1)
    ],
)
def test_rejects_bad_arguments(logits, temperature, top_k, top_p, uniform) -> None:
    with pytest.raises(ValueError):
        sample(logits, temperature, top_k, top_p, uniform)
