"""`facert bench memory`: peak resident memory and KV-cache bytes per contestant and batch, each
measured in a fresh process (`memory_probe.py`) while it draws a batch of image tokens. facert
allocates its static KV cache for as many slots as the batch (the default FaceModel holds 16)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from tqdm import tqdm

from facert.runtime.config import load_config
from facert.runtime.errors import FacertError

from .contestants import COMPETITORS
from .models import BenchModel
from .report import machine_line, table


def _probe(kind: str, model: BenchModel, batch: int, new_tokens: int, threads: int | None) -> dict:
    args = [kind, str(model.path), str(batch), str(new_tokens), str(threads or 0)]
    # run from the temporary directory: from a facert checkout, `python -m` would put the
    # checkout's top-level kernels/ on the path, where transformers imports its own `kernels`
    proc = subprocess.run([sys.executable, "-m", "facert.bench.memory_probe", *args],
                          capture_output=True, text=True, cwd=tempfile.gettempdir())  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise FacertError(f"memory probe for {kind} at batch {batch} failed:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(
    model: BenchModel,
    configs: list[tuple[str, str]],
    batches: list[int] = (1, 16),
    competitors: bool = True,
    new_tokens: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    codes = load_config(model.path).vqgan.num_codes_per_image
    new_tokens = min(new_tokens or codes, codes)  # an image prompt has room for one face
    kinds = [f"{b}:{p}" for b, p in configs] + list(COMPETITORS if competitors else ())
    jobs = [(k, b) for k in kinds for b in batches] + [("reference", 1)]
    rows, skipped = [], {}
    for kind, batch in tqdm(jobs, desc=f"memory {model.name}", disable=not progress):
        if kind in skipped:
            continue
        row = _probe(kind, model, batch, new_tokens, threads)
        if "skipped" in row:
            skipped[kind] = row["skipped"]
        else:
            rows.append(row)
    return {"model": model.name, "path": str(model.path), "new_tokens": new_tokens, "rows": rows,
            "skipped": [{"contestant": k, "reason": r} for k, r in skipped.items()]}  # fmt: skip


def markdown(result: dict) -> str:
    lines = [
        "### memory: peak resident memory and KV cache, one fresh process per cell\n",
        machine_line(result["machine"]),
        "",
        "RSS after imports, after loading the model, and the peak while drawing the batch's "
        "image tokens; KV = cache bytes held at the end (facert: its static cache, one slot "
        "per row; genai: its shared buffers, computed from their shape; transformers: its "
        "dynamic cache; the reference keeps none and runs two full-length steps).",
    ]
    head = ["contestant", "batch", "imports MiB", "loaded MiB", "peak MiB", "KV MiB"]
    for m in result["models"]:
        body = [[r["contestant"], r["batch"], r["imports_mb"], r["loaded_mb"], r["peak_mb"],
                 r["kv_mb"]] for r in m["rows"]]  # fmt: skip
        lines += [
            f"\n#### model {m['model']} ({m['new_tokens']} tokens per row)\n",
            table(head, body),
            *(f"- skipped {s['contestant']}: {s['reason']}" for s in m["skipped"]),
        ]
    return "\n".join(lines)


def plot(result: dict, fig) -> None:
    axes = fig.subplots(1, len(result["models"]), squeeze=False)[0]
    for ax, m in zip(axes, result["models"]):
        labels = [f"{r['contestant'].removeprefix('facert ')} @{r['batch']}" for r in m["rows"]]
        peaks = [r["peak_mb"] for r in m["rows"]]
        kv = [r["kv_mb"] for r in m["rows"]]
        ax.barh(labels, peaks, label="peak RSS")
        ax.barh(labels, kv, label="KV cache")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("MiB")
        ax.set_title(f"memory — {m['model']}")
        ax.legend(fontsize=7)
