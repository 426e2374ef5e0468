"""`facert bench prefill`: prompt throughput beside the machine's matrix-product peak.

A caption or an attribute answer is mostly prefill (its prompt holds the face's 256 codes), so
time to first token is prefill speed. Each config prefills one prompt of the task's length into
a slot (the backend's own `prefill`, as the engine calls it), best of several runs; its rate is
counted as 2 x (the LM's matrix weights) x tokens, the products that dominate it. Beside it, in
the same run, the peak: a large single-precision matrix product through numpy's BLAS.
"""

from __future__ import annotations

import os
import time

import numpy as np
from tqdm import tqdm

from facert.runtime.sequence import GREEDY

from .contestants import Facert
from .models import BenchModel
from .report import machine_line, model_table

TARGET = 0.6  # of the matrix-product peak
GEMM_SIZE = 2048


def matmul_peak(repeats: int = 5) -> float:
    """FLOP/s of a GEMM_SIZE^3 float32 product (best of `repeats`)."""
    rng = np.random.default_rng(0)
    a, b = (rng.random((GEMM_SIZE, GEMM_SIZE), dtype=np.float32) for _ in range(2))
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * GEMM_SIZE**3 / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matrix_params(model) -> int:
    c = model.config.lm
    return c.n_layer * (4 * c.n_embd**2 + 2 * c.n_embd * c.n_ffn)


def run(
    model: BenchModel,
    configs: list[tuple[str, str]],
    runs: int = 5,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    rows = []
    for config in tqdm(configs, desc=f"prefill {model.name}", disable=not progress):
        f = Facert(model.path, config, threads, slots=1)
        m = f.model
        seq = m.templates.to_caption(np.zeros(m.config.vqgan.num_codes_per_image, np.int64), GREEDY)
        ids, segs = seq.prompt_ids, seq.prompt_segs
        backend, slot = m.backend, np.array([0])
        with m.engine.exclusive():  # the engine thread stays idle while we time its backend
            backend.prefill(slot, [ids], [segs])
            peak = matmul_peak()
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                backend.prefill(slot, [ids], [segs])
                times.append(time.perf_counter() - start)
            best = min(times)
            peak = max(peak, matmul_peak())  # before and after: the better of the two
        rate = 2 * matrix_params(m) * len(ids) / best
        rows.append({"contestant": f.name, "lm_path": backend.lm_path, "tokens": len(ids),
                     "ms": best * 1e3, "gflop_s": rate / 1e9, "peak_gflop_s": peak / 1e9,
                     "of_peak": rate / peak})  # fmt: skip
        m.close()
    return {"model": model.name, "path": str(model.path), "rows": rows,
            "load_average": os.getloadavg()}  # fmt: skip


def markdown(result: dict) -> str:
    lines = [
        "### prefill: prompt throughput beside the matrix-product peak\n",
        machine_line(result["machine"]),
        "",
        "One caption prompt prefilled into a slot, best of the runs; GFLOP/s = 2 × the LM's "
        f"matrix weights × tokens / time; peak: a {GEMM_SIZE}³ float32 numpy product in the "
        f"same run (best before and after). Target: at least {TARGET:.0%} of the peak.",
    ]
    head = ["config", "LM path", "tokens", "ms", "GFLOP/s", "peak GFLOP/s", "of peak", "target"]
    for m in result["models"]:
        body = [[r["contestant"], r["lm_path"], r["tokens"], r["ms"], r["gflop_s"],
                 r["peak_gflop_s"], f"{r['of_peak']:.0%}",
                 "met" if r["of_peak"] >= TARGET else "not met"]
                for r in m["rows"]]  # fmt: skip
        lines += model_table(m, head, body)
    return "\n".join(lines)


def plot(result: dict, fig) -> None:
    ax = fig.subplots()
    labels = [f"{m['model']}\n{r['contestant']}" for m in result["models"] for r in m["rows"]]
    ax.barh(labels, [r["gflop_s"] for m in result["models"] for r in m["rows"]], label="prefill")
    peaks = [r["peak_gflop_s"] for m in result["models"] for r in m["rows"]]
    ax.scatter(peaks, labels, color="k", marker="|", s=300, label="matrix-product peak")
    ax.set(xlabel="GFLOP/s", title="prefill")
    ax.legend(fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
