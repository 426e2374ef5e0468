"""`facert bench load`: Poisson arrivals of a mixed task stream at a few rates, served by a FIFO
loop around FaceModel (`server.py`): throughput, latency p50/p99, and goodput under a deadline.

Rates are multiples of the one-at-a-time capacity (1 / the mix's mean solo latency, measured
first, after the model's warm-up), so "1.0" means as many requests as the server could finish
unbatched. Each task's
deadline is a multiple of its solo latency. Three policies share each stream: `scheduler` (the
model's own, fed in real time through FaceModel.submit with each deadline: scheduled.py),
`fifo-batch` (what has arrived, batched as server.py says) and `one-at-a-time`.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from facert.runtime.engine import StepEvent

from . import scheduled
from .contestants import Facert
from .models import BenchModel
from .report import machine_line, table
from .server import Request, Server, poisson_stream
from .timing import summary_ms

MIX = {"to_image": 1 / 3, "to_caption": 1 / 3, "to_attributes": 1 / 3}
POLICIES = {"scheduler": 0, "fifo-batch": None, "one-at-a-time": 1}  # -> max requests a batch


def _solo(server: Server, tasks: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds each task takes alone (second of two runs; the first warms up), and the part of
    them that is not decode steps (encoding, prompts, image decoding: work that batching does
    not share), observed through the engine's step hook."""
    solo, unshared, decode = {}, {}, []

    def observe(event: StepEvent) -> None:
        if event.kind == "decode":
            decode.append(event.seconds)

    server.model.engine.observers.append(observe)
    try:
        for task in tasks:
            for _ in range(2):
                decode.clear()
                r = Request(0, task, 0.0)
                server.serve([r])
            solo[task], unshared[task] = r.finish, r.finish - sum(decode)
    finally:
        server.model.engine.observers.remove(observe)
    return solo, unshared


def _stats(reqs: list[Request], deadlines: dict[str, float], batches: list[int]) -> dict:
    span = max(r.finish for r in reqs) - min(r.arrival for r in reqs)
    met = [r for r in reqs if r.latency <= deadlines[r.task]]
    lat = summary_ms([r.latency for r in reqs])
    return {
        "throughput_rps": len(reqs) / span, "goodput_rps": len(met) / span,
        "met": len(met) / len(reqs), "p50_ms": lat["p50"], "p99_ms": lat["p99"],
        "mean_batch": float(np.mean(batches)), "span_s": span,
    }  # fmt: skip


