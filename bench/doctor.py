"""`facert doctor`: the self-check a user runs on their own device.

It proves parity where the device is, not in our CI: every ONNX Runtime execution provider found
on this machine, at each precision it supports, runs the same prompt as the reference and must
agree within the bounds the test suite uses, on a full forward and on the decode path (the fused
CPU kernel or the lm_decode graph, teacher-forced); then it times a decode step and one face.
The reference is the exact PyTorch model when torch is installed, else the CPU fp32 graphs (which
CI checks against the PyTorch model and TencentPretrain's golden logits).

Where PyTorch sees a CUDA GPU, the CUDA backend is checked too, at each of its precisions, and
where TensorRT and a GPU are, the TensorRT backend at each precision whose engines are built for
this GPU (fp16's are built first if there are none): against the CPU ONNX Runtime fp32 model,
greedy codes, logits (full forward and the cached decode path), seeded draws (the same Philox
uniforms on both sides), then a decode step at batch 1 and 16 against the device's floor (step
weight bytes / the bandwidth of a large device copy, where PyTorch can measure it) and one face
end to end. Without them `cuda_status` / `tensorrt_status` say why, and only the CPU checks run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from facert.runtime.errors import FacertError
from facert.runtime.model import FaceModel
from facert.runtime.sequence import GREEDY, SamplingParams

from .decode import PROMPT, decode_path, time_decode

# Same bounds as tests/test_onnxruntime.py: fp32 logits within 1e-4 of the largest |logit| and
# identical top-1; reduced precisions by top-1 agreement with fp32.
MIN_TOP1 = {"fp32": 1.0, "fp16": 0.99, "int8": 0.9, "int4": 0.7}
FP32_REL_ERROR = 1e-4
CPU_PRECISIONS = ("fp32", "int8", "int4")
GPU_PRECISIONS = ("fp32", "fp16")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass
class Check:
    provider: str
    precision: str
    decode: str = ""
    top1: float = float("nan")
    rel_error: float = float("nan")
    decode_ms: float = float("nan")
    face_s: float = float("nan")
    error: str = ""

    @property
    def passed(self) -> bool:
        if self.error:
            return False
        ok = self.top1 >= MIN_TOP1[self.precision]
        return ok and (self.precision != "fp32" or self.rel_error < FP32_REL_ERROR)


def plan() -> list[tuple[str, str]]:
    """(provider, precision) pairs to check on this machine."""
    available = ort.get_available_providers()
    pairs = [("CPUExecutionProvider", p) for p in CPU_PRECISIONS]
    pairs += [(gp, p) for gp in GPU_PROVIDERS if gp in available for p in GPU_PRECISIONS]
    return pairs


def _probe_sequence(model: FaceModel) -> tuple[np.ndarray, np.ndarray]:
    """An image prompt followed by 32 greedy codes: prefix and generated positions both count."""
    seq = model.templates.to_image(PROMPT, GREEDY, 0)
    seq.max_new_tokens = 32
    model.engine.run([seq])
    ids = np.concatenate([seq.prompt_ids, seq.generated])
    return ids, np.concatenate([seq.prompt_segs, np.full(len(seq.generated), 2)])


def _decoded_logits(model: FaceModel, ids: np.ndarray, segs: np.ndarray) -> np.ndarray:
    """Logits of the generated positions through prefill + one decode step each (the KV-cache
    path, e.g. the fused CPU kernel), teacher-forced: (L - n, V), the text and image heads side
    by side (every backend holds those two; TensorRT's engines no other)."""
    backend, t = model.backend, model.templates
    slot = np.zeros(1, dtype=np.int64)
    n = int((segs == 1).sum())
    backend.prefill(slot, [ids[:n]], [segs[:n]])
    steps = [backend.decode(slot, ids[p : p + 1], np.array([p])) for p in range(n, len(ids))]
    return np.concatenate(
        [np.concatenate([backend.head(h, w) for w in (t.text_window, t.image_window)], axis=1)
         for h in steps]
    )  # fmt: skip


def reference_model(model_dir: Path) -> FaceModel:
    try:
        import torch  # noqa: F401
    except ImportError:
        return FaceModel(model_dir, precision="fp32", num_slots=1, progress=False)
    return FaceModel(model_dir, backend="torch", num_slots=1)


def run(model_dir: Path, progress=None) -> tuple[str, list[Check]]:
    """Returns the reference's backend name and one check per (provider, precision)."""
    reference = reference_model(model_dir)
    ids, segs = _probe_sequence(reference)
    ref_logits = reference.forward_logits(ids, segs)  # (L, V)
    checks = []
    for provider, precision in plan():
        if progress:
            progress(f"{provider} {precision}")
        check = Check(provider, precision)
        try:
            model = FaceModel(
                model_dir, precision=precision, providers=[provider], num_slots=1, progress=False
            )
            n = int((segs == 1).sum())  # full forward, then the decode path for the codes
            logits = np.concatenate(
                [model.forward_logits(ids, segs), _decoded_logits(model, ids, segs)]
            )
            ref = np.concatenate([ref_logits, ref_logits[n:]])
            check.decode = decode_path(model)
            check.top1 = float(np.mean(np.argmax(logits, 1) == np.argmax(ref, 1)))
            check.rel_error = float(np.abs(logits - ref).max() / np.abs(ref).max())
            check.decode_ms = float(np.median(time_decode(model, 17)) * 1e3)
            t = time.perf_counter()
            model.generate_faces(PROMPT, n=1, seed=0, candidates=1)
            check.face_s = time.perf_counter() - t
        except Exception as e:  # a provider that fails must not hide the others' results
            check.error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        checks.append(check)
    return reference.backend.name, checks


def table(checks: list[Check]) -> str:
    lines = [
        "| provider | precision | decode step | top-1 agreement | max rel. error | decode ms "
        "| one face s | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        verdict = "PASS" if c.passed else f"FAIL {c.error}".strip()
        lines.append(
            f"| {c.provider.removesuffix('ExecutionProvider')} | {c.precision} "
            f"| {c.decode or '—'} | {c.top1:.4f} "
            f"| {c.rel_error:.2e} | {c.decode_ms:.2f} | {c.face_s:.2f} | {verdict} |"
        )
    return "\n".join(lines)


# ---- the GPU backends (cuda, tensorrt) --------------------------------------------------------

CUDA_PRECISIONS = ("fp32", "fp16", "bf16")
# fp32: logits within 1e-4 of the largest |logit| and greedy codes and seeded draws identical;
# fp16 and bf16 by top-1 agreement (tests/test_cuda_backend.py: a flip only at near ties; their
# greedy codes and draws may part ways after one, so they are reported, not required); int8
# (TensorRT) by the CPU int8 bound.
DEVICE_MIN_TOP1 = {"fp32": 1.0, "fp16": 0.98, "bf16": 0.95, "int8": MIN_TOP1["int8"]}
DEVICE_BATCHES = (1, 16)
SEEDED_ROWS = 4


@dataclass
class DeviceCheck:
    backend: str
    precision: str
    lm_path: str = ""
    top1: float = float("nan")
    rel_error: float = float("nan")
    greedy_equal: bool = False
    samples_equal: float = float("nan")  # fraction of seeded rows drawn identically
    step_ms: dict[int, float] = field(default_factory=dict)  # batch -> median decode step
    floor_ms: float = float("nan")
    bandwidth_gb_s: float = float("nan")
    face_s: float = float("nan")
    face_codes: int = 0
    error: str = ""

    @property
    def passed(self) -> bool:
        if self.error or not self.top1 >= DEVICE_MIN_TOP1[self.precision]:
            return False
        exact = self.rel_error < FP32_REL_ERROR and self.greedy_equal and self.samples_equal == 1
        return self.precision != "fp32" or exact


def cuda_status() -> tuple[bool, str]:
    """Whether the CUDA backend can run here: (True, the GPU's name) or (False, why not)."""
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed (pip install torch, a CUDA build)"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return False, f"no CUDA GPU visible to PyTorch (torch {torch.__version__}, {build})"
    return True, torch.cuda.get_device_name(0)


def tensorrt_status() -> tuple[bool, str]:
    """Whether the TensorRT backend can run here: (True, TensorRT and the GPU) or (False, why
    not)."""
    from facert.export.tensorrt_build import gpu_identity, require_tensorrt

    try:
        version = require_tensorrt()
        name, (major, minor) = gpu_identity()
    except FacertError as e:
        return False, str(e)
    return True, f"TensorRT {version} on {name} (sm_{major}{minor})"


def tensorrt_precisions(
    model_dir: Path, engines_root: Path | None = None, progress=None
) -> list[str]:
    """The precisions whose TensorRT engines are built for this GPU and model; fp16's (the
    Jetson default) are built now if there are none."""
    from facert.export.tensorrt_build import PRECISIONS, build, find_engines

    found = []
    for precision in PRECISIONS:
        try:
            find_engines(model_dir, precision, engines_root)
        except FacertError:
            continue
        found.append(precision)
    if not found:
        build(model_dir, "fp16", engines_root=engines_root, progress=progress)
        found = ["fp16"]
    return found


def device_bandwidth(size_mib: int = 1024, repeats: int = 5) -> float:
    """Bytes per second the GPU streams: a device-to-device copy far larger than its caches reads
    and writes every byte once; the best of `repeats`, timed with CUDA events. NaN where PyTorch
    has no CUDA (a Jetson with TensorRT alone): the floor is then not reported."""
    try:
        import torch
    except ImportError:
        return float("nan")
    if not torch.cuda.is_available():
        return float("nan")

    src = torch.empty(size_mib * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.nbytes / best


def _seeded_draws(model: FaceModel) -> list[list[int]]:
    """SEEDED_ROWS image rows of 32 codes, seed 0, decoded together (the default sampling)."""
    seqs = [model.templates.to_image(PROMPT, SamplingParams(seed=0), i) for i in range(SEEDED_ROWS)]
    for s in seqs:
        s.max_new_tokens = 32
    model.engine.run(seqs)
    return [s.generated for s in seqs]


def time_steps(model: FaceModel, batch: int, steps: int = 20, warm: int = 3) -> float:
    """Median seconds of one decode step and its image head at `batch` rows (each after the
    image prompt in its own slot); the head's logits reach the host, so the step has finished."""
    seq = model.templates.to_image(PROMPT, GREEDY, 0)
    backend, window = model.backend, model.templates.image_window
    slots = np.arange(batch)
    backend.prefill(slots, [seq.prompt_ids] * batch, [seq.prompt_segs] * batch)
    tokens = np.random.default_rng(0).integers(window[0], window[1], (warm + steps, batch))
    times = []
    for i, token in enumerate(tokens):
        t = time.perf_counter()
        backend.head(backend.decode(slots, token, np.full(batch, len(seq.prompt_ids) + i)), window)
        times.append(time.perf_counter() - t)
    return float(np.median(times[warm:]))


def run_device(
    model_dir: Path,
    backend: str,
    precisions: list[str],
    progress=None,
    engines_root: Path | None = None,
) -> list[DeviceCheck]:
    """One check per precision of a GPU backend ("cuda" or "tensorrt", whose engines live under
    `engines_root`) against the CPU ONNX Runtime fp32 model (see the top)."""
    reference = FaceModel(model_dir, precision="fp32", num_slots=SEEDED_ROWS, progress=False)
    ids, segs = _probe_sequence(reference)
    n = int((segs == 1).sum())
    ref = np.concatenate(
        [reference.forward_logits(ids, segs), _decoded_logits(reference, ids, segs)]
    )
    ref_draws = _seeded_draws(reference)
    bandwidth = device_bandwidth()
    checks = []
    for precision in precisions:
        if progress:
            progress(f"{backend} {precision}")
        check = DeviceCheck(backend, precision)
        try:
            model = FaceModel(model_dir, backend=backend, precision=precision,
                              engine_dir=engines_root, num_slots=max(DEVICE_BATCHES),
                              progress=False)  # fmt: skip
            check.lm_path = model.backend.lm_path
            got_ids, _ = _probe_sequence(model)
            check.greedy_equal = bool(np.array_equal(got_ids[n:], ids[n:]))
            logits = np.concatenate([model.forward_logits(ids, segs),
                                     _decoded_logits(model, ids, segs)])  # fmt: skip
            check.top1 = float(np.mean(np.argmax(logits, 1) == np.argmax(ref, 1)))
            check.rel_error = float(np.abs(logits - ref).max() / np.abs(ref).max())
            draws = _seeded_draws(model)
            check.samples_equal = float(np.mean([a == b for a, b in zip(draws, ref_draws)]))
            model.generate_faces(PROMPT, n=1, seed=0, candidates=1)  # warm: VQGAN, cuDNN
            t = time.perf_counter()
            model.generate_faces(PROMPT, n=1, seed=0, candidates=1)
            check.face_s = time.perf_counter() - t
            check.face_codes = model.config.vqgan.num_codes_per_image
            # last: the timed steps write slots directly, under the engine's feet
            check.step_ms = {b: time_steps(model, b) * 1e3 for b in DEVICE_BATCHES}
            if backend == "cuda":  # TensorRT picks its own kernels and layouts: no floor
                window = model.templates.image_window
                check.floor_ms = model.backend.step_weight_bytes(window) / bandwidth * 1e3
            check.bandwidth_gb_s = bandwidth / 1e9
            check.lm_path = model.backend.lm_path  # again: Triton may have fallen back to torch
        except Exception as e:  # one precision failing must not hide the others' results
            check.error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        checks.append(check)
    return checks


def device_table(checks: list[DeviceCheck]) -> str:
    lines = [
        "| backend | precision | LM path | top-1 agreement | max rel. error | greedy equal "
        "| seeded draws equal | step ms b1 | step ms b16 | floor ms | × floor b1 | one face s | |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        verdict = "PASS" if c.passed else f"FAIL {c.error}".strip()
        b1, b16 = c.step_ms.get(1, float("nan")), c.step_ms.get(16, float("nan"))
        lines.append(
            f"| {c.backend} | {c.precision} | {c.lm_path or '—'} | {c.top1:.4f} "
            f"| {c.rel_error:.2e} | {'yes' if c.greedy_equal else 'no'} | {c.samples_equal:.2f} "
            f"| {b1:.2f} | {b16:.2f} | {c.floor_ms:.3f} | {b1 / c.floor_ms:.1f} "
            f"| {c.face_s:.2f} ({c.face_codes} codes) | {verdict} |"
        )
    return "\n".join(lines)
