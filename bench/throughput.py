"""`facert bench throughput`: image tokens per second over a batch sweep (each row draws the 256
codes of one face after the same prompt length; LM only, no VQGAN), facert beside (a), (b), (c).

The bandwidth ceiling is the physical floor turned into a rate: a decode step reads every
weight once, so at batch B no step can beat B x read bandwidth / step weight bytes tokens/s
(until compute binds). The reference draws its samples one after another, so its rate is the
batch-1 rate at every batch size (modelled from its per-step cost, as in `tasks`).
"""

from __future__ import annotations

import statistics

import numpy as np
from tqdm import tqdm

from .contestants import Facert, FullHead, prompt_length, ready_competitors
from .decode import backend_bandwidth, model_step_bytes
from .models import BenchModel
from .reference import Reference
from .report import machine_line, table, target, target_lines

TRANSFORMERS = "transformers GPT-2 (KV cache, torch fp32)"


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
        bar.set_postfix_str("reference (modelled), bandwidth")
        ref = Reference(model.path)
        prompt, n = prompt_length(model.path), ref.config.vqgan.num_codes_per_image
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
        "rows": rows, "ceilings": ceilings, "skipped": skipped,
    }  # fmt: skip


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
            *target_lines(targets(m)),
            *(f"- skipped {s['contestant']}: {s['reason']}" for s in m["skipped"]),
        ]
    return "\n".join(lines)


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