def run(
    model: BenchModel,
    configs: list[tuple[str, str]],
    rates: list[float] = (0.5, 1.0, 2.0, 4.0),
    requests: int = 16,
    deadline: float = 3.0,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    out = []
    for config in configs:
        f = Facert(model.path, config, threads)
        attribute = next(iter(f.model.config.attributes), None)
        mix = {t: w for t, w in MIX.items() if attribute or t != "to_attributes"}
        bar = tqdm(total=len(rates) * len(POLICIES) + 1, desc=f"load {model.name} {f.name}",
                   disable=not progress)  # fmt: skip
        bar.set_postfix_str("warm-up, solo latencies")
        f.model.warm_up()  # as `facert serve` does: prices from warm runs
        solo, unshared = _solo(Server(f.model, 1, attribute), list(mix))
        bar.update()
        capacity = 1.0 / (sum(w * solo[t] for t, w in mix.items()) / sum(mix.values()))
        # no policy serves more than this: even if every decode step were shared for free, each
        # request's unshared work runs on its own
        ceiling = 1.0 / (sum(w * unshared[t] for t, w in mix.items()) / sum(mix.values()))
        deadlines = {t: deadline * s for t, s in solo.items()}
        rows = []
        for factor in rates:
            for policy, max_requests in POLICIES.items():
                bar.set_postfix_str(f"{policy} at {factor}x")
                stream = poisson_stream(factor * capacity, requests, mix, seed=int(factor * 1000))
                if policy == "scheduler":
                    stats = scheduled.serve(f.model, stream, deadlines, attribute)
                else:
                    server = Server(f.model, max_requests or requests, attribute)
                    server.serve(stream)
                    stats = _stats(stream, deadlines, server.batches)
                rows.append({"policy": policy, "rate_factor": factor,
                             "offered_rps": factor * capacity, **stats})  # fmt: skip
                bar.update()
        bar.close()
        out.append({"contestant": f.name, "solo_s": solo, "unshared_s": unshared,
                    "capacity_rps": capacity, "ceiling_rps": ceiling, "deadlines_s": deadlines,
                    "mix": mix, "rows": rows})  # fmt: skip
    return {"model": model.name, "path": str(model.path), "requests": requests,
            "deadline_factor": deadline, "configs": out}  # fmt: skip


def markdown(result: dict) -> str:
    lines = [
        "### load: Poisson arrivals of a mixed task stream\n",
        machine_line(result["machine"]),
        "",
        "`scheduler`: the model's scheduler, requests submitted in real time with their "
        "deadlines (it may refuse them at once, or cancel one that overruns); `fifo-batch` and "
        "`one-at-a-time`: a FIFO server loop around FaceModel (virtual clock, real service "
        "times). Rates are multiples of the one-at-a-time capacity; goodput counts requests "
        "that finished within their deadline (a multiple of the task's solo latency) per "
        "second; met is over all requests, admitted met over those the scheduler admitted; "
        "overran: admitted, then cancelled when it ran past its deadline.",
    ]
    head = ["policy", "rate ×", "offered req/s", "throughput req/s", "p50 ms", "p99 ms",
            "goodput req/s", "met", "admitted met", "refused", "refusal ms (max)", "overran",
            "mean batch"]  # fmt: skip
    for m in result["models"]:
        for c in m["configs"]:
            solo = ", ".join(f"{t} {s:.2f} s ({c['unshared_s'][t]:.2f} s unshared)"
                             for t, s in c["solo_s"].items())  # fmt: skip
            ceiling = c["ceiling_rps"] / c["capacity_rps"]
            body = [[r["policy"], r["rate_factor"], r["offered_rps"], r["throughput_rps"],
                     r["p50_ms"], r["p99_ms"], r["goodput_rps"], f"{r['met']:.0%}",
                     f"{r['admitted_met']:.0%}" if "admitted_met" in r else "-",
                     _refused(r) if "refused" in r else "-",
                     r.get("refusal_ms_max", "-"),
                     f"{r['overran']:.0%}" if "overran" in r else "-", r["mean_batch"]]
                    for r in c["rows"]]  # fmt: skip
            lines += [
                f"\n#### model {m['model']}, {c['contestant']}: {m['requests']} requests per "
                f"rate, mix {', '.join(c['mix'])} equally; solo {solo}; deadline "
                f"{m['deadline_factor']}x solo. Ceiling: {ceiling:.2f}x the capacity (modelled: "
                "the rate at which the unshared work alone fills the machine, as if every decode "
                "step were shared for free; no policy can sustain a higher rate)\n",
                table(head, body),
                "",
                *_target_lines(c),
            ]
    return "\n".join(lines)


def _refused(row: dict) -> str:
    """'21% (3 own, 2 promises)': refused for their own deadline (DeadlineExceeded), or because
    they would have made admitted requests late (FacertOverloaded)."""
    by = row.get("refused_by", {})
    own, promises = by.get("DeadlineExceeded", 0), by.get("FacertOverloaded", 0)
    return f"{row['refused']:.0%}" + (f" ({own} own, {promises} promises)" if by else "")


def _target_lines(config: dict) -> list[str]:
    """The scheduler issue's targets: at 2x, 95 % of all requests on time; at 4x, 95 % of the
    admitted ones, and every refusal within 10 ms of arrival."""
    rows = {r["rate_factor"]: r for r in config["rows"] if r["policy"] == "scheduler"}
    out = []
    if 2.0 in rows:
        met = rows[2.0]["met"]
        out.append(f"- at 2x: {met:.0%} of all requests met their deadline (target 95 %): "
                   f"{'met' if met >= 0.95 else 'not met'}")  # fmt: skip
    if 4.0 in rows:
        r = rows[4.0]
        ok = r["admitted_met"] >= 0.95 and r["refusal_ms_max"] <= 10
        out.append(f"- at 4x: {r['admitted_met']:.0%} of admitted requests met their deadline, "
                   f"refusals within {r['refusal_ms_max']:.1f} ms (targets 95 %, 10 ms): "
                   f"{'met' if ok else 'not met'}")  # fmt: skip
    return out


def plot(result: dict, fig) -> None:
    p99, good = fig.subplots(1, 2)
    for m in result["models"]:
        for c in m["configs"]:
            for policy in POLICIES:
                rows = [r for r in c["rows"] if r["policy"] == policy]
                x = [r["offered_rps"] for r in rows]
                label = f"{m['model']} {c['contestant'].removeprefix('facert ')} {policy}"
                p99.plot(x, [r["p99_ms"] / 1e3 for r in rows], "o-", label=label)
                good.plot(x, [r["goodput_rps"] for r in rows], "o-", label=label)
    p99.set(xlabel="offered load (req/s)", ylabel="latency p99 (s)", title="load: p99 latency")
    good.set(xlabel="offered load (req/s)", ylabel="goodput (req/s)", title="load: goodput")
    p99.legend(fontsize=7)
