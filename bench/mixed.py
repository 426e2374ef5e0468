"""`facert bench mixed`: decode tokens/s of a batch that mixes tasks (half the rows draw faces,
half write captions) beside same-size batches of one task, all through the scheduler.

A mixed step runs the layers once for every row, then each row's head over its own vocabulary
window, so mixing should cost nothing beyond the two windows' own heads: the mixed rate should
be within 10 % of the rate its rows would have in batches of their own task (the harmonic mean
of the drawing-only and caption-only rates, i.e. the rate if each row cost what it costs
alone). Rates count the decode steps in which every row of the batch ran (a caption may stop
early), observed through the engine's public hook.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from facert.runtime.engine import StepEvent
from facert.runtime.errors import FacertError
from facert.runtime.model import FaceModel

from .contestants import DESCRIPTION, Facert
from .models import BenchModel
from .report import machine_line, table

TARGET = 0.9  # mixed rate / the rate of the same rows in single-task batches


def _rate(m: FaceModel, drawings: int, captions: int, faces: np.ndarray) -> dict:
    """Submit the rows at once and time the decode steps that ran all of them."""
    batch = drawings + captions
    full = []

    def observe(event: StepEvent) -> None:
        if event.kind == "decode" and event.rows == batch:
            full.append(event.seconds)

    m.engine.observers.append(observe)
    try:
        with m.engine.exclusive():  # no step runs until every row is queued
            # at the captions' priority: drawings may then use the slots kept for analysis
            futures = [m.submit("generate_faces", DESCRIPTION, seed=i, candidates=1, priority=0)
                       for i in range(drawings)]  # fmt: skip
            futures += [m.submit("caption", faces[i], greedy=False, seed=i)
                        for i in range(captions)]  # fmt: skip
        for f in futures:
            f.result()
    finally:
        m.engine.observers.remove(observe)
    steps = full[1:]  # the first full step may still share its time with prefills
    if not steps:
        raise FacertError(f"no decode step ran all {batch} rows (captions ended too soon?)")
    return {"steps": len(steps), "tokens_per_s": batch * len(steps) / sum(steps)}


def run(
    model: BenchModel,
    configs: list[tuple[str, str]],
    batches: list[int] = (4, 16),
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    out = []
    for config in configs:
        f = Facert(model.path, config, threads, slots=max(batches))
        m = f.model
        faces = np.random.default_rng(0).integers(0, 256, (max(batches), 256, 256, 3), np.uint8)
        _rate(m, 1, 1, faces)  # warm-up
        rows = []
        for batch in tqdm(batches, desc=f"mixed {model.name} {f.name}", disable=not progress):
            half = batch // 2
            r = {kind: _rate(m, d, c, faces)
                 for kind, d, c in (("drawing", batch, 0), ("caption", 0, batch),
                                    ("mixed", half, batch - half))}  # fmt: skip
            alone = 2 / (1 / r["drawing"]["tokens_per_s"] + 1 / r["caption"]["tokens_per_s"])
            rows.append({"batch": batch, **r, "expected_tokens_per_s": alone,
                         "ratio": r["mixed"]["tokens_per_s"] / alone})  # fmt: skip
        m.close()
        out.append({"contestant": f.name, "rows": rows})
    return {"model": model.name, "path": str(model.path), "configs": out}


def markdown(result: dict) -> str:
    lines = [
        "### mixed: decode tokens/s of drawing and caption rows in one batch\n",
        machine_line(result["machine"]),
        "",
        "Rows submitted together through the scheduler; rates over the decode steps that ran "
        "every row. Expected: the harmonic mean of the drawing-only and caption-only rates (each "
        f"row at its own cost); target: mixed ≥ {TARGET:.0%} of it.",
    ]
    head = ["config", "batch", "drawing tok/s", "caption tok/s", "mixed tok/s", "expected tok/s",
            "mixed / expected", "target"]  # fmt: skip
    for m in result["models"]:
        body = [[c["contestant"], r["batch"], r["drawing"]["tokens_per_s"],
                 r["caption"]["tokens_per_s"], r["mixed"]["tokens_per_s"],
                 r["expected_tokens_per_s"], r["ratio"],
                 "met" if r["ratio"] >= TARGET else "not met"]
                for c in m["configs"] for r in c["rows"]]  # fmt: skip
        lines += [f"\n#### model {m['model']}\n", table(head, body)]
    return "\n".join(lines)


def plot(result: dict, fig) -> None:
    axes = fig.subplots(1, len(result["models"]), squeeze=False)[0]
    for ax, m in zip(axes, result["models"]):
        for c in m["configs"]:
            batches = [r["batch"] for r in c["rows"]]
            for kind in ("drawing", "caption", "mixed"):
                ax.plot(batches, [r[kind]["tokens_per_s"] for r in c["rows"]], "o-",
                        label=f"{c['contestant'].removeprefix('facert ')} {kind}")  # fmt: skip
        ax.set(xlabel="batch", ylabel="decode tokens / s", title=f"mixed — {m['model']}")
        ax.legend(fontsize=7)
