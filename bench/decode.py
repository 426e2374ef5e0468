"""`facert bench decode`: time one decode step against the memory-bandwidth floor.

At batch 1 a decode step is memory-bound: it must read every weight it multiplies once. The
floor is those bytes (counted from the exported decode graph and the image head, so it follows
the precision) divided by the read bandwidth measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from facert.runtime.model import FaceModel
from facert.runtime.sequence import SamplingParams

from .machine import read_bandwidth
from .report import machine_line

PROMPT = "a smiling young woman with long blond hair and glasses"
ROUNDS = 5
WARM_STEPS = 3


def step_weight_bytes(engine_dir: Path) -> int:
    """Bytes of weights one image decode step reads: every initializer of lm_decode except
    embedding tables (a Gather reads one row), plus the image head."""
    total = 0
    for graph in ("lm_decode", "head_image"):
        model = onnx.load(engine_dir / f"{graph}.onnx", load_external_data=False)
        gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
        for t in model.graph.initializer:
            if t.name in gathered:
                continue
            length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
            total += (
                length
                if length is not None
                else len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
            )
    return total


def time_decode(model: FaceModel, steps: int) -> list[float]:
    """Seconds per decode step, batch 1, image window, continuing an image prompt: `steps`
    timed steps after WARM_STEPS untimed ones that warm the caches."""
    seq = model.templates.to_image(PROMPT, SamplingParams(seed=0), 0)
    backend, window = model.backend, model.templates.image_window
    slot = np.zeros(1, dtype=np.int64)
    backend.prefill(slot, [seq.prompt_ids], [seq.prompt_segs])
    rng = np.random.default_rng(0)
    times = []
    for i in range(WARM_STEPS + steps):
        token = rng.integers(window[0], window[1], 1)
        position = np.array([len(seq.prompt_ids) + i])
        t = time.perf_counter()
        backend.head(backend.decode(slot, token, position), window)
        times.append(time.perf_counter() - t)
    return times[WARM_STEPS:]


def decode_path(model: FaceModel) -> str:
    return model.backend.lm_path


def model_step_bytes(model: FaceModel) -> int:
    """Weight bytes one image decode step of this model's backend reads."""
    if model.backend.name == "onnxruntime":
        return step_weight_bytes(model.backend.engine_dir)
    if model.backend.name == "cuda":
        lm = model.config.lm
        return model.backend.step_weight_bytes((lm.text_vocab_size, lm.vocab_size))
    c = model.config.lm  # fp32 layers + final norm + image head
    per_layer = 4 * c.n_embd**2 + 2 * c.n_embd * c.n_ffn + 9 * c.n_embd + c.n_ffn
    return 4 * (c.n_layer * per_layer + 2 * c.n_embd + c.image_vocab_size * c.n_embd)


def run(
    model_dir: Path,
    configs: list[tuple[str, ...]],
    steps: int = 40,
    rounds: int = ROUNDS,
    threads: int | None = None,
    progress=None,
) -> dict:
    """Time (backend, precision[, decode]) configs side by side: every config is loaded first,
    then the rounds interleave them, so a noisy neighbour or frequency change hits all of them
    alike. `decode` is the ONNX Runtime backend's decode path (fused kernel or lm_decode graph).

    The floor's bandwidth is measured right before each config's steps in each round, and the
    ratio to the floor is the median over rounds of those paired ratios: on a shared machine the
    bandwidth available swings by a third within a minute, and a ratio between a step and a
    bandwidth measured at another moment would mostly measure the swing."""
    models = {}
    for c in configs:
        if progress:
            progress(f"loading {' '.join(c)}")
        models[c] = FaceModel(
            model_dir,
            backend=c[0],
            precision=c[1],
            decode=c[2] if len(c) > 2 else "auto",
            threads=threads,
            num_slots=1,
            progress=False,
        )
    weight_bytes = {c: model_step_bytes(m) for c, m in models.items()}
    best = {c: 0.0 for c in configs}  # the best read bandwidth seen by each config's device
    times: dict[tuple[str, ...], list[float]] = {c: [] for c in configs}
    paired: dict[tuple[str, ...], list[float]] = {c: [] for c in configs}
    for r in range(rounds):
        for c in configs:
            if progress:
                progress(f"round {r + 1}/{rounds}: {' '.join(c)}")
            near = backend_bandwidth(c[0])
            steps_s = time_decode(models[c], steps)
            times[c] += steps_s
            paired[c].append(statistics.median(steps_s) * near / weight_bytes[c])
            best[c] = max(best[c], near)
    rows = []
    for c in configs:
        step = statistics.median(times[c])
        floor = weight_bytes[c] / best[c]
        rows.append({
            "backend": c[0], "precision": c[1], "decode": decode_path(models[c]),
            "step_ms": step * 1e3,
            "p10_ms": float(np.percentile(times[c], 10)) * 1e3,
            "p90_ms": float(np.percentile(times[c], 90)) * 1e3,
            "weight_mb": weight_bytes[c] / 1e6, "floor_ms": floor * 1e3,
            "ratio_to_floor": statistics.median(paired[c]),
            "ratio_to_best_floor": step / floor, "bandwidth_gb_s": best[c] / 1e9,
        })  # fmt: skip
    return {
        "steps": steps * rounds,
        "rows": rows,
    }


def backend_bandwidth(backend: str) -> float:
    """Bytes per second the backend's device reads now: host memory, or the GPU's for cuda."""
    if backend == "cuda":
        from .doctor import device_bandwidth

        return device_bandwidth(size_mib=512, repeats=3)
    return read_bandwidth(size_mib=512, repeats=3)["bytes_per_s"]


def markdown(result: dict) -> str:
    lines = [
        f"Decode step, batch 1, image window, median of {result['steps']} steps; floor = weight "
        f"bytes / read bandwidth (host memory; the GPU's for cuda). × floor: median over rounds "
        f"of each round's step time over the floor at the bandwidth measured just before it; "
        f"× best: the overall median step over the floor at the best bandwidth seen (GB/s column)",
        "",
        machine_line(result["machine"]),
        "",
        "| backend | precision | decode step | step ms | p10–p90 ms | weights MB | best GB/s "
        "| best floor ms | × floor | × best |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['decode']} | {r['step_ms']:.2f} "
            f"| {r['p10_ms']:.2f}–{r['p90_ms']:.2f} | {r['weight_mb']:.0f} "
            f"| {r['bandwidth_gb_s']:.1f} "
            f"| {r['floor_ms']:.2f} | {r['ratio_to_floor']:.2f} | {r['ratio_to_best_floor']:.2f} |"
        )
    return "\n".join(lines)
