"""`facert bench tasks`: each task end to end through the public API, per facert config, beside
the reference algorithm (a) and, for the image tokens, the competitors (b) and (c) at batch 1.

Rounds interleave every contestant, and the first round is a warm-up that is not kept. The
reference draws one face really end to end (minutes on the base shape): that timed run is the
headline to_image ratio. Its other rows are modelled: its per-step cost is measured at a few
sequence lengths and summed over the lengths each task passes through (`reference.py`); those
rows say "modelled", and the JSON holds a real-loop check of that model.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from tqdm import tqdm

from facert.runtime.sequence import SamplingParams
from facert.runtime.tasks import Templates

from .contestants import DESCRIPTION, Facert, ready_competitors
from .models import BenchModel
from .reference import Reference
from .report import target
from .timing import Run, summary_ms, timed_call

TASKS = ("to_image", "to_caption", "to_attributes")


def _calls(f: Facert, attribute: str | None) -> dict:
    m = f.model
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    calls = {
        "to_image": lambda seed: m.generate_faces(DESCRIPTION, n=1, seed=seed, candidates=1),
        "to_caption": lambda seed: m.caption(image),
    }
    if attribute:
        calls["to_attributes"] = lambda seed: m.attributes(image, attribute, views=1)
    return calls


def _timed(f: Facert, call, seed: int) -> Run:
    return timed_call(f.model, lambda: call(seed))


def _measured(task: str, name: str, runs: list[Run], lm_only: bool) -> dict:
    steps = [s for r in runs for s in r.step_times]
    return {
        "task": task, "contestant": name, "kind": "measured",
        "ttft_ms": summary_ms([r.ttft for r in runs])["p50"],
        "per_token_ms": summary_ms(steps)["p50"] if steps else None,
        "lm_ms": summary_ms([r.token_times[-1] for r in runs])["p50"],
        "e2e_ms": summary_ms([r.total for r in runs]),
        "note": "LM only (no VQGAN), same prompt length" if lm_only else "",
    }  # fmt: skip


def _prompt_lengths(templates: Templates, attribute: str | None) -> dict[str, int]:
    codes = np.zeros(templates.config.vqgan.num_codes_per_image, dtype=np.int64)
    lengths = {
        "to_image": templates.to_image(DESCRIPTION, SamplingParams(), 0),
        "to_caption": templates.to_caption(codes, SamplingParams()),
    }
    if attribute:
        lengths["to_attributes"] = templates.to_attribute(codes, attribute)
    return {task: len(seq.prompt_ids) for task, seq in lengths.items()}


def _reference(ref: Reference, prompts: dict[str, int], lengths: int, check_steps: int):
    """Modelled rows of the reference: the script runs seq_length - L steps for every task; for
    to_image the row stops at 256 codes (what any full-recompute loop needs) and the note
    gives the script's own step count."""
    total = ref.config.lm.seq_length
    span = np.linspace(min(prompts.values()), total - 1, lengths)
    ref.calibrate(span.round().astype(int).tolist())
    vq = ref.vqgan_seconds()
    rows = []
    for task, prompt_len in prompts.items():
        scripted = total - prompt_len
        steps = ref.config.vqgan.num_codes_per_image if task == "to_image" else scripted
        costs = ref.step_costs(prompt_len, steps)
        vqgan = vq["decode"] if task == "to_image" else vq["encode"]
        lm = float(costs.sum())
        note = f"modelled: {steps} full forwards"
        if task == "to_image":
            as_scripted = float(ref.step_costs(prompt_len, scripted).sum()) + vqgan
            note += f"; as scripted ({scripted} steps) {as_scripted:.0f} s"
        ttft = costs[0] + (0.0 if task == "to_image" else vqgan)
        rows.append({
            "task": task, "contestant": ref.name, "kind": "modelled",
            "ttft_ms": ttft * 1e3, "per_token_ms": float(costs.mean()) * 1e3, "lm_ms": lm * 1e3,
            "e2e_ms": {"n": 0, "mean": None, "p50": (lm + vqgan) * 1e3, "p95": None, "p99": None},
            "note": note,
        })  # fmt: skip
    timed = ref.time_face(prompts["to_image"])
    rows.append({
        "task": "to_image", "contestant": ref.name, "kind": "timed",
        "ttft_ms": None, "per_token_ms": timed["lm_s"] / timed["steps"] * 1e3,
        "lm_ms": timed["lm_s"] * 1e3,
        "e2e_ms": {"n": 1, "mean": None, "p50": timed["total_s"] * 1e3, "p95": None, "p99": None},
        "note": f"timed end to end: {timed['steps']} full forwards + VQGAN decode, one run",
    })  # fmt: skip
    info = {
        "lengths": ref.lengths, "step_s": ref.costs, "vqgan_s": vq,
        "check": ref.check(prompts["to_image"], check_steps), "timed_face": timed,
    }  # fmt: skip
    return rows, info


