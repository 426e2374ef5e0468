"""`facert doctor`: the self-check a user runs on their own device.

It proves parity where the device is, not in our CI: every ONNX Runtime execution provider found
on this machine, at each precision it supports, runs the same prompt as the reference and must
agree within the bounds the test suite uses, on a full forward and on the decode path (the fused
CPU kernel or the lm_decode graph, teacher-forced); then it times a decode step and one face.
The reference is the exact PyTorch model when torch is installed, else the CPU fp32 graphs (which
CI checks against the PyTorch model and TencentPretrain's golden logits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from facert.runtime.model import FaceModel
from facert.runtime.sequence import GREEDY

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
    path, e.g. the fused CPU kernel), teacher-forced: (L - n, V)."""
    backend, vocab = model.backend, (0, model.config.lm.vocab_size)
    slot = np.zeros(1, dtype=np.int64)
    n = int((segs == 1).sum())
    backend.prefill(slot, [ids[:n]], [segs[:n]])
    steps = [backend.decode(slot, ids[p : p + 1], np.array([p])) for p in range(n, len(ids))]
    return np.concatenate([backend.head(hidden, vocab) for hidden in steps])


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
