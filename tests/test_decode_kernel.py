"""The fused CPU decode kernel (kernels/cpu/decode.cpp) against an independent numpy
implementation of one decode step, in float32 and int8, on odd shapes and scattered slots."""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from facert.kernels.decode import DECODE_SEGMENT, FusedDecoder, allow_vnni, quantize_rows
from facert.runtime.sequence import SamplingParams

EPS = 1e-6


def random_weights(rng, vocab: int, n_embd: int, n_ffn: int, n_layer: int, positions: int):
    def m(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"wte.weight": m(vocab, n_embd), "wpe.weight": m(positions, n_embd),
         "wse.weight": m(3, n_embd), "ln_f.weight": 1 + m(n_embd), "ln_f.bias": m(n_embd),
         "lm_head.weight": m(vocab, n_embd)}  # fmt: skip
    for i in range(n_layer):
        p = f"blocks.{i}."
        square = (n_embd, n_embd)
        for name, shape in (("attn.q", square), ("attn.k", square), ("attn.v", square),
                            ("attn.proj", square), ("mlp.fc", (n_ffn, n_embd)),
                            ("mlp.proj", (n_embd, n_ffn))):  # fmt: skip
            w[p + name + ".weight"], w[p + name + ".bias"] = m(*shape), m(shape[0])
        for ln in ("ln_1", "ln_2"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = 1 + m(n_embd), m(n_embd)
    return w


def reference_step(w, n_head, k, v, slots, tokens, positions, window, int8):
    """One decode step in float64 numpy; writes the new keys/values into k, v."""
    f = {name: a.astype(np.float64) for name, a in w.items()}

    def linear(x, weight, bias=0.0):  # (B, K) @ (N, K).T -> (B, N)
        if not int8:
            return x @ weight.astype(np.float64).T + bias
        q, scale, _ = quantize_rows(weight)
        x_scale = np.abs(x).max(axis=1, keepdims=True) / 127  # (B, 1)
        xq = np.trunc(x / x_scale + np.copysign(0.5, x))  # round half away from zero
        return (xq @ q.T.astype(np.float64)) * scale * x_scale + bias

    def dense(x, name):
        return linear(x, w[name + ".weight"], f[name + ".bias"])

    def layer_norm(x, name):
        mean = x.mean(-1, keepdims=True)
        std = x.std(-1, ddof=1, keepdims=True)
        return f[name + ".weight"] * (x - mean) / (std + EPS) + f[name + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = f["wte.weight"][tokens] + f["wpe.weight"][positions] + f["wse.weight"][DECODE_SEGMENT]
    B, C = x.shape
    D = C // n_head
    for layer in range(k.shape[0]):
        p = f"blocks.{layer}."
        h = layer_norm(x, p + "ln_1")
        q, kk, vv = (dense(h, p + f"attn.{n}").reshape(B, n_head, D) for n in "qkv")
        att = np.zeros((B, n_head, D))
        for b in range(B):
            k[layer, slots[b], :, positions[b]] = kk[b]
            v[layer, slots[b], :, positions[b]] = vv[b]
            keys = k[layer, slots[b], :, : positions[b] + 1].astype(np.float64)  # (H, T, D)
            values = v[layer, slots[b], :, : positions[b] + 1].astype(np.float64)
            scores = np.einsum("htd,hd->ht", keys, q[b]) / math.sqrt(D)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            att[b] = np.einsum("ht,htd->hd", probs, values)
        x = x + dense(att.reshape(B, C), p + "attn.proj")
        x = x + dense(gelu(dense(layer_norm(x, p + "ln_2"), p + "mlp.fc")), p + "mlp.proj")
    return linear(layer_norm(x, "ln_f"), w["lm_head.weight"][window[0] : window[1]])


SHAPES = {  # (vocab, n_embd, n_head, n_ffn): the tiny fixture's widths, and widths with tails
    "aligned": (300, 64, 4, 256),
    "odd": (211, 40, 4, 100),
}


@pytest.fixture(params=list(SHAPES))
def case(request):
    vocab, n_embd, n_head, n_ffn = SHAPES[request.param]
    rng = np.random.default_rng(7)
    w = random_weights(rng, vocab, n_embd, n_ffn, n_layer=2, positions=40)
    cache_shape = (2, 8, n_head, 40, n_embd // n_head)  # (L, S, H, M, D)
    k = rng.standard_normal(cache_shape).astype(np.float32)  # earlier positions: anything
    v = rng.standard_normal(cache_shape).astype(np.float32)
    # five rows: a block of four (the batched tiles) and one more, in scattered slots
    rows = dict(slots=np.array([5, 0, 7, 2, 3]), tokens=np.array([3, vocab - 1, 100, 7, 8]),
                positions=np.array([9, 0, 39, 20, 1]), window=(17, vocab - 5))  # fmt: skip
    return w, n_head, k, v, rows


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_step_matches_numpy_reference(case, precision):
    w, n_head, k, v, rows = case
    k_ref, v_ref, k_before = k.copy(), v.copy(), k.copy()
    expected = reference_step(w, n_head, k_ref, v_ref, **rows, int8=precision == "int8")
    logits = FusedDecoder(w, n_head, EPS, precision, threads=2).step(k, v, **rows)
    assert logits.shape == expected.shape and logits.dtype == np.float32
    bound = 1e-5 if precision == "fp32" else 5e-3  # int8: an activation may round the other way
    assert np.abs(logits - expected).max() / np.abs(expected).max() < bound
    # the new position of each row's slot is written, every other cache entry is untouched
    assert np.allclose(k, k_ref, atol=1e-4) and np.allclose(v, v_ref, atol=1e-4)
    changed = np.argwhere((k != k_before).any(axis=(0, 2, 4)))  # (slot, position) pairs
    assert set(map(tuple, changed)) <= set(zip(rows["slots"], rows["positions"]))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_results_do_not_depend_on_the_thread_count(case, precision):
    """Every output row is computed whole by one thread, so any thread count gives the same bits;
    4 threads on this 2-core CI machine, 50 steps each, also exercise late and preempted
    workers in the pool."""
    w, n_head, k, v, rows = case
    expected = FusedDecoder(w, n_head, EPS, precision, 1).step(k.copy(), v.copy(), **rows)
    for threads in (2, 3, 4):
        decoder = FusedDecoder(w, n_head, EPS, precision, threads)
        for _ in range(50):
            kc, vc = k.copy(), v.copy()
            assert np.array_equal(decoder.step(kc, vc, **rows), expected)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_a_forked_child_decodes(case):
    """Servers fork workers after loading a model: the child has none of the parent's pool
    threads and must neither hang nor crash (here it also asks for another thread count), and
    the parent keeps working."""
    w, n_head, k, v, rows = case
    decoder = FusedDecoder(w, n_head, EPS, "fp32", threads=2)
    expected = decoder.step(k.copy(), v.copy(), **rows)  # the parent's pool is running
    pid = os.fork()
    if pid == 0:  # child: exit status 0 if its step gives the same logits
        try:
            decoder.threads = 3
            same = np.array_equal(decoder.step(k.copy(), v.copy(), **rows), expected)
        finally:
            os._exit(0 if same else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in its decode step")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert np.array_equal(decoder.step(k.copy(), v.copy(), **rows), expected)


def test_vnni_and_portable_int8_products_are_identical(case):
    if not allow_vnni(True):
        pytest.skip("this CPU has no AVX512-VNNI: int8 products always take the portable path")
    w, n_head, k, v, rows = case
    decoder = FusedDecoder(w, n_head, EPS, "int8", threads=2)
    vnni = decoder.step(k.copy(), v.copy(), **rows)
    try:
        assert not allow_vnni(False)
        portable = decoder.step(k.copy(), v.copy(), **rows)
    finally:
        allow_vnni(True)
    assert np.array_equal(vnni, portable)  # integer dot products: exact on both paths


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory):
    """The kernel built as on a CPU other than x86-64 (Jetson's ARM): no intrinsics, no clones."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler here to build the portable kernel")
    source = Path(__file__).parents[1] / "kernels" / "cpu" / "decode.cpp"
    out = tmp_path_factory.mktemp("portable") / "libfacert_portable.so"
    subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-pthread",
                    "-DFACERT_PORTABLE", str(source), "-o", str(out)], check=True)  # fmt: skip
    return ctypes.CDLL(str(out))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_portable_build_matches_numpy_reference(case, precision, portable_library):
    w, n_head, k, v, rows = case
    expected = reference_step(w, n_head, k.copy(), v.copy(), **rows, int8=precision == "int8")
    decoder = FusedDecoder(w, n_head, EPS, precision, threads=2, library=portable_library)
    logits = decoder.step(k, v, **rows)
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-5


def test_quantize_rows_bounds():
    w = np.random.default_rng(0).standard_normal((50, 70)).astype(np.float32)
    w[3] = 0.0
    q, scale, row_sum = quantize_rows(w)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() == 127
    assert np.all(np.abs(w - q * scale[:, None]) <= scale[:, None] / 2 + 1e-7)
    assert np.array_equal(row_sum, q.astype(np.int32).sum(axis=1)) and not q[3].any()


def test_out_of_range_arguments_are_refused(case):
    w, n_head, k, v, rows = case
    decoder = FusedDecoder(w, n_head, EPS, "fp32", threads=1)
    before = k.copy()
    for bad in ({"positions": np.array([9, 0, 40, 20, 1])}, {"slots": np.array([5, 8, 7, 2, 3])},
                {"tokens": np.array([3, -1, 100, 7, 8])}, {"window": (5, 5)}):  # fmt: skip
        with pytest.raises(ValueError, match="out of range"):
            decoder.step(k, v, **{**rows, **bad})
    assert np.array_equal(k, before)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        decoder.step(k.astype(np.float16), v, **rows)


def test_int8_decode_agrees_with_the_exact_model(tiny_model_dir, tiny_model):
    """Teacher-forced image decoding with the int8 kernel (3 prompts x 100 random codes): top-1
    agreement with the exact torch model's full forward. The random tiny weights give flat
    logits, a harsh case; measured 0.977 (0.973 before the prefill graph's int8 weights went
    7-bit)."""
    import facert

    m = facert.load(tiny_model_dir, precision="int8", decode="fused", progress=False)
    m.backend.allocate(1, m.config.lm.seq_length)
    rng, window, same = np.random.default_rng(0), m.templates.image_window, []
    for prompt in ("a smiling young woman", "an old man with glasses", "a bald man"):
        seq = m.templates.to_image(prompt, SamplingParams(seed=1), 0)
        codes = rng.integers(window[0], window[1], 100)
        ids = np.concatenate([seq.prompt_ids, codes])
        segs = np.concatenate([seq.prompt_segs, np.full(100, 2)])
        n = len(seq.prompt_ids)
        exact = tiny_model.forward_logits(ids, segs)[n:, window[0] : window[1]].argmax(-1)
        m.backend.prefill(np.array([0]), [ids[:n]], [segs[:n]], window)
        for p in range(n, len(ids)):
            step = m.backend.decode(np.array([0]), ids[p : p + 1], np.array([p]), window)
            same.append(step[0].argmax() == exact[p - n])
    assert np.mean(same) >= 0.93


def test_decode_choice_is_checked(tiny_model_dir):
    import facert

    with pytest.raises(facert.FacertError, match="decode must be one of auto, fused, graph"):
        facert.load(tiny_model_dir, decode="fast", progress=False)
    with pytest.raises(facert.FacertError, match="use decode='graph' for int4 on CPU"):
        facert.load(tiny_model_dir, precision="int4", decode="fused", progress=False)