def run(
    model: BenchModel,
    configs: list[tuple[str, str]],
    samples: int = 5,
    competitors: bool = True,
    lengths: int = 6,
    check_steps: int = 8,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    facerts = [Facert(model.path, c, threads) for c in configs]
    attribute = next(iter(facerts[0].model.config.attributes), None)
    others, skipped = ready_competitors(model.path, threads, competitors)
    if attribute is None:
        skipped.append({"contestant": "to_attributes", "reason": "the model lists no attributes"})
    jobs = [(task, f.name, partial(_timed, f, call))
            for f in facerts for task, call in _calls(f, attribute).items()]  # fmt: skip
    jobs += [("to_image", c.name, partial(c.generate, 1)) for c in others]
    runs: dict[tuple[str, str], list[Run]] = {}
    with tqdm(total=(samples + 1) * len(jobs) + 1, desc=f"tasks {model.name}",
              disable=not progress) as bar:  # fmt: skip
        for r in range(samples + 1):
            for task, name, job in jobs:
                bar.set_postfix_str(f"{name} {task}")
                result = job(r)
                if r:  # round 0 warms up
                    runs.setdefault((task, name), []).append(result)
                bar.update()
        bar.set_postfix_str("reference (a face end to end, then modelled)")
        prompts = _prompt_lengths(facerts[0].model.templates, attribute)
        ref_rows, ref_info = _reference(Reference(model.path), prompts, lengths, check_steps)
        bar.update()
    lm_only = {c.name for c in others}
    rows = [_measured(task, name, rs, name in lm_only) for (task, name), rs in runs.items()]
    rows = sorted(rows + ref_rows, key=lambda x: TASKS.index(x["task"]))
    return {
        "model": model.name, "path": str(model.path), "samples": samples,
        "prompt_lengths": prompts, "rows": rows, "skipped": skipped, "reference": ref_info,
    }  # fmt: skip


def _find(rows: list[dict], task: str, contestant: str) -> dict | None:
    return next((r for r in rows if r["task"] == task and r["contestant"] == contestant), None)


def _reference_row(rows: list[dict], task: str) -> dict | None:
    """The reference's row a task's ratio is taken against: its timed run where there is one,
    else the modelled figure."""
    ours = [r for r in rows if r["task"] == task and r["kind"] in ("timed", "modelled")]
    return min(ours, key=lambda r: r["kind"] != "timed", default=None)


def targets(m: dict) -> list[dict]:
    """The issue's targets for this scenario: to_image vs the reference, per token vs GPT-2."""
    rows, out = m["rows"], []
    ref = _reference_row(rows, "to_image")
    hf = _find(rows, "to_image", "transformers GPT-2 (KV cache, torch fp32)")
    for precision, goal in (("fp32", 20), ("int8", 50)):
        f = _find(rows, "to_image", f"facert onnxruntime {precision}")
        value = ref["e2e_ms"]["p50"] / f["e2e_ms"]["p50"] if f else None
        name = f"to_image end to end, onnxruntime {precision} vs reference (a)"
        out.append(target(name, value, goal, "config not run"))
    f = _find(rows, "to_image", "facert onnxruntime fp32")
    value = hf["per_token_ms"] / f["per_token_ms"] if f and hf else None
    name = "per token at batch 1, onnxruntime fp32 vs transformers GPT-2 (b)"
    out.append(target(name, value, 2, "transformers or the config not run"))
    return out


def markdown(result: dict) -> str:
    from .report import machine_line, table, target_lines

    lines = [
        f"### tasks: time to first token, per token, end to end (batch 1)\n\n"
        f"{machine_line(result['machine'])}\n\n"
        "Public API calls (`generate_faces(n=1, candidates=1)`, `caption`, "
        "`attributes(mode='score', views=1)`); "
        "p50/p95/p99 over the samples after one warm-up round; TTFT counts from the call "
        "(VQGAN encode included for the image tasks); 'LM done' is when the last token was "
        "drawn. × reference is against the reference's face timed end to end for to_image, "
        "and against its modelled figures (per-step cost measured at several lengths, see "
        "check) for the other tasks. The reference generates answers; facert's "
        "`to_attributes` scores the candidate answers (a forced token or two)."
    ]
    for m in result["models"]:
        head = ["task", "contestant", "TTFT ms", "per token ms", "LM done ms", "e2e p50 ms",
                "p95", "p99", "n", "× reference", "note"]  # fmt: skip
        refs = {t: _reference_row(m["rows"], t)["e2e_ms"]["p50"]
                for t in {r["task"] for r in m["rows"] if r["kind"] != "measured"}}  # fmt: skip
        body = [
            [r["task"], r["contestant"], r["ttft_ms"], r["per_token_ms"], r["lm_ms"],
             r["e2e_ms"]["p50"], r["e2e_ms"]["p95"], r["e2e_ms"]["p99"], r["e2e_ms"]["n"],
             refs[r["task"]] / r["e2e_ms"]["p50"] if r["task"] in refs and not r["note"] else None,
             r["note"]]
            for r in m["rows"]
        ]  # fmt: skip
        c = m["reference"]["check"]
        lines += [
            f"\n#### model {m['model']} (prompt lengths {m['prompt_lengths']})\n",
            table(head, body),
            "",
            f"Reference model check: the real loop ran {c['steps']} steps from "
            f"{c['prompt_len']} ids in {c['measured_s']:.2f} s; the model says "
            f"{c['modelled_s']:.2f} s ({c['error']:+.0%}).",
            "",
            *target_lines(targets(m)),
            *(f"- skipped {s['contestant']}: {s['reason']}" for s in m["skipped"]),
        ]
    return "\n".join(lines)


def plot(result: dict, fig) -> None:
    axes = fig.subplots(len(result["models"]), 2, squeeze=False)
    for (e2e, per_token), m in zip(axes, result["models"]):
        rows = [r for r in m["rows"] if not r["note"].startswith("LM only")]
        names = sorted({r["contestant"] for r in rows})
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [t for t, task in enumerate(TASKS) if _find(rows, task, name)]
            ys = [_find(rows, TASKS[t], name)["e2e_ms"]["p50"] / 1e3 for t in xs]
            e2e.bar(np.array(xs) + i * width, ys, width, label=name)
        e2e.set_xticks(np.arange(len(TASKS)) + 0.4 - width / 2, TASKS)
        e2e.set_yscale("log")
        e2e.set_ylabel("end to end, p50 (s, log)")
        e2e.set_title(f"tasks, batch 1 — {m['model']}")
        e2e.legend(fontsize=7)
        image = [r for r in m["rows"] if r["task"] == "to_image"]
        per_token.barh([r["contestant"] for r in image], [r["per_token_ms"] for r in image])
        per_token.invert_yaxis()
        per_token.set_xscale("log")
        per_token.tick_params(axis="y", labelsize=7)
        per_token.set_xlabel("ms per image token, batch 1 (log)")
        per_token.set_title(f"to_image per token — {m['model']}")
