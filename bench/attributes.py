"""`facert bench attributes`: what asking about every attribute of a face costs beside asking
about one (score mode, one view), and what asking about the same face again costs.

Every question about one face branches from one prefill of its `[CLS] to attributes [SEP] codes
[SEP]` prefix, so all the model's attributes should cost little more than one (target: 1.3x);
the same face asked again finds its prefix in the cache and computes no prefix at all. Each
sample uses a new random face (no cache hits) except the repeat. Prompt tokens computed are
counted through the engine's public observer hook.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from facert.runtime.engine import StepEvent
from facert.runtime.model import FaceModel

from .contestants import Facert
from .models import BenchModel
from .report import machine_line, table
from .timing import summary_ms, timed

TARGET = 1.3  # all attributes at most this many times one attribute


def _ask(m: FaceModel, image: np.ndarray, names: list[str]) -> dict:
    """Seconds of one attributes() call and the prompt tokens its prefills computed."""
    computed = []

    def observe(event: StepEvent) -> None:
        if event.kind == "prefill":
            computed.append(event.tokens)

    m.engine.observers.append(observe)
    try:
        run = timed(lambda tick: m.attributes(image, names, views=1))
    finally:
        m.engine.observers.remove(observe)
    return {"seconds": run.total, "prompt_tokens": sum(computed)}


def _prefix_length(m: FaceModel, name: str) -> int:
    codes = np.zeros(m.config.vqgan.num_codes_per_image, dtype=np.int64)
    return m.templates.to_attribute(codes, name).shared_prefix


def run(
    model: BenchModel,
    configs: list[tuple[str, str]],
    samples: int = 5,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    out = []
    for config in configs:
        f = Facert(model.path, config, threads)
        m = f.model
        names = list(m.config.attributes)
        rng = np.random.default_rng(0)
        faces = rng.integers(0, 256, (2 * samples + 1, 256, 256, 3), dtype=np.uint8)
        _ask(m, faces[-1], names)  # warm-up
        one, every, again = [], [], []
        for i in tqdm(range(samples), desc=f"attributes {model.name} {f.name}",
                      disable=not progress):  # fmt: skip
            one.append(_ask(m, faces[2 * i], names[:1]))
            every.append(_ask(m, faces[2 * i + 1], names))
            again.append(_ask(m, faces[2 * i + 1], names))
        rows = {"one": one, "all": every, "again": again}
        summary = {k: summary_ms([r["seconds"] for r in v]) for k, v in rows.items()}
        out.append({
            "contestant": f.name, "attributes": len(names),
            "candidates": sum(len(v) for v in m.config.attributes.values()),
            "prefix_tokens": _prefix_length(m, names[0]), "runs": rows, "ms": summary,
            "ratio_all_to_one": summary["all"]["p50"] / summary["one"]["p50"],
            "again_prompt_tokens": max(r["prompt_tokens"] for r in again),
        })  # fmt: skip
        m.close()
    return {"model": model.name, "path": str(model.path), "samples": samples, "configs": out}


def markdown(result: dict) -> str:
    lines = [
        "### attributes: every attribute of a face beside one (score mode, one view)\n",
        machine_line(result["machine"]),
        "",
        "Median of the samples; each `one` and `all` sample asks about a new random face, "
        "`again` asks `all` about the face just asked. Prompt tokens: what the prefills "
        "computed (the shared prefix once, then each question's own tokens).",
    ]
    head = ["config", "attributes (candidates)", "one ms", "all ms", "all / one",
            f"target ≤ {TARGET}x", "again ms", "prefix tokens", "prompt tokens: all",
            "prompt tokens: again"]  # fmt: skip
    for m in result["models"]:
        body = []
        for c in m["configs"]:
            ratio = c["ratio_all_to_one"]
            body.append([
                c["contestant"], f"{c['attributes']} ({c['candidates']})", c["ms"]["one"]["p50"],
                c["ms"]["all"]["p50"], ratio, "met" if ratio <= TARGET else "not met",
                c["ms"]["again"]["p50"], c["prefix_tokens"], c["runs"]["all"][0]["prompt_tokens"],
                c["again_prompt_tokens"],
            ])  # fmt: skip
        lines += [f"\n#### model {m['model']} ({m['samples']} samples)\n", table(head, body)]
    return "\n".join(lines)


def plot(result: dict, fig) -> None:
    ax = fig.subplots()
    labels, values = [], []
    for m in result["models"]:
        for c in m["configs"]:
            for k in ("one", "all", "again"):
                labels.append(f"{m['model']}\n{c['contestant'].removeprefix('facert ')}\n{k}")
                values.append(c["ms"][k]["p50"])
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, fontsize=6)
    ax.set_ylabel("ms (median)")
    ax.set_title("attributes: one, all, all again")
