"""`facert bench tasks|throughput|load|attributes|mixed|memory|startup|prefill`: their arguments,
and one runner that resolves the models, runs the scenario on each, prints its markdown and
writes JSON, markdown and PNG.

Only argparse is imported here (the CLI builds its parser on every call); a scenario's module,
and torch with it, is imported when that scenario runs.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

FACERT_CONFIGS = "onnxruntime:fp32,onnxruntime:int8,onnxruntime:int4,torch:fp32"


def _numbers(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {e}") from e
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError("expected positive numbers, e.g. 1,4,16")
        return values

    return parse


def _common(p: argparse.ArgumentParser, configs: str, options: list[str]) -> None:
    p.add_argument(
        "--model",
        default="base,bundled",
        help="comma-separated: 'base' (real Talk2Face shapes, random weights, made locally), "
        "'bundled' (facert.load() with no path; skipped with the reason if that fails) or model "
        "directories (default: base,bundled)",
    )
    p.add_argument("--configs", default=configs, help=f"facert BACKEND:PRECISION list ({configs})")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("-o", "--output", type=Path, help="directory for NAME.json, NAME.md, NAME.png")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(options=["threads", *options])


def add_scenarios(bench: argparse._SubParsersAction, handler) -> None:
    """Add the scenarios to the `facert bench` subparsers; each calls handler(args)."""
    p = bench.add_parser("tasks", help="per task: TTFT, per token, end to end p50/p95/p99")
    _common(p, FACERT_CONFIGS, ["samples", "competitors", "lengths", "check_steps"])
    p.add_argument("--samples", type=int, default=5, help="timed calls per task (default 5)")
    p.add_argument("--lengths", type=int, default=6, help="lengths the reference step is timed at")
    p.add_argument("--check-steps", type=int, default=8, help="real reference steps to check")

    p = bench.add_parser("throughput", help="image tokens/s over a batch sweep")
    _common(p, FACERT_CONFIGS, ["batches", "competitors", "lengths"])
    p.add_argument("--batches", type=_numbers(int), default=[1, 4, 16], help="default 1,4,16")
    p.add_argument("--lengths", type=int, default=4, help="lengths the reference step is timed at")

    p = bench.add_parser("load", help="Poisson arrivals of mixed tasks: throughput, p99, goodput")
    _common(p, "onnxruntime:fp32", ["rates", "requests", "deadline"])
    p.add_argument(
        "--rates",
        type=_numbers(float),
        default=[0.5, 1.0, 2.0, 4.0],
        help="arrival rates as multiples of the one-at-a-time capacity (default 0.5,1,2,4)",
    )
    p.add_argument("--requests", type=int, default=16, help="requests per rate (default 16)")
    p.add_argument(
        "--deadline", type=float, default=3.0, help="deadline, x the task's solo latency (3)"
    )

    p = bench.add_parser("attributes", help="every attribute of a face beside one; a repeat")
    _common(p, "onnxruntime:fp32", ["samples"])
    p.add_argument("--samples", type=int, default=5, help="faces asked per case (default 5)")

    p = bench.add_parser("mixed", help="tokens/s of drawing and caption rows in one batch")
    _common(p, "onnxruntime:fp32", ["batches"])
    p.add_argument("--batches", type=_numbers(int), default=[4, 16], help="default 4,16")

    p = bench.add_parser("memory", help="peak RSS and KV bytes, each config in a fresh process")
    _common(p, FACERT_CONFIGS, ["batches", "competitors", "new_tokens"])
    p.add_argument("--batches", type=_numbers(int), default=[1, 16], help="default 1,16")
    p.add_argument(
        "--new-tokens", type=int, help="tokens drawn per row (default and most: one face's codes)"
    )

    p = bench.add_parser("prefill", help="prompt GFLOP/s beside the matrix-product peak")
    _common(p, "onnxruntime:fp32,onnxruntime:int8", ["runs"])
    p.add_argument("--runs", type=int, default=5, help="timed prefills per config (default 5)")

    p = bench.add_parser("startup", help="process start to the first caption, fresh processes")
    _common(p, "onnxruntime:fp32,onnxruntime:int8", ["runs"])
    p.add_argument("--runs", type=int, default=5, help="timed processes per case (default 5)")

    for name in ("tasks", "throughput", "memory"):
        bench.choices[name].add_argument(
            "--no-competitors",
            dest="competitors",
            action="store_false",
            help="facert and the reference only (no transformers, no onnxruntime-genai)",
        )
    for name in (
        "tasks",
        "throughput",
        "load",
        "attributes",
        "mixed",
        "memory",
        "startup",
        "prefill",
    ):
        bench.choices[name].set_defaults(func=handler)


def run_scenario(args: argparse.Namespace) -> None:
    from facert.runtime.errors import FacertError

    from .machine import describe
    from .models import parse_configs, resolve_models
    from .report import write

    try:
        scenario = importlib.import_module(f"facert.bench.{args.scenario}")
    except ImportError as e:  # torch, for the reference and the torch backend
        raise FacertError(
            f"facert bench {args.scenario} needs {e.name}: pip install 'facert[bench]'"
        ) from e
    configs = parse_configs(args.configs)
    models, skipped = resolve_models(args.model)
    options = {k: getattr(args, k) for k in args.options}
    per_model = [scenario.run(m, configs, progress=not args.quiet, **options) for m in models]
    result = {
        "scenario": args.scenario,
        "machine": describe(),
        "configs": [list(c) for c in configs],
        "options": options,
        "skipped_models": skipped,
        "models": per_model,
    }
    skips = [f"- skipped model {s['model']}: {s['reason']}" for s in skipped]
    text = "\n".join([scenario.markdown(result), *skips])
    print(text)
    for line in write(args.output, args.scenario, result, text, scenario.plot):
        print(f"wrote {line}" if not line.startswith("no ") else line)
