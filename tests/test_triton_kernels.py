"""The Triton kernels (facert.kernels.triton) under the Triton interpreter, on CPU tensors, against
their numpy references, the C++ sampler and facert's CPU image path: fresh random inputs, outputs
poisoned with NaN (or -1) first so that every element must be written, and the edge cases
(length-1 and full caches, odd head sizes, k >= window, top-p = 1, ties, window ends, border
boxes). The interpreter costs milliseconds per program, so shapes stay small."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

import numpy as np
import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (the test extra installs it)", allow_module_level=True)
torch = pytest.importorskip("torch", reason="torch is not installed")

from facert.kernels.sampling import sample as cpp_sample  # noqa: E402
from facert.kernels.triton import reference as ref  # noqa: E402  (numpy only)


def triton_compiles_for_a_gpu() -> bool:
    """The interpreter is chosen when a jit function is defined, triton's own library functions
    included: once triton is imported without TRITON_INTERPRET=1, this process cannot interpret."""
    if "triton" not in sys.modules:
        return False
    import triton.language.standard

    return type(triton.language.standard.sum).__name__ != "InterpretedFunction"


# FACERT_TRITON_TESTS=cuda (bench/gpu_check.sh sets it) runs the same tests compiled on the GPU
ON_GPU = os.environ.get("FACERT_TRITON_TESTS") == "cuda"
LAUNCHERS = ("decode_attention", "add_layer_norm", "gelu", "sample", "nearest_codes",
             "crop_resize")  # fmt: skip


def on_cuda(launcher, copy=lambda a: a.cuda()):
    """`launcher` on CUDA copies of its tensor arguments: every tensor argument gets the copy's
    contents back (the caches and `out` are written in place), and the result comes back on the
    CPU (the caller's own `out` when the launcher returned it). `copy`: how a copy is made."""

    def call(*args, **kwargs):
        pairs: dict[int, tuple] = {}  # one copy per tensor: `out` may be an input itself

        def move(a):
            if not isinstance(a, torch.Tensor):
                return a
            return pairs.setdefault(id(a), (a, copy(a)))[1]

        result = launcher(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
        for host, device in pairs.values():
            host.copy_(device.cpu())
            if result is device:
                result = host
        return result if result.device.type == "cpu" else result.cpu()

    return call


@pytest.fixture(scope="module")
def tk():
    """The launchers, run by the interpreter on CPU tensors (or compiled for the GPU under
    FACERT_TRITON_TESTS=cuda). triton is imported here, with TRITON_INTERPRET=1 set only while
    this module's tests run (other modules' tests see the variable as it was). If triton was
    imported already for a GPU, test_in_a_fresh_process runs this file in a new process instead."""
    if ON_GPU:
        if not torch.cuda.is_available():
            pytest.skip("FACERT_TRITON_TESTS=cuda, but no CUDA GPU")
        from facert.kernels import triton as kt

        yield types.SimpleNamespace(**{n: on_cuda(getattr(kt, n)) for n in LAUNCHERS})
        return
    if triton_compiles_for_a_gpu():
        pytest.skip("triton was imported for a GPU: test_in_a_fresh_process runs these")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    from facert.kernels import triton as kt

    yield types.SimpleNamespace(**{n: getattr(kt, n) for n in LAUNCHERS})
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def test_in_a_fresh_process():
    if ON_GPU or not triton_compiles_for_a_gpu():
        return  # the tests below run in this process
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# ---- decode attention ----


def run_attention(tk, rng, B, H, D, S, M, positions):
    q, k_new, v_new = (rng.normal(size=(B, H, D)).astype(np.float32) for _ in range(3))
    k_cache = rng.normal(size=(S, H, M, D)).astype(np.float32)
    v_cache = rng.normal(size=(S, H, M, D)).astype(np.float32)
    slots = rng.permutation(S)[:B]
    positions = np.asarray(positions, np.int64)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    want = ref.decode_attention(q, want_k, want_v, k_new, v_new, slots, positions)
    # Poison everything a row must not read: other slots and positions past its own.
    used = np.zeros((S, M), bool)
    for s, p in zip(slots, positions):
        used[s, :p] = True
    for a in (k_cache, v_cache, want_k, want_v):
        a.transpose(0, 2, 1, 3)[~used] = np.nan  # (S, M, H, D) view
    for s, p in zip(slots, positions):  # ... except the position each row writes
        want_k[s, :, p], want_v[s, :, p] = k_new[slots == s][0], v_new[slots == s][0]
    kc, vc = t(k_cache), t(v_cache)
    out = torch.full((B, H, D), float("nan"))
    got = tk.decode_attention(t(q), kc, vc, t(k_new), t(v_new), t(slots), t(positions), out=out)
    assert got is out
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(kc.numpy(), want_k)  # only [slot, :, position] was written
    np.testing.assert_array_equal(vc.numpy(), want_v)


@pytest.mark.parametrize(
    ("B", "H", "D", "S", "M", "positions"),
    [
        (1, 1, 1, 1, 1, [0]),  # length-1 cache, head size 1
        (3, 2, 5, 4, 40, [39, 0, 33]),  # odd head size; full capacity
        (2, 3, 64, 3, 9, [8, 4]),  # GPT-2's head size, full capacity
        (4, 1, 7, 6, 300, [1, 127, 128, 299]),  # tile edges (128 positions a tile), a third tile
    ],
)
def test_decode_attention_matches_reference(tk, B, H, D, S, M, positions):
    run_attention(tk, np.random.default_rng(B * 100 + D), B, H, D, S, M, positions)


def test_decode_attention_random_rows(tk):
    rng = np.random.default_rng(1)
    for _ in range(3):
        B, H, D = rng.integers(1, 4), rng.integers(1, 3), rng.integers(1, 20)
        S, M = B + rng.integers(0, 3), rng.integers(1, 50)
        run_attention(tk, rng, B, H, D, S, M, rng.integers(0, M, B))


def test_decode_attention_refuses_out_of_range_rows(tk):
    rng = np.random.default_rng(2)
    q = t(rng.normal(size=(2, 1, 3)).astype(np.float32))
    cache = torch.zeros((2, 1, 4, 3))
    before = cache.clone()
    out = tk.decode_attention(
        q, cache, cache.clone(), q, q, t(np.array([0, 5])), t(np.array([4, 0]))
    )
    assert torch.isnan(out).all()  # position 4 of a 4-long cache; slot 5 of 2
    assert torch.equal(cache, before)


# ---- sampler ----


def make_logits(rng, rows, vocab):
    """(rows, vocab) float32 with exact ties, masked tokens, NaN/inf and a fully masked row."""
    logits = rng.normal(0.0, 3.0, (rows, vocab)).astype(np.float32)
    kind = rng.integers(0, 5, rows)
    logits[kind == 1] = np.round(logits[kind == 1])  # many exact ties
    logits[(kind == 2)[:, None] & (rng.random((rows, vocab)) < 0.3)] = -np.inf
    logits[(kind == 3)[:, None] & (rng.random((rows, vocab)) < 0.1)] = np.nan
    logits[(kind == 4)[:, None] & (rng.random((rows, vocab)) < 0.05)] = np.inf
    if rows > 2:
        logits[rows // 2] = -np.inf
    return logits


def random_params(rng, rows, vocab):
    temperature = rng.choice(np.array([0.0, 0.7, 1.0, 1.5], np.float32), rows)
    top_k = rng.choice(np.array([0, 1, 3, vocab - 1, vocab, vocab + 5], np.int64), rows)
    top_p = rng.choice(np.array([0.0, 0.3, 0.9, 1.0], np.float32), rows)
    return temperature, top_k, top_p, rng.random(rows, dtype=np.float32)


def check_sampler(tk, logits, temperature, top_k, top_p, uniform):
    """The Triton sampler, the C++ sampler and the numpy reference agree on every row."""
    rows = len(logits)
    out = torch.full((rows,), -1, dtype=torch.int64)
    got = tk.sample(t(logits), temperature, top_k, top_p, uniform, out=out).numpy()
    want = cpp_sample(logits, temperature, top_k, top_p, uniform)
    np.testing.assert_array_equal(ref.sample(logits, temperature, top_k, top_p, uniform), want)
    for r in np.flatnonzero(got != want):
        params = temperature[r], top_k[r], top_p[r], uniform[r]
        pytest.fail(f"row {r} (t, k, p, u = {params}): triton {got[r]}, C++ {want[r]}")
    return got


@pytest.mark.parametrize(("vocab", "rows"), [(1, 8), (2, 12), (7, 24), (40, 24), (300, 16)])
def test_sample_matches_cpp_sampler(tk, vocab, rows):
    # 300 tokens span two 256-token tiles; the rest one partly masked tile
    rng = np.random.default_rng(vocab)
    logits = make_logits(rng, rows, vocab)
    check_sampler(tk, logits, *random_params(rng, rows, vocab))


def sampler_rows(rows):
    """[(logits, t, k, p, u), ...] -> the arrays the samplers take."""
    logits = np.array([r[0] for r in rows], np.float32)
    dtypes = (np.float32, np.int64, np.float32, np.float32)
    return (logits, *(np.array([r[i + 1] for r in rows], d) for i, d in enumerate(dtypes)))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # x / t, then capped
def test_sample_edge_cases(tk):
    inf, nan = np.inf, np.nan
    tied, flat = [1.0, 5.0, 5.0, 5.0, 5.0, 0.0], [0.0] * 6
    rows = [(tied, 1.0, 2, 0.0, u) for u in (0.0, 0.3, 0.6, 0.99)]  # ties at the k-th value
    rows += [(flat, 1.0, 0, 0.0, u) for u in (0.0, 0.5, 0.75, 0.99)]  # exact CDF steps
    rows += [(flat, 1.0, 0, 0.5, u) for u in (0.0, 0.3, 0.6, 0.99)]  # admitted at mass == p
    rows += [(flat, 1.0, 0, 1.0, 0.99), (flat, 1.0, 9, 0.0, 0.99), (flat, 1.0, 6, 1.0, 0.9)]
    rows += [(tied, 1.0, 5, 0.0, 0.99), (tied, 1.0, 2**31 - 1, 0.0, 0.99)]  # k >= window
    rows += [([1.0, 3.0, 3.0, 2.0, 0.0, 0.0], 0.0, 0, 0.0, 0.5)]  # greedy: first max
    rows += [([nan, 0.0, 0.0, -1.0, nan, nan], -1.0, 0, 0.0, 0.5)]
    rows += [([-inf] * 6, 0.0, 0, 0.0, 0.5), ([-inf] * 6, 1.0, 2, 0.9, 0.3)]  # all masked
    rows += [([0.0, inf, 1.0, inf, 0.0, 0.0], 0.0, 0, 0.0, 0.5)]  # +inf: the largest float
    rows += [([0.0, inf, 1.0, inf, 0.0, 0.0], 1.0, 0, 0.0, 0.7)]
    rows += [([nan, -inf, 2.0, nan, 1.0, 1.0], 1.0, 3, 0.5, 0.999)]
    rows += [([3.0, -inf, -inf, 1.0, 2.9, 2.0], 0.5, 1, 0.0, 0.9)]  # top_k = 1 is greedy
    far = [-80.0, 0.0, -800.0, -1e30, 0.0, -3e38]  # weights that underflow
    rows += [(far, 1.0, 0, 0.999, u) for u in (0.0, 0.9, 0.99999994)]
    rows += [(far, 0.01, 5, 0.0, 0.99999994)]
    got = check_sampler(tk, *sampler_rows(rows))
    assert list(got[:4]) == [1, 2, 3, 4]  # every token tied with the 2nd value is a candidate
    assert list(got[4:8]) == [0, 3, 4, 5] and list(got[8:12]) == [0, 1, 2, 3]


def test_sample_windows_at_vocabulary_ends(tk):
    """A window is a strided view of wider rows; its first and last tokens must be reachable."""
    rng = np.random.default_rng(5)
    rows, vocab = 12, 700
    full = rng.normal(0.0, 1.0, (rows, vocab)).astype(np.float32)
    full[:, [0, 299, 400, 699]] = 4.0  # heavy tokens at both ends of both windows
    temperature = np.ones(rows, np.float32)
    top_k = np.array([0, 2, 3, 300] * 3, np.int64)
    top_p = np.array([0.0] * 4 + [0.5] * 4 + [1.0] * 4, np.float32)
    uniform = np.array([0.0, 0.99999994, 0.5] * 4, np.float32)
    for lo, hi in [(0, 300), (400, 700)]:
        window = t(full)[:, lo:hi]  # (rows, 300), row stride 700
        got = tk.sample(window, temperature, top_k, top_p, uniform).numpy()
        want = cpp_sample(full[:, lo:hi], temperature, top_k, top_p, uniform)
        np.testing.assert_array_equal(got, want)
        assert {0, hi - lo - 1} <= set(got.tolist())


def test_sample_ties_across_tiles(tk):
    """Equal logits over three 256-token tiles: greedy takes the first maximum in the first tile,
    and the top-p group that the nucleus ends in is counted across tiles in vocabulary order."""
    vocab = 600
    flat = np.zeros(vocab, np.float32)
    twin_max = np.zeros(vocab, np.float32)
    twin_max[[270, 530]] = 2.0
    rows = [(flat, 1.0, 0, 0.5, u) for u in (0.0, 0.5, 0.99999994)]  # 301 tokens admitted
    rows += [(flat, 1.0, 450, 0.9, 0.99999994), (flat, 1.0, 0, 0.0, 0.99999994)]
    rows += [(twin_max, 0.0, 0, 0.0, 0.5), (twin_max, 1.0, 2, 0.0, 0.99999994)]
    rows += [(twin_max, 1.0, 1, 0.0, 0.3), (twin_max, 1.0, 3, 0.5, 0.99)]
    got = check_sampler(tk, *sampler_rows(rows))
    assert list(got[:5]) == [
        0,
        150,
        300,
        539,
        599,
    ]  # float32 0.9 * 600 < 540 and list(got[5:7]) == [270, 530]


def test_decode_attention_half_precision_cache(tk):
    rng = np.random.default_rng(6)
    B, H, D, S, M = 2, 2, 6, 2, 20
    q, k_new, v_new = (rng.normal(size=(B, H, D)).astype(np.float16) for _ in range(3))
    k_cache, v_cache = (rng.normal(size=(S, H, M, D)).astype(np.float16) for _ in range(2))
    slots, positions = np.array([1, 0]), np.array([19, 7])
    want_k, want_v = k_cache.astype(np.float32), v_cache.astype(np.float32)
    want = ref.decode_attention(
        q.astype(np.float32), want_k, want_v, *(a.astype(np.float32) for a in (k_new, v_new)),
        slots, positions,
    )  # fmt: skip
    kc, vc = t(k_cache), t(v_cache)
    got = tk.decode_attention(t(q), kc, vc, t(k_new), t(v_new), t(slots), t(positions))
    assert got.dtype == torch.float16
    np.testing.assert_allclose(got.float().numpy(), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(kc.float().numpy(), want_k)


def test_sample_frequencies_follow_filtered_softmax(tk):
    rng = np.random.default_rng(13)
    vocab, draws, temperature, k = 9, 100, 0.8, 4
    row = np.array([1.2, -0.5, 0.3, 0.3, -2.0, 0.9, 0.3, 0.1, -0.7], np.float32)  # 3 tie at k
    ones = np.ones(draws, np.float32)
    got = tk.sample(
        t(np.broadcast_to(row, (draws, vocab))),
        ones * temperature,
        np.full(draws, k),
        np.zeros(draws, np.float32),
        rng.random(draws, dtype=np.float32),
    ).numpy()
    x = row / np.float32(temperature)
    kept = np.flatnonzero(x >= np.sort(x)[::-1][k - 1])  # ties with the k-th value stay
    probs = np.exp(x[kept] - x.max()) / np.exp(x[kept] - x.max()).sum()
    counts = np.bincount(got, minlength=vocab)
    assert counts.sum() == counts[kept].sum() == draws  # nothing outside the filtered set
    expected = probs * draws
    chi2 = float((((counts[kept] - expected) ** 2) / expected).sum())
    dof = kept.size - 1
    assert dof == 4
    assert chi2 < 18.47, (chi2, counts[kept], expected)  # p = 0.001 at 4 degrees of freedom


def test_the_gpu_runs_wrapper_writes_back_what_the_launcher_wrote(tk):
    """on_cuda (for FACERT_TRITON_TESTS=cuda) with copies on the CPU: in-place caches, `out`
    and an `out` that is the input itself come back to the caller's tensors."""
    if ON_GPU:
        pytest.skip("the wrapper is in use: this checks it without a GPU")
    rng = np.random.default_rng(30)
    q, k_new, v_new = (t(rng.normal(size=(2, 2, 4)).astype(np.float32)) for _ in range(3))
    caches = [t(rng.normal(size=(3, 2, 9, 4)).astype(np.float32)) for _ in range(2)]
    caches += [c.clone() for c in caches]  # the same caches, for the wrapped call
    slots, positions = t(np.array([2, 0])), t(np.array([8, 3]))
    want = tk.decode_attention(q, caches[0], caches[1], k_new, v_new, slots, positions)
    attend = on_cuda(tk.decode_attention, copy=torch.clone)
    out = torch.full_like(q, float("nan"))
    got = attend(q, caches[2], caches[3], k_new, v_new, slots, positions, out=out)
    assert got is out and torch.equal(got, want)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    x = t(rng.normal(size=10).astype(np.float32))
    y = x.clone()
    assert on_cuda(tk.gelu, copy=torch.clone)(y, out=y) is y
    assert torch.equal(y, tk.gelu(x))


# ---- the block's residual add + LayerNorm, and GELU ----


@pytest.mark.parametrize(
    ("shape", "dtype", "with_delta"),
    [
        ((1, 768), torch.float32, False),  # GPT-2 small's width, one decode row
        ((3, 5, 7), torch.float16, True),  # prefill-shaped, odd width, half-precision output
        ((4, 2), torch.bfloat16, True),  # the narrowest row an unbiased std allows
        ((0, 16), torch.float32, True),  # no rows
    ],
)
def test_add_layer_norm_matches_reference(tk, shape, dtype, with_delta):
    rng = np.random.default_rng(21)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    w, b = rng.normal(size=shape[-1]).astype(np.float32), rng.normal(size=shape[-1])
    delta = rng.normal(size=shape).astype(np.float16) if with_delta else None
    want_x, want = ref.add_layer_norm(x, w, b.astype(np.float32), 1e-6, delta)
    xt = t(x)
    out = torch.full(shape, float("nan"), dtype=dtype)
    got = tk.add_layer_norm(
        xt, t(w), t(b.astype(np.float32)), 1e-6,
        delta=None if delta is None else t(delta), out_dtype=dtype, out=out,
    )  # fmt: skip
    assert got is out
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    np.testing.assert_allclose(got.float().numpy(), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(xt.numpy(), want_x, rtol=1e-6, atol=1e-6)  # x += delta in place


def test_add_layer_norm_is_the_models_layer_norm(tk):
    """Against export/lm.py's TencentPretrain LayerNorm module, an independent implementation."""
    from facert.export.lm import TPLayerNorm

    rng = np.random.default_rng(22)
    ln = TPLayerNorm(64, eps=1e-12)
    with torch.no_grad():
        ln.weight.copy_(t(rng.normal(size=64).astype(np.float32)))
        ln.bias.copy_(t(rng.normal(size=64).astype(np.float32)))
        x = t(rng.normal(size=(5, 64)).astype(np.float32))
        want = ln(x).numpy()
    got = tk.add_layer_norm(x.clone(), ln.weight.detach(), ln.bias.detach(), 1e-12)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_add_layer_norm_refuses_bad_shapes(tk):
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight and bias"):
        tk.add_layer_norm(x, torch.ones(7), torch.zeros(7), 1e-6)
    with pytest.raises(ValueError, match="delta"):
        tk.add_layer_norm(x, torch.ones(8), torch.zeros(8), 1e-6, delta=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="fp32"):
        tk.add_layer_norm(x.half(), torch.ones(8), torch.zeros(8), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gelu_matches_the_models_gelu(tk, dtype):
    from facert.export.lm import gelu_fast

    rng = np.random.default_rng(23)
    x = t(np.concatenate([rng.normal(size=2500) * 4, [0.0, -30.0, 30.0, -1e4, 1e4, 1e-8]]))
    x = x.float().to(dtype)
    want = ref.gelu(x.float().numpy())
    assert np.allclose(want, gelu_fast(x.double()).numpy(), rtol=1e-12, atol=1e-12)
    out = torch.full_like(x, float("nan"))
    got = tk.gelu(x, out=out)
    assert got is out and got.dtype == dtype
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    np.testing.assert_allclose(got.float().numpy(), want, rtol=tol, atol=tol)
    in_place = x.clone()
    assert tk.gelu(in_place, out=in_place) is in_place
    np.testing.assert_array_equal(in_place.float().numpy(), got.float().numpy())


# ---- nearest codes ----


def check_codes(tk, z, codebook):
    out = torch.full((len(z),), -1, dtype=torch.int64)
    got = tk.nearest_codes(t(z), t(codebook), out=out).numpy()
    want = ref.nearest_codes(z, codebook)
    d = ((z[:, None, :].astype(np.float64) - codebook[None].astype(np.float64)) ** 2).sum(-1)
    rows = np.arange(len(z))
    # float32 rounding may pick a different code only when it is as near (relative 1e-5)
    gap = d[rows, got] - d[rows, want]
    assert (gap <= 1e-5 * (1.0 + d[rows, want])).all(), gap.max()
    return got, want


@pytest.mark.parametrize(("N", "K", "D"), [(1, 1, 1), (37, 70, 3), (5, 130, 40), (64, 64, 16)])
def test_nearest_codes_matches_reference(tk, N, K, D):
    rng = np.random.default_rng(N + K + D)
    z = rng.normal(size=(N, D)).astype(np.float32)
    codebook = rng.normal(size=(K, D)).astype(np.float32)
    z[: N // 2] = codebook[rng.integers(0, K, N // 2)] + 1e-3  # some latents near a code
    got, want = check_codes(tk, z, codebook)
    assert (got == want).mean() > 0.9


def test_nearest_codes_first_minimum_on_ties(tk):
    rng = np.random.default_rng(3)
    codebook = rng.integers(-3, 4, (100, 4)).astype(np.float32)
    codebook[70] = codebook[5]  # an exact duplicate in the second 64-code tile
    codebook[9] = codebook[5]
    z = np.concatenate([codebook[[5, 70, 9]], rng.integers(-3, 4, (40, 4))]).astype(np.float32)
    got, want = check_codes(tk, z, codebook)
    np.testing.assert_array_equal(got, want)  # small integers: every distance is exact
    assert list(got[:3]) == [5, 5, 5]
    equidistant = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    assert tk.nearest_codes(t(np.zeros((1, 2), np.float32)), t(equidistant)).tolist() == [0]


def test_nearest_codes_match_the_quantizer(tk):
    """The same codes as export/vqgan.py's Quantizer (taming's VectorQuantizer2)."""
    from facert.export.vqgan import Quantizer

    rng = np.random.default_rng(4)
    q = Quantizer(n_embed=96, embed_dim=8)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.from_numpy(rng.normal(size=(96, 8)).astype(np.float32)))
    z = torch.from_numpy(rng.normal(size=(2, 8, 4, 4)).astype(np.float32))  # (B, C, h, w)
    want = q.codes(z).reshape(-1)  # (B*h*w,)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8).contiguous()
    got = tk.nearest_codes(flat, q.embedding.weight.detach())
    assert torch.equal(got, want)


# ---- frame crop + resize ----


def cpu_path(frame, boxes, size, margin, scaling):
    """facert's CPU path for the same faces: crop_face, then model_input (Pillow's resize)."""
    from facert.runtime.faces import FaceBox, crop_face
    from facert.runtime.images import model_input

    crops = [crop_face(frame, FaceBox(*map(int, b), 1.0), margin) for b in boxes]
    return model_input(crops, size, {1: "taming", 2: "reference"}[scaling])


@pytest.mark.parametrize(
    ("height", "width", "size", "margin", "scaling", "boxes"),
    [
        # inside; crossing the left/top border; crossing right/bottom; a 1-pixel box
        (40, 50, 8, 0.5, 1, [[10, 12, 12, 14], [-4, -3, 10, 9], [44, 35, 20, 30], [3, 3, 1, 1]]),
        # side == size (no resize), enlarging, a box bigger than the frame, margin 0
        (30, 20, 16, 0.0, 2, [[2, 3, 16, 16], [5, 5, 9, 6], [-10, -10, 45, 50]]),
        (17, 33, 8, 0.25, 1, [[0, 0, 33, 17], [30, 14, 3, 3]]),  # touching every border
    ],
)
def test_crop_resize_matches_cpu_path(tk, height, width, size, margin, scaling, boxes):
    rng = np.random.default_rng(height * width)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    frame[::3] //= 16  # flat stretches as well as noise
    boxes = np.array(boxes)
    out = torch.full((len(boxes), 3, size, size), float("nan"))
    got = tk.crop_resize(t(frame), boxes, size, margin, scaling, out=out)
    assert got is out
    want = cpu_path(frame, boxes, size, margin, scaling)
    np.testing.assert_array_equal(ref.crop_resize(frame, boxes, size, margin, scaling), want)
    np.testing.assert_array_equal(got.numpy(), want)  # bit for bit: tolerance 0


def test_crop_resize_refuses_boxes_outside_the_frame(tk):
    frame = torch.zeros((10, 10, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside"):
        tk.crop_resize(frame, [[20, 0, 4, 4]], 8)
    with pytest.raises(ValueError, match="positive size"):
        tk.crop_resize(frame, [[2, 2, 0, 4]], 8)


def test_import_facert_kernels_needs_no_triton():
    code = (
        "import sys, facert.kernels, facert.kernels.triton, facert.kernels.triton.reference; "
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
