"""`facert bench throughput`: image tokens per second over a batch sweep (each row draws the 256
codes of one face after the same prompt length; LM only, no VQGAN), facert beside (a), (b), (c).

The bandwidth ceiling is the physical floor turned into a rate: a decode step reads every
weight once, so at batch B no step can beat B x read bandwidth / step weight bytes tokens/s
(until compute binds). The reference draws its samples one after another, so its rate is the
batch-1 rate at every batch size (modelled from its per-step cost, as in `tasks`).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from tqdm import tqdm

from .contestants import Facert, FullHead, prompt_length, ready_competitors
from .decode import WARM_STEPS, backend_bandwidth, model_step_bytes
from .models import BenchModel
from .prefill import matmul_peak, matrix_params
from .reference import Reference
from .report import machine_line, table, target, target_lines

TRANSFORMERS = "transformers GPT-2 (KV cache, torch fp32)"
STEPS = 15  # timed steps per (batch, position) in the step breakdown


def run(
    model: BenchModel,
    configs: list[tuple[str, str]],
    batches: list[int] = (1, 4, 16),
    competitors: bool = True,
    lengths: int = 4,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    facerts = [Facert(model.path, c, threads, slots=max(batches)) for c in configs]
    others, skipped = ready_competitors(model.path, threads, competitors)
    contestants = [*facerts, *(FullHead(f) for f in facerts), *others]
    rows = []
    with tqdm(total=len(batches) * len(contestants) + 2, desc=f"throughput {model.name}",
              disable=not progress) as bar:  # fmt: skip
        bar.set_postfix_str("warm-up")
        for c in contestants:  # at every batch: the cuda backend captures a graph per batch size
            for batch in batches:
                c.generate(batch, 0, new_tokens=8)
        bar.update()
        for batch in batches:
            for c in contestants:
                bar.set_postfix_str(f"{c.name} batch {batch}")
                r = c.generate(batch, seed=batch)
                rows.append({
                    "contestant": c.name, "batch": batch, "tokens": r.tokens, "seconds": r.total,
                    "tokens_per_s": r.tokens / r.total,
                    "step_ms": statistics.median(r.step_times) * 1e3, "ttft_ms": r.ttft * 1e3,
                })  # fmt: skip
                bar.update()
        bar.set_postfix_str("steps alone, matrix peak")
        prompt, n = prompt_length(model.path), facerts[0].model.config.vqgan.num_codes_per_image
        steps = [row for f in facerts for row in step_breakdown(f, batches, prompt, n)]
        peak = matmul_peak()
        bar.set_postfix_str("reference (modelled), bandwidth")
        ref = Reference(model.path)
        ref.calibrate(np.linspace(prompt, prompt + n - 1, lengths).round().astype(int).tolist())
        ref_rate = n / float(ref.step_costs(prompt, n).sum())
        rows += [{"contestant": ref.name, "batch": b, "tokens_per_s": ref_rate,
                  "note": "modelled; samples run one after another"} for b in batches]  # fmt: skip
        # each config's ceiling at its own device's bandwidth: host memory, or the GPU's for cuda
        bandwidths = {n: backend_bandwidth(n) for n in {f.model.backend.name for f in facerts}}
        bar.update()
    ceilings = {}
    for c in contestants:
        if isinstance(c, Facert):
            step, bw = model_step_bytes(c.model), bandwidths[c.model.backend.name]
            ceilings[c.name] = {"weight_bytes": step, "bandwidth_gb_s": bw / 1e9,
                                "tokens_per_s": [b * bw / step for b in batches]}  # fmt: skip
    return {
        "model": model.name, "path": str(model.path), "batches": list(batches),
        "prompt_len": prompt, "new_tokens": n,
        "rows": rows, "ceilings": ceilings, "skipped": skipped, "steps": steps,
        "matrix_params": matrix_params(facerts[0].model),
        "matmul_peak_gflop_s": peak / 1e9,
    }  # fmt: skip


def step_breakdown(f: Facert, batches: list[int], prompt: int, new_tokens: int) -> list[dict]:
    """The backend's decode step and image head alone (no engine, no sampling) at each batch,
    at the first and the last position a drawing decodes: the products cost every position the
    same, attention grows with the position, so two positions split a step between them."""
    backend, window = f.model.backend, f.model.templates.image_window
    rows = []
    for batch in batches:
        for position in (prompt, prompt + new_tokens - 1):
            slots = np.arange(batch)
            tokens, positions = np.full(batch, window[0]), np.full(batch, position)
            times = []
            for _ in range(WARM_STEPS + STEPS):
                start = time.perf_counter()
                backend.head(backend.decode(slots, tokens, positions), window)
                times.append(time.perf_counter() - start)
            rows.append({"contestant": f.name, "batch": batch, "position": position,
                         "step_ms": statistics.median(times[WARM_STEPS:]) * 1e3})  # fmt: skip
    return rows


def split_step(m: dict, name: str, batch: int) -> dict | None:
    """A config's step at `batch` split in two (linear in the position): the products' ms
    (position 0) and attention's ms at the drawing's middle position; `at`: the measured steps
    by position."""
    at = {r["position"]: r["step_ms"] for r in m.get("steps", [])
          if r["contestant"] == name and r["batch"] == batch}  # fmt: skip
    if len(at) != 2:
        return None
    (p0, t0), (p1, t1) = sorted(at.items())
    per_position = max(t1 - t0, 0.0) / (p1 - p0)
    middle = (p0 + p1) / 2
    return {"products_ms": t0 - per_position * p0, "attention_ms": per_position * middle,
            "step_ms": t0 + per_position * (middle - p0), "at": at}  # fmt: skip


def _rate(m: dict, name: str, batch: int) -> float | None:
    return next((r["tokens_per_s"] for r in m["rows"]
                 if r["contestant"] == name and r["batch"] == batch), None)  # fmt: skip


def targets(m: dict) -> list[dict]:
    batch = max(m["batches"])
    ours, theirs = _rate(m, "facert onnxruntime fp32", batch), _rate(m, TRANSFORMERS, batch)
    value = ours / theirs if ours and theirs else None
    name = f"throughput at batch {batch}, onnxruntime fp32 vs transformers GPT-2 (b)"
    return [target(name, value, 3, "transformers or the config not run")]


def markdown(result: dict) -> str:
    lines = [
        "### throughput: image tokens/s over a batch sweep\n",
        machine_line(result["machine"]),
        "",
        "Each row of a batch draws one face's codes after the same prompt length, sampling "
        "top-k 70; LM only, no VQGAN. One timed run per cell after a warm-up. facert computes only "
        "the 1024 image codes' logits; its `full head` rows compute the whole vocabulary's, as "
        "transformers and onnxruntime-genai do. Ceiling: batch x read bandwidth / step weight "
        "bytes (the decode floor as a rate), at the bandwidth of the memory the config reads "
        "(host memory; the GPU's for cuda), measured in the same run.",
    ]
    for m in result["models"]:
        names = list(dict.fromkeys(r["contestant"] for r in m["rows"]))
        head = ["contestant", *(f"batch {b} tok/s" for b in m["batches"]),
                *(f"× GPT-2 @{b}" for b in m["batches"])]  # fmt: skip
        body = []
        for name in names:
            rates = [_rate(m, name, b) for b in m["batches"]]
            hf = [_rate(m, TRANSFORMERS, b) for b in m["batches"]]
            body.append([name, *rates, *(r / h if r and h else None for r, h in zip(rates, hf))])
        for name, c in m["ceilings"].items():
            body.append([f"ceiling: {name} ({c['weight_bytes'] / 1e6:.0f} MB/step at "
                         f"{c['bandwidth_gb_s']:.0f} GB/s)",
                         *c["tokens_per_s"], *([None] * len(m["batches"]))])  # fmt: skip
        lines += [
            f"\n#### model {m['model']} ({m['new_tokens']} codes after {m['prompt_len']} ids)\n",
            table(head, body),
            "",
            *step_lines(m),
            *target_lines(targets(m)),
            *(f"- skipped {s['contestant']}: {s['reason']}" for s in m["skipped"]),
        ]
    return "\n".join(lines)


def step_lines(m: dict) -> list[str]:
    """The steps-alone table: where a batched step's time goes, and what bounds batch scaling."""
    if not m.get("steps"):
        return []
    positions = sorted({r["position"] for r in m["steps"]})
    head = ["config", "batch", *(f"step ms at {p}" for p in positions), "products ms",
            f"attention ms at {sum(positions) / 2:.0f}", "products G(FL)OP/s",
            "batch / batch 1, steps alone", "modelled best (products at the peak)"]  # fmt: skip
    body = []
    for name in dict.fromkeys(r["contestant"] for r in m["steps"]):
        one = split_step(m, name, 1)
        for batch in m["batches"]:
            split = split_step(m, name, batch)
            if split is None or one is None:
                continue
            at = [split["at"][p] for p in positions]
            rate = 2 * m["matrix_params"] * batch / (split["products_ms"] / 1e3) / 1e9
            best = None
            if batch > 1 and name.endswith("fp32"):  # the peak is a float32 product's
                at_peak = 2 * m["matrix_params"] * batch / m["matmul_peak_gflop_s"] / 1e6  # ms
                best = batch * one["step_ms"] / (at_peak + split["attention_ms"])
            body.append([name, batch, *at, split["products_ms"], split["attention_ms"], rate,
                         batch * one["step_ms"] / split["step_ms"], best])  # fmt: skip
    return [
        "",
        "Steps alone: the backend's decode step and image head, no engine or sampling, at the "
        "first and last position a drawing decodes; split linearly in the position into the "
        "products (every position alike) and attention (growing with the position), taken at "
        "the middle position. Modelled best: batch x the batch-1 step over the products at the "
        f"machine's float32 matrix peak ({m['matmul_peak_gflop_s']:.0f} GFLOP/s, a 2048³ numpy "
        "product in this run) plus attention as measured: no tiling can beat it (fp32 batches "
        "only; a batch-1 step is bound by reading the weights, not by the products).",
        "",
        table(head, body),
        "",
    ]


def plot(result: dict, fig) -> None:
    axes = fig.subplots(1, len(result["models"]), squeeze=False)[0]
    for ax, m in zip(axes, result["models"]):
        for name in dict.fromkeys(r["contestant"] for r in m["rows"]):
            ax.plot(m["batches"], [_rate(m, name, b) for b in m["batches"]], "o-", label=name)
        same: dict[tuple, list[str]] = {}  # configs with one ceiling share its line
        for name, c in m["ceilings"].items():
            key = tuple(round(r) for r in c["tokens_per_s"])
            same.setdefault(key, []).append(name.removeprefix("facert "))
        for rates, names in same.items():
            ax.plot(m["batches"], rates, ":", color="grey", lw=1)
            ax.annotate(f"ceiling {', '.join(names)}", (m["batches"][-1], rates[-1]),
                        fontsize=6, ha="right", va="bottom")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("image tokens / s (log)")
        ax.set_title(f"throughput — {m['model']}")
        ax.legend(fontsize=7)
