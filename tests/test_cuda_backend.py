"""The CUDA backend's math against the torch reference backend.

Without a GPU the backend runs on the CPU (device="cpu": no CUDA graphs, torch ops),
which checks everything but the device itself: the mixed-precision forward, prefill and decode
through the static cache, bucket padding, copy_slot, the three tasks through the real engine;
and, in a subprocess under Triton's interpreter, the backend's prefill and decode with facert's
Triton kernels (attention, residual add + LayerNorm, GELU) and sampler.
Tests marked `gpu` need CUDA (graphs, fp16/bf16 on the device, the Triton kernels inside a graph)
and skip with "no CUDA GPU" elsewhere.

Bounds: fp32 logits within 1e-5 of the largest |logit| of the torch backend (measured: 4e-7,
the q/k/v GEMM is fused, so sums round differently) and identical greedy tokens. fp16 and bf16
(weights and cache; the rest in fp32) on teacher-forced decode steps of the three tasks (61
positions): top-1 agreement >= 0.95, and where the top-1 differs it is a near tie, the pick's
reference logit within NEAR_TIE of the reference's best (measured: one flip, at a 0.004 margin,
in both; max logit error 5e-4 of the largest |logit| in fp16, 5e-3 in bf16).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import facert.runtime.model as model_module
from facert import BUNDLED_MODEL, FaceModel, FacertError, InvalidArgument
from facert.runtime.backends import create_backend
from facert.runtime.backends.cuda_backend import (
    CudaBackend,
    buckets_for,
    torch_add_layer_norm,
    torch_decode_attention,
    torch_gelu,
)
from facert.runtime.config import LM_FILE, VQGAN_FILE, ModelFiles, load_config, read_model
from facert.runtime.sequence import GREEDY, SamplingParams

FP32_REL_ERROR = 1e-5
MIN_TOP1 = {"fp16": 0.95, "bf16": 0.95}
NEAR_TIE = {"fp16": 0.05, "bf16": 0.1}
PROMPT = "a smiling young woman with long blond hair"
HAS_CUDA = torch.cuda.is_available()
# `pytest -m gpu` selects the tests below that need the device (bench/gpu_check.sh runs them)
gpu = pytest.mark.gpu
no_gpu_skip = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")


def model_files(model_dir=BUNDLED_MODEL) -> ModelFiles:
    """A model directory read as create_backend reads it for the cuda backend."""
    return read_model(model_dir, keep=(LM_FILE, VQGAN_FILE))


def cpu_cuda_model(model_dir, precision: str = "fp32") -> FaceModel:
    """A FaceModel on the CUDA backend's code running on the CPU (create_backend refuses
    backend="cuda" without a GPU, so the test builds the backend itself)."""

    def make(name, path, config, **_):
        return CudaBackend(model_files(path), config, precision, device="cpu")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_module, "create_backend", make)
        return FaceModel(model_dir, backend="cuda", num_slots=8, progress=False)


@pytest.fixture(scope="module")
def reference():
    return FaceModel(BUNDLED_MODEL, backend="torch", num_slots=8)


@pytest.fixture(scope="module")
def cuda_fp32():
    return cpu_cuda_model(BUNDLED_MODEL)


def task_sequences(model: FaceModel, codes: np.ndarray) -> list:
    """One greedy sequence of each task: draw a face, caption one, answer an attribute."""
    t = model.templates
    image = t.to_image(PROMPT, GREEDY, 0)
    image.max_new_tokens = 24
    return [image, t.to_caption(codes, GREEDY), t.to_attribute(codes, "expression", GREEDY)]


def teacher_forced_logits(backend, seq) -> np.ndarray:
    """Full-vocabulary logits of a finished sequence's generated positions through prefill and
    one decode step each (the cache path): (n, V)."""
    ids = np.concatenate([seq.prompt_ids, seq.generated])
    n, vocab = len(seq.prompt_ids), (0, backend.config.lm.vocab_size)
    slot = np.array([0])
    first = backend.prefill(slot, [ids[:n]], [seq.prompt_segs])
    steps = [first] + [
        backend.decode(slot, ids[p : p + 1], np.array([p])) for p in range(n, len(ids) - 1)
    ]
    return np.concatenate([backend.head(h, vocab) for h in steps])


@pytest.fixture(scope="module")
def codes(reference) -> np.ndarray:
    """A face's 64 codes (the bundled model's 8 x 8 latent), for the caption and attribute rows."""
    face = reference.generate_faces(PROMPT, n=1, seed=0, candidates=1)[0]
    return reference.image_tokenizer.encode(face[None])[0]


def test_fp32_tasks_match_the_torch_backend(reference, cuda_fp32, codes):
    ref_seqs, seqs = task_sequences(reference, codes), task_sequences(cuda_fp32, codes)
    reference.engine.run(ref_seqs)
    cuda_fp32.engine.run(seqs)  # all three in one batch: mixed windows, padded to bucket 4
    for ref, got in zip(ref_seqs, seqs):
        assert got.generated == ref.generated
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)
        expected = teacher_forced_logits(reference.backend, ref)
        logits = teacher_forced_logits(cuda_fp32.backend, ref)
        assert np.abs(logits - expected).max() <= FP32_REL_ERROR * np.abs(expected).max()


def test_fp32_full_forward_and_public_api_match(reference, cuda_fp32, codes):
    seq = reference.templates.to_caption(codes, GREEDY)
    ref = reference.forward_logits(seq.prompt_ids, seq.prompt_segs)
    got = cuda_fp32.forward_logits(seq.prompt_ids, seq.prompt_segs)
    assert np.abs(got - ref).max() <= FP32_REL_ERROR * np.abs(ref).max()
    face = reference.generate_faces(PROMPT, n=1, seed=3, candidates=2)[0]
    assert np.array_equal(cuda_fp32.generate_faces(PROMPT, n=1, seed=3, candidates=2)[0], face)
    assert cuda_fp32.caption(face) == reference.caption(face)
    ref_answer = reference.attributes(face, ["expression"])["expression"]
    answer = cuda_fp32.attributes(face, ["expression"])["expression"]
    assert answer["value"] == ref_answer["value"]
    assert abs(answer["prob"] - ref_answer["prob"]) < 1e-4


def scheduled_beside_alone(model: FaceModel) -> tuple[list, list]:
    """Every task's result alone, then the same calls submitted twice over at once (the
    scheduler batches them: image and text rows in one step, several bucket sizes)."""
    face = model.generate_faces(PROMPT, n=1, seed=0, candidates=1)[0]
    calls = [
        ("generate_faces", (PROMPT,), dict(n=2, seed=1, candidates=2)),
        ("generate_faces", ("an old man",), dict(n=1, seed=2, candidates=1, top_p=0.9)),
        ("caption", (face,), {}),
        ("caption", (face,), dict(greedy=False, seed=5)),
        ("attributes", (face, "expression"), dict(views=4)),
    ]
    alone = [getattr(model, task)(*a, **kw) for task, a, kw in calls]
    futures = [model.submit(task, *a, **kw) for task, a, kw in calls * 2]
    return alone * 2, [f.result(timeout=300) for f in futures]


def assert_same_results(alone: list, together: list, min_same_faces: float = 1.0) -> None:
    """Texts and answers equal, probabilities within a relative 1e-4, and at least
    `min_same_faces` of the faces bit-identical."""
    faces = []
    for want, got in zip(alone, together):
        if isinstance(want, list):  # faces
            faces += [np.array_equal(a, b) for a, b in zip(want, got)]
        elif isinstance(want, dict):  # attributes
            for name, answer in want.items():
                assert got[name]["value"] == answer["value"]
                assert abs(got[name]["prob"] - answer["prob"]) <= 1e-4 * answer["prob"]
        else:
            assert got == want
    assert np.mean(faces) >= min_same_faces, faces


def test_scheduled_requests_equal_each_alone(cuda_fp32):
    assert_same_results(*scheduled_beside_alone(cuda_fp32))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_agrees_on_top1(reference, codes, precision):
    backend = CudaBackend(model_files(), reference.config, precision, device="cpu")
    backend.allocate(2, reference.config.lm.seq_length)
    seqs = task_sequences(reference, codes)
    reference.engine.run(seqs)
    expected = np.concatenate([teacher_forced_logits(reference.backend, s) for s in seqs])
    picks = np.concatenate([teacher_forced_logits(backend, s) for s in seqs]).argmax(1)
    assert np.mean(picks == expected.argmax(1)) >= MIN_TOP1[precision]
    lost = expected.max(1) - expected[np.arange(len(picks)), picks]  # 0 where the picks agree
    assert lost.max() <= NEAR_TIE[precision], f"{precision}: a pick {lost.max():.3f} below the best"
    assert backend.cache_dtype.itemsize == 2 and backend.k_cache.dtype == backend.dtype


def test_bucket_padding_does_not_change_a_row(reference):
    backend = CudaBackend(model_files(), reference.config, "fp32", device="cpu")
    backend.allocate(5, 64)
    assert backend.buckets == [1, 2, 4, 8] and backend.scratch == 5 == backend.k_cache.shape[1] - 1
    rng = np.random.default_rng(0)
    lo, hi = reference.templates.image_window
    prompts = [rng.integers(0, lo, n) for n in (9, 12, 7)]
    slots = np.array([4, 0, 2])
    backend.prefill(slots, prompts, [np.ones(len(p), dtype=np.int64) for p in prompts])
    untouched = backend.k_cache[:, [1, 3]].clone()
    tokens, positions = rng.integers(lo, hi, 3), np.array([9, 12, 7])
    together = backend.decode(slots, tokens, positions)  # 3 rows + 1 padding row
    alone = np.concatenate([backend.decode(slots[i : i + 1], tokens[i : i + 1],
                                           positions[i : i + 1]) for i in range(3)])  # fmt: skip
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    assert torch.equal(backend.k_cache[:, [1, 3]], untouched)  # padding wrote the scratch slot


def test_copy_slot_continues_identically(reference):
    backend = CudaBackend(model_files(), reference.config, "fp32", device="cpu")
    backend.allocate(3, 64)
    ids = np.arange(5, 25)
    backend.prefill(np.array([0]), [ids], [np.ones(20, dtype=np.int64)])
    backend.copy_slot(0, 2, 20)
    assert torch.equal(backend.k_cache[:, 2, :, :20], backend.k_cache[:, 0, :, :20])
    hidden = backend.decode(np.array([0, 2]), np.array([7, 7]), np.array([20, 20]))
    np.testing.assert_array_equal(hidden[0], hidden[1])


def test_torch_decode_attention_is_the_reference_attention():
    rng = torch.Generator().manual_seed(0)
    S, H, M, D, B = 4, 3, 10, 8, 2
    k_cache, v_cache = torch.randn(2, S, H, M, D, generator=rng)
    q, k_new, v_new = torch.randn(3, B, H, D, generator=rng)
    slots, positions = torch.tensor([3, 1]), torch.tensor([6, 0])
    expected_k = k_cache.clone()
    expected_k[slots, :, positions] = k_new
    out = torch_decode_attention(q, k_cache, v_cache, k_new, v_new, slots, positions)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache[1, :, 0], v_new[1])
    for b in range(B):
        keys = k_cache[slots[b], :, : positions[b] + 1]  # (H, P, D)
        probs = torch.softmax(keys @ q[b, :, :, None] / D**0.5, dim=1)  # (H, P, 1)
        want = (probs * v_cache[slots[b], :, : positions[b] + 1]).sum(1)
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)


def test_torch_block_ops_keep_the_triton_kernels_contract():
    """torch_add_layer_norm and torch_gelu (the fallback) against the kernels' numpy references."""
    from facert.kernels.triton import reference as ref  # numpy only: no triton needed

    rng = np.random.default_rng(5)
    x = (rng.normal(size=(3, 5, 7)) * 3 + 1).astype(np.float32)
    w, b = (rng.normal(size=7).astype(np.float32) for _ in range(2))
    delta = rng.normal(size=x.shape).astype(np.float16)
    want_x, want = ref.add_layer_norm(x, w, b, 1e-6, delta)
    xt = torch.from_numpy(x.copy())
    got = torch_add_layer_norm(xt, torch.from_numpy(w), torch.from_numpy(b), 1e-6,
                               delta=torch.from_numpy(delta), out_dtype=torch.float16)  # fmt: skip
    assert got.dtype == torch.float16
    np.testing.assert_allclose(got.float().numpy(), want, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(xt.numpy(), want_x, rtol=1e-6, atol=1e-6)  # x += delta in place
    y = torch.from_numpy(rng.normal(size=50).astype(np.float32) * 4).to(torch.bfloat16)
    out = torch.full_like(y, float("nan"))
    assert torch_gelu(y, out=out) is out
    np.testing.assert_allclose(out.float().numpy(), ref.gelu(y.float().numpy()), rtol=8e-3,
                               atol=8e-3)  # fmt: skip


def test_backend_options_and_why_it_chose_its_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # another test module may set it
    config = load_config(BUNDLED_MODEL)
    backend = CudaBackend(model_files(), config, "fp32", device="cpu")
    assert (backend.kernels, backend.graphs) == ("torch", False)
    assert "CPU" in backend.kernels_note
    with pytest.raises(FacertError, match="triton"):
        CudaBackend(model_files(), config, "fp32", device="cpu", kernels="triton")
    with pytest.raises(FacertError, match="precision"):
        CudaBackend(model_files(), config, "int8", device="cpu")
    assert buckets_for(1) == [1] and buckets_for(16) == [1, 2, 4, 8, 16]
    assert buckets_for(17)[-1] == 32


def test_create_backend_names_the_fix_without_a_gpu():
    config = load_config(BUNDLED_MODEL)
    with pytest.raises(InvalidArgument, match="fp16, bf16, fp32"):
        create_backend("cuda", BUNDLED_MODEL, config, precision="int4")
    if HAS_CUDA:
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(FacertError, match="NVIDIA GPU") as e:
        create_backend("cuda", BUNDLED_MODEL, config, precision="fp16")
    assert "backend='torch'" in str(e.value)


def test_create_backend_reads_each_model_file_once(monkeypatch):
    """create_backend("cuda") hands the backend the files read_model read while hashing them:
    no file of the model is opened twice (run on the CPU: a GPU is only pretended)."""
    import functools

    from facert.runtime.backends import cuda_backend

    config = load_config(BUNDLED_MODEL)
    cpu = functools.partial(cuda_backend.CudaBackend, device="cpu")
    monkeypatch.setattr(cuda_backend, "CudaBackend", cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    opened: list[str] = []
    recording = [True]  # an audit hook cannot be removed: it stops recording after the call

    def record(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[0], (str, os.PathLike)):
            opened.append(os.fspath(args[0]))

    sys.addaudithook(record)
    try:
        backend = create_backend("cuda", BUNDLED_MODEL, config, precision="fp32")
    finally:
        recording[0] = False
    assert backend.name == "cuda"
    weights = [Path(p).name for p in opened if Path(p).suffix == ".safetensors"]
    assert sorted(weights) == [LM_FILE, VQGAN_FILE], opened


def interpreted_triton_check() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1 (it must be set before the kernels import):
    the backend's prefill and decode with the Triton kernels and sampler on CPU tensors."""
    config = load_config(BUNDLED_MODEL)
    triton = CudaBackend(model_files(), config, "fp32", device="cpu", kernels="triton")
    plain = CudaBackend(model_files(), config, "fp32", device="cpu", kernels="torch")
    assert triton.kernels == "triton", triton.kernels_note
    lo, hi = config.lm.text_vocab_size, config.lm.vocab_size
    prompts = [np.arange(1, 1 + n) for n in (20, 9, 14)]
    slots, tokens, positions = (
        np.array([2, 0, 4]),
        np.array([lo, lo + 5, hi - 1]),
        np.array([20, 9, 14]),
    )
    results = []
    for b in (triton, plain):
        b.allocate(5, 64)
        b.prefill(slots, prompts, [np.ones(len(p), dtype=np.int64) for p in prompts])
        results.append(b.decode(slots, tokens, positions))  # 3 rows + 1 padding row
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-4)
    assert torch.equal(triton.k_cache[:, [1, 3]], plain.k_cache[:, [1, 3]])  # zeros: untouched
    hidden = np.repeat(results[0][:1], 4, axis=0)
    params = (np.ones(4, np.float32), np.full(4, 70, np.int32), np.zeros(4, np.float32))
    uniforms = np.array([0.1, 0.4, 0.7, 0.95], dtype=np.float32)
    from facert.kernels.sampling import sample as host_sample

    expected = host_sample(triton.head(hidden, (lo, hi)), *params, uniforms)
    np.testing.assert_array_equal(triton.sample(hidden, (lo, hi), *params, uniforms), expected)


def test_triton_kernels_in_the_backend_under_the_interpreter():
    pytest.importorskip("triton", reason="triton is not installed")
    code = "from tests.test_cuda_backend import interpreted_triton_check as c; c()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).parent.parent
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


# ---- on a GPU -----------------------------------------------------------------------------------


@gpu
@no_gpu_skip
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_gpu_graphs_match_eager_and_the_reference(reference, codes, precision):
    config = reference.config
    graphed = CudaBackend(model_files(), config, precision)  # Triton kernels when they import
    graphed.allocate(4, config.lm.seq_length)
    seqs = task_sequences(reference, codes)
    reference.engine.run(seqs)
    expected = np.concatenate([teacher_forced_logits(reference.backend, s) for s in seqs])
    got = np.concatenate([teacher_forced_logits(graphed, s) for s in seqs])
    # the same kernels as the graphs ran (they fall back to torch ops if Triton fails in one)
    eager = CudaBackend(model_files(), config, precision, graphs=False, kernels=graphed.kernels)
    eager.allocate(4, config.lm.seq_length)
    assert graphed.graphs and not eager.graphs
    eager_logits = np.concatenate([teacher_forced_logits(eager, s) for s in seqs])
    assert np.abs(got - eager_logits).max() <= 1e-3 * np.abs(expected).max()  # same kernels
    if precision == "fp32":  # cuBLAS vs CPU sums, TF32 off
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    picks = got.argmax(1)
    assert np.mean(picks == expected.argmax(1)) >= MIN_TOP1.get(precision, 1.0)
    lost = expected.max(1) - expected[np.arange(len(picks)), picks]
    assert lost.max() <= NEAR_TIE.get(precision, 1e-3)
    assert sorted(graphed._graphs) == [1]


@gpu
@no_gpu_skip
def test_gpu_model_end_to_end_and_batches(reference, codes):
    model = FaceModel(BUNDLED_MODEL, backend="cuda", precision="fp32", num_slots=8)
    assert model.backend.name == "cuda" and model.backend.k_cache.is_cuda
    seqs, ref_seqs = task_sequences(model, codes), task_sequences(reference, codes)
    model.engine.run(seqs)
    reference.engine.run(ref_seqs)
    assert [s.generated for s in seqs] == [s.generated for s in ref_seqs]
    batch = [model.templates.to_image(PROMPT, SamplingParams(seed=1), i) for i in range(5)]
    ref_batch = [reference.templates.to_image(PROMPT, SamplingParams(seed=1), i) for i in range(5)]
    model.engine.run(batch)  # bucket 8 with 3 padding rows
    reference.engine.run(ref_batch)
    same = np.mean([a.generated == b.generated for a, b in zip(batch, ref_batch)])
    assert same >= 0.8  # seeded draws; a near-tie in the inverse CDF may flip one
    assert 8 in model.backend._graphs


@gpu
@no_gpu_skip
def test_gpu_scheduled_requests_equal_each_alone():
    """The scheduler on the device: each bucket size is its own CUDA graph and cuBLAS may pick
    another GEMM per batch size, so a seeded draw at a near tie may flip (as above)."""
    model = FaceModel(BUNDLED_MODEL, backend="cuda", precision="fp32", num_slots=8)
    alone, together = scheduled_beside_alone(model)
    assert_same_results(alone, together, min_same_faces=0.8)
    assert len(model.backend._graphs) >= 2  # the batches ran at more than one bucket


@gpu
@no_gpu_skip
def test_gpu_faces_drawn_beside_steps_equal_each_alone(reference, codes):
    """The VQGAN runs on its own stream, outside the LM's lock, while another thread steps: the
    steps' logits and the faces and codes are the bits each gives alone."""
    config = reference.config
    backend = CudaBackend(model_files(), config, "fp32")
    backend.allocate(4, config.lm.seq_length)
    seq = task_sequences(reference, codes)[0]
    reference.engine.run([seq])
    many = np.repeat(codes[None], 8, axis=0)  # (8, T)
    logits, faces = teacher_forced_logits(backend, seq), backend.decode_images(many)
    face_codes = backend.encode_images(faces)
    with ThreadPoolExecutor(1) as pool:
        drawn = pool.submit(
            lambda: [(backend.decode_images(many), backend.encode_images(faces)) for _ in range(4)]
        )
        stepped = [teacher_forced_logits(backend, seq) for _ in range(4)]
        drawn = drawn.result()
    assert all(np.array_equal(got, logits) for got in stepped)
    assert all(np.array_equal(f, faces) and np.array_equal(c, face_codes) for f, c in drawn)


@gpu
@no_gpu_skip
def test_gpu_triton_kernel_inside_the_graph(reference, codes):
    pytest.importorskip("triton", reason="triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":  # e.g. set by another test module's import
        pytest.skip("TRITON_INTERPRET=1 in this process: run `pytest -m gpu` on this file alone")
    config = reference.config
    triton = CudaBackend(model_files(), config, "fp16", kernels="triton")
    plain = CudaBackend(model_files(), config, "fp16", kernels="torch")
    seq = task_sequences(reference, codes)[0]
    reference.engine.run([seq])
    for b in (triton, plain):
        b.allocate(2, config.lm.seq_length)
    got = teacher_forced_logits(triton, seq)
    assert triton.kernels == "triton", triton.kernels_note  # it did not fall back
    np.testing.assert_allclose(got, teacher_forced_logits(plain, seq), atol=5e-2, rtol=0)
    hidden = triton.prefill(np.array([0]), [seq.prompt_ids], [seq.prompt_segs])
    hidden = np.repeat(hidden, 4, axis=0)
    params = (np.full(4, 1.0, np.float32), np.full(4, 70, np.int32), np.zeros(4, np.float32))
    uniforms = np.array([0.1, 0.4, 0.7, 0.95], dtype=np.float32)
    window = reference.templates.image_window
    from facert.kernels.sampling import sample as host_sample

    host = host_sample(triton.head(hidden, window), *params, uniforms)
    np.testing.assert_array_equal(triton.sample(hidden, window, *params, uniforms), host)
