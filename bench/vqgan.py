"""`facert bench vqgan`: the VQGAN's encoder and decoder in fp32 and in int8, side by side.

int8 engines run the VQGAN's expensive convolutions in int8 (export/vqgan_quant.py). This
times one image through each graph of the fp32 and the int8 engine, interleaved (fp32, int8,
fp32, ...) so that other jobs on the machine slow both alike, and reports the minimum and the
median of the runs. Beside the engine's choice it quantizes a few other sets of convolutions
from the same calibration (every conv; fewer or more levels), to show what each costs in
quality. Quality, on held-out synthetic faces (a dataset seed calibration never draws):
- decoder: PSNR (dB) of its images against the fp32 decoder's, from the same codes
  (target: 40 dB);
- encoder: the fraction of codes equal to fp32's, and the PSNR of the fp32 decoder's images of
  its codes against those of fp32's codes (a changed code may pick an almost equal vector);
- round trip: the int8 encoder and decoder against fp32's, image against image.
Default model: the base shape (bench/base_model.py: the taming FFHQ VQGAN's shapes with random
weights, so quality there says how much noise the int8 arithmetic adds, not how faces look).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from facert.runtime.config import load_config
from facert.runtime.errors import FacertError
from facert.runtime.images import scale_pixels, to_uint8
from facert.runtime.onnx_engines import cache_root, read_manifest, resolve_engine

from .machine import describe
from .report import machine_line, table, write

TARGET_SPEEDUP = 2.0  # encode + decode, int8 engine against fp32
TARGET_PSNR_DB = 40.0
GRAPHS = ("vqgan_encoder", "vqgan_decoder")
# other sets of quantized convs, beside the engine's (vqgan_quant.QUANTIZED_CONVS)
VARIANTS = {
    "vqgan_encoder": {
        "every conv": r".",
        "down.0-1 conv1/2": r"^encoder\.down\.[01]\.block\.\d+\.conv[12]$",
    },
    "vqgan_decoder": {
        "no int8 (sub-pixel upsampling only)": r"(?!)",
        "every conv": r".",
        "up.0-1 conv1/2": r"^decoder\.up\.[01]\.block\.\d+\.conv[12]$",
        "up.0-3 conv1/2": r"^decoder\.up\.[0-3]\.block\.\d+\.conv[12]$",
        "up.0-2 conv1/2 + up.1 upsample": r"^decoder\.up\.([012]\.block\.\d+\.conv[12]|1\.upsa)",
    },
}


def _session(model: onnx.ModelProto | Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def _engine_graph(model_dir: Path, precision: str, graph: str, progress: bool) -> Path:
    """A graph file of the model's engine at `precision` (exported first if need be); ONNX
    Runtime finds its weights beside it."""
    engine = resolve_engine(model_dir, precision, None, progress)
    return engine / read_manifest(engine)["graphs"][graph]["file"]


def _variants(model_dir: Path, progress: bool) -> dict[str, dict[str, onnx.ModelProto]]:
    """VARIANTS quantized from one calibration per graph (vqgan_quant's faces and codes)."""
    from facert.export.onnx_graphs import vqgan_decoder_graph, vqgan_encoder_graph
    from facert.export.vqgan_quant import (
        calibration_images,
        code_batches,
        encode,
        image_batches,
        quantize_graph,
        subpixel_upsampling,
    )
    from facert.runtime.config import VQGAN_FILE, load_weights

    config, weights = load_config(model_dir), load_weights(model_dir / VQGAN_FILE)
    fp32 = {
        "vqgan_encoder": vqgan_encoder_graph(weights, config.vqgan),
        "vqgan_decoder": subpixel_upsampling(vqgan_decoder_graph(weights, config.vqgan)),
    }  # as in the int8 engine: the variants differ from it only in which convs are int8
    images = calibration_images(config)
    data = {
        "vqgan_encoder": lambda: image_batches(images),
        "vqgan_decoder": lambda: code_batches(encode(fp32["vqgan_encoder"], images)),
    }
    out: dict[str, dict[str, onnx.ModelProto]] = {g: {} for g in GRAPHS}
    with tempfile.TemporaryDirectory() as tmp:
        for graph in GRAPHS:
            cache = Path(tmp) / f"{graph}.json"  # the first variant calibrates, the others read
            for label, pattern in tqdm(VARIANTS[graph].items(), desc=f"quantizing {graph}",
                                       disable=not progress):  # fmt: skip
                out[graph][label] = quantize_graph(fp32[graph], pattern, data[graph](), cache)
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean PSNR (dB) over images of decoder outputs in [-1, 1], as uint8 images."""
    mse = ((to_uint8(a).astype(np.float64) - to_uint8(b)) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def _quality(graph: str, session, ref: dict, fp32: dict) -> dict:
    """How close a quantized graph's results are to fp32's on the held-out faces."""
    if graph == "vqgan_decoder":
        return {"psnr_db": _psnr(ref["images"], session.run(None, {"codes": ref["codes"]})[0])}
    codes = session.run(None, {"images": ref["faces"]})[0]
    decoded = fp32["vqgan_decoder"].run(None, {"codes": codes})[0]
    return {"code_agreement": float((codes == ref["codes"]).mean()),
            "psnr_db": _psnr(ref["images"], decoded)}  # fmt: skip


def _timings(calls: dict[str, Callable[[], object]], runs: int, progress: bool) -> dict:
    """Seconds of each call, interleaved run by run after one warm-up each."""
    for call in calls.values():
        call()
    seconds: dict[str, list[float]] = {k: [] for k in calls}
    for _ in tqdm(range(runs), desc="timing", disable=not progress):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[key].append(time.perf_counter() - start)
    return {k: {"min_ms": 1e3 * min(v), "median_ms": 1e3 * float(np.median(v)),
                "runs_ms": [1e3 * s for s in v]} for k, v in seconds.items()}  # fmt: skip


def _count_int8(model: onnx.ModelProto) -> tuple[int, int]:
    from facert.export.vqgan_quant import quantized_convs

    return quantized_convs(model), sum(n.op_type == "Conv" for n in model.graph.node)


def run(
    model_dir: Path | None = None,
    runs: int = 5,
    faces: int = 4,
    threads: int = 2,
    variants: bool = True,
    out_dir: Path | None = Path("bench/results"),
    progress: bool = True,
) -> dict:
    """Time and compare the fp32 and int8 VQGAN graphs; write vqgan.{json,md} into out_dir."""
    from facert.export.train.data import EVAL_SEED
    from facert.export.train.data import faces as draw_faces

    from .base_model import make_base_model

    model_dir = Path(model_dir or make_base_model(cache_root() / "base-random"))
    config = load_config(model_dir)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    paths = {(p, g): _engine_graph(model_dir, p, g, progress) for p in ("fp32", "int8")
             for g in GRAPHS}  # fmt: skip
    export_s = time.perf_counter() - start
    models = {("fp32", g): onnx.load(paths["fp32", g]) for g in GRAPHS}
    models |= {("int8 engine", g): onnx.load(paths["int8", g]) for g in GRAPHS}
    if not all(_count_int8(models["int8 engine", g])[0] for g in GRAPHS):
        raise FacertError(
            f"the int8 engine in {paths['int8', GRAPHS[0]].parent} has an fp32 VQGAN (exported "
            "by an older facert): remove that directory and run again"
        )
    if variants:
        for graph, found in _variants(model_dir, progress).items():
            models |= {(label, graph): m for label, m in found.items()}
    sessions = {key: _session(m, threads) for key, m in models.items()}
    fp32 = {g: sessions["fp32", g] for g in GRAPHS}

    images, _ = draw_faces(EVAL_SEED, range(faces), config.vqgan.resolution)
    ref = {"faces": scale_pixels(images, config.image_scaling)}
    ref["codes"] = fp32["vqgan_encoder"].run(None, {"images": ref["faces"]})[0]
    ref["images"] = fp32["vqgan_decoder"].run(None, {"codes": ref["codes"]})[0]
    one = {"vqgan_encoder": {"images": ref["faces"][:1]},
           "vqgan_decoder": {"codes": ref["codes"][:1]}}  # fmt: skip
    calls = {key: (lambda s=s, g=key[1]: s.run(None, one[g])) for key, s in sessions.items()}
    timings = _timings(calls, runs, progress)

    rows = []
    for (label, graph), session in sessions.items():
        int8, convs = _count_int8(models[label, graph])
        t, base = timings[label, graph], timings["fp32", graph]
        quality = {} if label == "fp32" else _quality(graph, session, ref, fp32)
        rows.append({"graph": graph, "variant": label, "int8_convs": int8, "convs": convs,
                     **t, "speedup": base["min_ms"] / t["min_ms"], **quality})  # fmt: skip
    trip = _round_trip(sessions, ref)
    result = {
        "scenario": "vqgan", "model": config.name, "path": str(model_dir), "threads": threads,
        "faces": faces, "runs": runs, "seconds_resolving_engines": round(export_s, 1),
        "machine": describe(), "load_average": [load_before, os.getloadavg()[0]],
        "rows": rows, "round_trip": trip,
    }  # fmt: skip
    written = write(out_dir, "vqgan", result, markdown(result), plot)
    if progress:
        print(markdown(result))
        print("\n".join(written))
    return result


def _round_trip(sessions: dict, ref: dict) -> dict:
    """The int8 engine's encoder then decoder against fp32's: images, and the time of both."""
    enc, dec = sessions["int8 engine", "vqgan_encoder"], sessions["int8 engine", "vqgan_decoder"]
    codes = enc.run(None, {"images": ref["faces"]})[0]
    return {"psnr_db": _psnr(ref["images"], dec.run(None, {"codes": codes})[0])}


def _ms(rows: list[dict], variant: str) -> float:
    """min ms of encode + decode for one variant."""
    return sum(r["min_ms"] for r in rows if r["variant"] == variant)


def markdown(result: dict) -> str:
    rows = result["rows"]
    fp32_ms, int8_ms = _ms(rows, "fp32"), _ms(rows, "int8 engine")
    speedup = fp32_ms / int8_ms
    decoder = next(r for r in rows if (r["variant"], r["graph"]) == ("int8 engine", GRAPHS[1]))
    load = result["load_average"]
    lines = [
        f"### vqgan: fp32 against int8, model {result['model']}\n",
        machine_line(result["machine"]),
        "",
        f"One image per call, {result['threads']} threads, {result['runs']} interleaved runs "
        f"(min / median ms). Quality on {result['faces']} held-out faces against fp32. Load "
        f"average {load[0]:.1f} at the start, {load[1]:.1f} at the end (other jobs on the "
        "machine: the medians carry their noise, the minima less).",
        "",
    ]
    head = ["graph", "variant", "int8 convs", "min ms", "median ms", "speed-up (min)",
            "PSNR dB vs fp32", "codes = fp32"]  # fmt: skip
    body = [[r["graph"], r["variant"], f"{r['int8_convs']}/{r['convs']}", r["min_ms"],
             r["median_ms"], f"{r['speedup']:.2f}x", r.get("psnr_db"),
             f"{r['code_agreement']:.1%}" if "code_agreement" in r else None]
            for r in rows]  # fmt: skip
    lines += [table(head, body), ""]
    lines += [
        "Encoder rows' PSNR: the fp32 decoder's images of their codes against those of fp32's "
        "codes. int8 convs: of the graph's Conv nodes (the quantized decoders run each "
        "upsampling conv sub-pixel, as four 2x2 convs).",
        "",
        f"- round trip (encode + decode, int8 engine): {fp32_ms:.0f} → {int8_ms:.0f} ms, "
        f"{speedup:.2f}x (target {TARGET_SPEEDUP}x): "
        f"{'met' if speedup >= TARGET_SPEEDUP else 'not met'}; images "
        f"{result['round_trip']['psnr_db']:.1f} dB against fp32's",
        f"- int8 engine decoder: {decoder['psnr_db']:.1f} dB (target {TARGET_PSNR_DB:.0f} dB): "
        f"{'met' if decoder['psnr_db'] >= TARGET_PSNR_DB else 'not met'}",
    ]
    return "\n".join(lines)


def plot(result: dict, fig) -> None:
    axes = fig.subplots(1, 2)
    for ax, graph in zip(axes, GRAPHS):
        rows = [r for r in result["rows"] if r["graph"] == graph]
        labels = [re.sub(r" conv1/2", "", r["variant"]) for r in rows]
        ax.barh(labels, [r["min_ms"] for r in rows])
        ax.set(xlabel="ms per image (min)", title=f"{graph} — {result['model']}")
        ax.invert_yaxis()
