"""The `facert` command line."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from facert.runtime.backends import BACKENDS
from facert.runtime.errors import FacertError, ImageError, InvalidArgument
from facert.runtime.onnx_engines import PRECISIONS

# the fused decode kernel beside ONNX Runtime's lm_decode graph, then int4 and torch
DECODE_CONFIGS = (
    "onnxruntime:fp32,onnxruntime:fp32:graph,onnxruntime:int8,onnxruntime:int8:graph,"
    "onnxruntime:int4,torch:fp32"
)


def _candidates_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--candidates",
        type=int,
        help="drawings per face; the one that matches the text best is kept "
        "(default: the model's image_candidates; 1 = plain sampling, fastest)",
    )


def _views_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--views",
        type=int,
        help="score mode reads each face this many ways and averages them (1 = the face only, "
        "fastest; 2 adds its mirror image, 4 also the face shifted right and left; "
        "default: the model's reading_views)",
    )


def _drawing_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("-n", type=int, default=4, help="number of faces (default 4)")
    p.add_argument("-o", "--output", default="faces", help="output directory (default ./faces)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--top-k", type=int, default=70)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    _candidates_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="facert model directory (default: the bundled model)")
    p.add_argument(
        "--backend",
        default="onnxruntime",
        choices=BACKENDS,
        help="execution backend (default: onnxruntime; cuda and tensorrt need an NVIDIA GPU)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=(*PRECISIONS, "bf16"),
        help="precision (default: fp32; bf16 on cuda only)",
    )
    p.add_argument("--engine", type=Path, help="exported ONNX engine directory to use")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument(
        "--provider",
        action="append",
        dest="providers",
        help="ONNX Runtime execution provider, e.g. CUDAExecutionProvider (repeatable)",
    )
    p.add_argument(
        "--memory-budget",
        help="memory for weights, activations and the KV cache, e.g. 2GiB: the cache gets as "
        "many slots as fit (default: 16 slots)",
    )


def _load(args: argparse.Namespace, **options):
    import facert

    return facert.load(
        args.model,
        backend=args.backend,
        precision=args.precision,
        engine_dir=args.engine,
        providers=args.providers,
        threads=args.threads,
        memory_budget=args.memory_budget,
        **options,
    )


def cmd_convert(args: argparse.Namespace) -> None:
    from facert.export.convert import convert

    attributes = None
    if args.attributes is not None:
        try:
            attributes = json.loads(Path(args.attributes).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidArgument(f"cannot read attribute vocabulary {args.attributes}: {e}") from e
    faces = _image_paths([args.calibration_faces]) if args.calibration_faces else None
    config = convert(
        args.lm,
        args.lm_config,
        args.vocab,
        args.vqgan,
        args.vqgan_config,
        args.output,
        image_scaling=args.image_scaling,
        attributes=attributes,
        name=args.name,
        calibration_faces=faces,
    )
    lm, calibration = config.lm, config.reading_calibration
    print(
        f"wrote {args.output}: LM {lm.n_layer}x{lm.n_embd} (vocab {lm.vocab_size}), "
        f"VQGAN {config.vqgan.num_codes_per_image} codes of {config.vqgan.n_embed}, "
        f"image scaling {config.image_scaling}"
        + (
            f", reading threshold {calibration.threshold:.2f} dB (percentile "
            f"{calibration.percentile:g} of {calibration.faces} faces)"
            if calibration
            else ", no reading threshold (no --calibration-faces)"
        )
    )


def _sampling(args: argparse.Namespace) -> dict:
    return dict(seed=args.seed, top_k=args.top_k, top_p=args.top_p,
                temperature=args.temperature, candidates=args.candidates)  # fmt: skip


def _draw_and_save(args: argparse.Namespace, total: int, draw) -> None:
    """Draw with a progress bar (draw(on_step) -> faces), then write face-I.png files. The
    output folder is made first: a bad path fails before any drawing, not after."""
    from PIL import Image
    from tqdm import tqdm

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=total, unit="tok", desc="drawing", disable=args.quiet) as bar:
        faces = draw(bar.update)
    for i, face in enumerate(faces):
        path = out / f"face-{i}.png"
        Image.fromarray(face).save(path)
        print(path)


def cmd_generate(args: argparse.Namespace) -> None:
    m = _load(args)
    total = m.generation_steps(args.text, args.n, args.candidates)
    _draw_and_save(args, total, lambda on_step: m.generate_faces(
        args.text, n=args.n, on_step=on_step, **_sampling(args)))  # fmt: skip


def cmd_edit(args: argparse.Namespace) -> None:
    m = _load(args)
    total = m.generation_steps(args.text, args.n, args.candidates, args.keep_rows)
    _draw_and_save(args, total, lambda on_step: m.edit_face(
        args.image, args.text, args.keep_rows, n=args.n, on_step=on_step,
        **_sampling(args)))  # fmt: skip


def cmd_caption(args: argparse.Namespace) -> None:
    m = _load(args)
    for image in args.images:
        text = m.caption(image, seed=args.seed, greedy=not args.sample)
        print(f"{image}\t{text}")


def _image_paths(items: list[str]) -> list[str]:
    """Files as given; a folder -> its image files; a pattern the shell left alone -> matches."""
    from facert.runtime.images import image_suffixes

    paths = []
    for item in items:
        if Path(item).is_dir():
            suffixes = image_suffixes()
            found = sorted(str(f) for f in Path(item).iterdir()
                           if f.is_file() and f.suffix.lower() in suffixes)  # fmt: skip
            if not found:
                raise InvalidArgument(f"no image files ({', '.join(suffixes)}) in {item}")
            paths += found
        elif not Path(item).exists() and glob.has_magic(item):
            found = sorted(glob.glob(item))
            if not found:
                raise InvalidArgument(f"no file matches {item}")
            paths += found
        else:
            paths.append(item)
    return paths


def _in_order(items: list, submit, in_flight: int):
    """(item, result or FacertError) in input order, keeping up to `in_flight` requests
    submitted at once so the scheduler batches them. A bad item is its own error; an error
    that would hit every item (a bad argument) is raised at once."""
    futures: dict[int, object] = {}
    for i in range(len(items) + in_flight):
        if i < len(items):
            try:
                futures[i] = submit(items[i])
            except ImageError as e:
                futures[i] = e
        done = i - in_flight + 1
        if 0 <= done < len(items):
            outcome = futures.pop(done)
            if not isinstance(outcome, FacertError):
                try:
                    outcome = outcome.result()
                except FacertError as e:
                    outcome = e
            yield items[done], outcome


def cmd_analyze(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    m = _load(args)
    names = args.attributes or ",".join(m.config.attributes)
    images = _image_paths(args.images)
    failed = 0

    def submit(image: str):  # one VQGAN encode of the face for its answers and its reading
        return m.submit("analyze", image, names, mode=args.mode, views=args.views)

    with tqdm(total=len(images), unit="img", desc="analyzing", disable=len(images) < 2) as bar:
        for image, outcome in _in_order(images, submit, 2 * m.engine.pool.num_slots):
            bar.update()
            if isinstance(outcome, FacertError):
                failed += 1
                if args.json:
                    print(json.dumps({"image": image, "error": str(outcome)}), flush=True)
                else:
                    bar.write(f"facert: error: {image}: {outcome}", file=sys.stderr)
                continue
            attributes, reading = outcome["attributes"], outcome["reading"]
            if args.json:
                line = {"image": image, "attributes": attributes, "reading": reading}
                print(json.dumps(line), flush=True)
                continue
            if reading["reliable"] is False:
                bar.write(
                    f"{image}\tUNRELIABLE: unlike the faces this model learned (reading score "
                    f"{reading['score']:.1f} dB, below {reading['threshold']:.1f} dB)"
                )
            for name, a in attributes.items():
                bar.write(f"{image}\t{name}: {a['value']}\t(p={a['prob']:.3f})")
    if failed:
        raise FacertError(f"{failed} of {len(images)} images could not be analyzed (above)")


def cmd_export(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    if args.target == "tensorrt":
        from facert.export.tensorrt_graphs import PRECISIONS as TRT_PRECISIONS
        from facert.export.tensorrt_graphs import export_tensorrt

        if args.precision not in TRT_PRECISIONS:
            raise InvalidArgument(f"--target tensorrt takes {', '.join(TRT_PRECISIONS)}")
        out = args.output or Path(args.model) / "tensorrt" / f"onnx-{args.precision}"
        manifest = export_tensorrt(args.model, out, args.precision)
        graphs = len(manifest["graphs"])
        print(f"wrote {out} (TensorRT-ready, {manifest['precision']}, {graphs} graphs)")
        return
    from facert.export.onnx_export import export_engine

    out = args.output or Path(args.model) / "onnx" / args.precision
    with tqdm(desc=f"exporting ONNX ({args.precision})", file=sys.stderr) as bar:
        manifest = export_engine(
            args.model, out, args.precision,
            progress=lambda step: (bar.set_postfix_str(step), bar.update()),
        )  # fmt: skip
    print(f"wrote {out} ({manifest['precision']}, {len(manifest['graphs'])} graphs)")


def cmd_build(args: argparse.Namespace) -> None:
    from facert import BUNDLED_MODEL
    from facert.export.tensorrt_build import build
    from facert.runtime.jetson import available_memory, detect_jetson, edge_defaults
    from facert.runtime.memory import parse_bytes

    model_dir = Path(args.model or BUNDLED_MODEL)
    edge = edge_defaults(detect_jetson(), available_memory())
    precision = args.precision or (edge.precision if edge else "fp16")
    max_batch = args.max_batch or (edge.max_batch if edge else 16)
    manifest = build(
        model_dir, precision, max_batch=max_batch, max_prompt=args.max_prompt,
        max_images=args.max_images, engines_root=args.output,
        workspace_bytes=parse_bytes(args.workspace), plugins=args.plugins,
        progress=lambda step: print(step, file=sys.stderr),
    )  # fmt: skip
    root = args.output or model_dir / "tensorrt"
    print(f"wrote {root / manifest['key']} ({precision}, {len(manifest['files'])} engines, "
          f"max batch {max_batch})")  # fmt: skip


def _engine_info(engine_dir: Path) -> None:
    from facert.runtime.onnx_engines import read_engine

    engine = read_engine(engine_dir)  # every file checked against its sha256
    m = engine.manifest
    size = sum(map(len, engine.contents.values())) / 2**20
    print(f"engine       {engine_dir}  ({m['precision']}, opset {m['opset']}, {size:.1f} MiB)")
    print(f"exported by  onnx {m['onnx_version']}, onnxruntime {m['onnxruntime_version']}")
    print(f"source model sha256 {m['source_model_sha256']}")
    print(f"KV cache     {m['kv_cache']}")
    print(f"checksums    {len(m['files'])} files match their sha256 in manifest.json")
    for graph, ops in m["fused_ops"].items():
        fused = ", ".join(f"{op} x{n}" for op, n in ops.items()) or "none"
        print(f"fused ops    {graph:14s} {fused}")


def cmd_info(args: argparse.Namespace) -> None:
    from facert.runtime.config import CONFIG_FILE, load_config, model_hash

    if (
        not (Path(args.model) / CONFIG_FILE).is_file()
        and (Path(args.model) / "manifest.json").is_file()
    ):
        _engine_info(Path(args.model))
        return
    config = load_config(args.model)
    lm, vq = config.lm, config.vqgan
    print(f"model        {config.name}  ({args.model})")
    print(f"sha256       {model_hash(args.model)}")
    print(
        f"LM           {lm.n_layer} layers x {lm.n_embd} hidden, {lm.n_head} heads, ffn {lm.n_ffn}"
    )
    print(f"vocabulary   {lm.vocab_size} = {lm.text_vocab_size} text + {lm.image_vocab_size} codes")
    print(f"positions    {lm.max_positions} (generates up to {lm.seq_length})")
    side = vq.latent_size
    print(f"VQGAN        ch {vq.ch} x {list(vq.ch_mult)}, {vq.resolution}px -> {side}x{side} codes")
    print(f"image input  {config.image_scaling} scaling")
    print(f"prompts      {config.prompts}")
    print(f"drawing      best of {config.image_candidates} per face (generate --candidates)")
    print(f"reading      {config.reading_views} view(s) per face (analyze --views)")
    for name, values in config.attributes.items():
        print(f"attribute    {name}: {', '.join(values)}")


def cmd_bench_decode(args: argparse.Namespace) -> None:
    import json as _json

    from tqdm import tqdm

    from facert.bench import decode
    from facert.bench.base_model import make_base_model
    from facert.bench.machine import describe
    from facert.bench.models import parse_configs
    from facert.runtime.onnx_engines import cache_root

    configs = parse_configs(args.configs, with_decode=True)
    if args.model == "base":
        with tqdm(desc="writing the random base-shape model", total=None, file=sys.stderr) as bar:
            model_dir = make_base_model(cache_root() / "base-random")
            bar.update()
    else:
        model_dir = Path(args.model)
    with tqdm(total=len(configs) * (1 + decode.ROUNDS), desc="decode", file=sys.stderr) as bar:
        result = decode.run(model_dir, configs, steps=args.steps, threads=args.threads,
                            progress=lambda c: (bar.set_postfix_str(c), bar.update()))  # fmt: skip
    result["machine"] = describe()
    result["model"] = str(model_dir)
    table = decode.markdown(result)
    print(table)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode.json").write_text(_json.dumps(result, indent=2))
        (out / "decode.md").write_text(table + "\n")
        print(f"wrote {out / 'decode.json'} and {out / 'decode.md'}")


def cmd_bench_scenario(args: argparse.Namespace) -> None:
    from facert.bench.scenarios import run_scenario

    run_scenario(args)


def cmd_bench_quality(args: argparse.Namespace) -> None:
    from facert.bench.quality import run

    run(
        args.model, args.configs, args.n, args.threads, args.output, args.quiet, args.candidates,
        args.views, args.faces,
    )  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> None:
    from facert.bench.demo import DEFAULT_TEXT, run_demo, summary

    report = run_demo(
        _load(args), args.text or DEFAULT_TEXT, args.n, Path(args.output), args.seed,
        args.candidates,
    )  # fmt: skip
    print(summary(report))
    print(f"wrote {args.output}/contact-sheet.png, report.json and {args.n} faces")


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from facert.runtime.server import serve
    except ImportError as e:
        raise FacertError(f'facert serve needs {e.name}: pip install "facert[serve]"') from e
    if args.model_dir is not None:
        args.model = args.model_dir
    api_key = args.api_key if args.api_key is not None else os.environ.get("FACERT_API_KEY")
    if api_key is not None and not api_key.strip():
        raise InvalidArgument("the API key is empty")
    if not args.max_body_mb > 0 or not args.grace >= 0:
        raise InvalidArgument("--max-body-mb must be positive and --grace at least 0")
    m = _load(args, max_queue=args.max_queue)
    try:
        print(f"warmed up in {m.warm_up():.1f} s (deadlines are priced from the first call)",
              file=sys.stderr)  # fmt: skip
        serve(m, args.host, args.port, api_key, args.grace, int(args.max_body_mb * 2**20),
              access_log=not args.no_access_log)  # fmt: skip
    finally:
        m.close()


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from facert.bench.serve import run

    run(args.model, args.concurrency, args.requests, args.pairs, args.output)


def cmd_bench_soak(args: argparse.Namespace) -> None:
    from facert.bench.soak import run

    run(args.model, args.minutes, args.clients, args.output)


def cmd_doctor(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from tqdm import tqdm

    from facert import BUNDLED_MODEL
    from facert.bench import doctor
    from facert.bench.machine import describe

    model_dir = Path(args.model or BUNDLED_MODEL)
    m = describe()
    print(f"machine      {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['platform']}")
    print(f"packages     {', '.join(f'{k} {v}' for k, v in m['versions'].items())}")
    checks, device_checks = [], []
    if args.only in (None, "onnxruntime"):
        print(f"providers    {', '.join(doctor.ort.get_available_providers())}")
        with tqdm(total=len(doctor.plan()), desc="checking", file=sys.stderr) as bar:
            reference, checks = doctor.run(
                model_dir, progress=lambda s: (bar.set_postfix_str(s), bar.update())
            )
        print(f"reference    {reference} backend, fp32")
        print(doctor.table(checks))
    devices = {}  # backend -> (can run here, the GPU or why not)
    for backend, status in (("cuda", doctor.cuda_status), ("tensorrt", doctor.tensorrt_status)):
        if args.only not in (None, backend):
            continue
        devices[backend] = ok, note = status()
        if not ok and args.only == backend:
            raise FacertError(f"doctor --only {backend} cannot run here: {note}")
        print(f"{backend:<12} {note if ok else f'not checked: {note}'}")
        if not ok:
            continue
        with tqdm(desc=backend, file=sys.stderr) as bar:
            step = lambda s: (bar.set_postfix_str(s), bar.update())  # noqa: E731
            precisions = (list(doctor.CUDA_PRECISIONS) if backend == "cuda"
                          else doctor.tensorrt_precisions(model_dir, progress=step))  # fmt: skip
            device_checks += doctor.run_device(model_dir, backend, precisions, progress=step)
    if device_checks:
        bandwidth = max((c.bandwidth_gb_s for c in device_checks), default=float("nan"))
        print(f"GPU ref.     onnxruntime CPU fp32; device copy bandwidth {bandwidth:.0f} GB/s")
        print(doctor.device_table(device_checks))
    if args.json:
        report = {"machine": m, "checks": [dataclasses.asdict(c) for c in checks],
                  "devices": {b: {"available": ok, "note": note} for b, (ok, note)
                              in devices.items()},
                  "device_checks": [dataclasses.asdict(c) for c in device_checks]}  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not all(c.passed for c in [*checks, *device_checks]):
        raise FacertError("some checks failed (see the table above)")


def cmd_camera(args: argparse.Namespace) -> None:
    from facert.runtime import camera
    from facert.runtime.faces import FaceDetector

    detector = FaceDetector(args.min_face)
    headless = not args.display and args.out is None
    to_stdout = args.jsonl == "-" or (args.jsonl is None and headless)
    m = _load(args)
    try:
        with open(args.jsonl, "w") if args.jsonl not in (None, "-") else nullcontext() as f:
            stats = camera.run(
                args.source, m, args.attributes, args.interval, args.display, args.out,
                sys.stdout if to_stdout else f, args.every_frame, detector, args.views,
            )  # fmt: skip
    finally:
        m.close()
    print(stats.text(), file=sys.stderr if to_stdout else sys.stdout)


def cmd_bench_detectors(args: argparse.Namespace) -> None:
    from facert.bench.camera import run_detectors

    result = run_detectors(args.output, progress=lambda name: print(name, file=sys.stderr))
    print(result["markdown"])


def cmd_bench_vqgan(args: argparse.Namespace) -> None:
    from facert.bench.vqgan import run

    run(args.model, runs=args.runs, faces=args.faces, threads=args.threads,
        variants=not args.engine_only, out_dir=args.output)  # prints its table  # fmt: skip


def cmd_bench_camera(args: argparse.Namespace) -> None:
    from facert.bench.camera import run_camera

    result = run_camera(args.output, args.seconds, args.fps, args.interval)
    print(result["markdown"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="TencentPretrain + taming checkpoints -> facert model dir")
    p.add_argument("--lm", type=Path, required=True, help="TencentPretrain talk2face.bin")
    p.add_argument("--lm-config", type=Path, required=True, help="its TencentPretrain config json")
    p.add_argument("--vocab", type=Path, required=True, help="BERT uncased vocab.txt")
    p.add_argument("--vqgan", type=Path, required=True, help="taming last.ckpt")
    p.add_argument("--vqgan-config", type=Path, required=True, help="its project yaml")
    p.add_argument("-o", "--output", type=Path, required=True, help="model directory to write")
    p.add_argument(
        "--image-scaling",
        choices=["reference", "taming"],
        default="reference",
        help="encoder input scaling: reference = 4x-3 as the Talk2Face script, taming = 2x-1",
    )
    p.add_argument("--attributes", help="json {name: [values]} for attribute score mode")
    p.add_argument("--name", default="talk2face")
    p.add_argument(
        "--calibration-faces",
        metavar="DIR_OR_GLOB",
        help="held-out faces like the model's training faces (a folder or a quoted glob): "
        "they set the threshold below which a reading is marked unreliable (default: none "
        "recorded; readings then say neither reliable nor not)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="draw faces from a description")
    p.add_argument("text")
    _drawing_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("edit", help="redraw a face from a new description, keeping its top rows")
    p.add_argument("image", help="the face to edit")
    p.add_argument("text", help="the new description")
    p.add_argument(
        "--keep-rows",
        type=int,
        required=True,
        help="rows of image codes kept from the top of the face (the model's grid side is "
        "the most; e.g. half of it keeps the upper face and redraws the mouth and chin)",
    )
    _drawing_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("caption", help="describe faces in words")
    p.add_argument("images", nargs="+")
    _model_arg(p)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser(
        "analyze", help="answer attribute questions about faces (files, folders, patterns)"
    )
    p.add_argument("images", nargs="+", help="image files, folders of them, or glob patterns")
    _model_arg(p)
    p.add_argument("--attributes", help="comma-separated names (default: all the model knows)")
    p.add_argument("--mode", choices=["score", "generate"], default="score")
    _views_arg(p)
    p.add_argument(
        "--json",
        action="store_true",
        help='JSON lines: {"image", "attributes", "reading"} or {"image", "error"}',
    )
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("export", help="export ONNX graphs (+ manifest) for ONNX Runtime")
    p.add_argument("model", help="facert model directory")
    p.add_argument(
        "-o", "--output", type=Path, help="engine directory (default MODEL/onnx/PRECISION)"
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"])
    p.add_argument(
        "--target",
        default="onnxruntime",
        choices=["onnxruntime", "tensorrt"],
        help="ONNX Runtime graphs, or TensorRT-ready standard-operator graphs (fp32/fp16/int8)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build", help="build TensorRT engines for this GPU (Jetson or desktop)")
    p.add_argument("-m", "--model", help="facert model directory (default: the bundled model)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                   help="default fp16 (a Jetson's defaults when on one)")  # fmt: skip
    p.add_argument(
        "--max-batch", type=int, help="largest batch (default 16; Jetson: from free memory)"
    )
    p.add_argument("--max-prompt", type=int, help="longest prompt (default: the KV capacity)")
    p.add_argument("--max-images", type=int, default=4, help="largest VQGAN batch (default 4)")
    p.add_argument("--workspace", default="1GiB", help="TensorRT builder workspace (default 1GiB)")
    p.add_argument(
        "--plugins",
        action="store_true",
        help="register facert's Triton kernels as TensorRT plugins and record them in the "
        "manifest (no graph calls them yet; unverified on hardware)",
    )
    p.add_argument("-o", "--output", type=Path, help="engines root (default MODEL/tensorrt)")
    p.set_defaults(func=cmd_build)

    bench = sub.add_parser("bench", help="benchmarks and quality evaluation").add_subparsers(
        dest="scenario", required=True
    )
    p = bench.add_parser("decode", help="decode step time vs the memory-bandwidth floor")
    p.add_argument(
        "--model",
        default="base",
        help="'base' (real Talk2Face shapes, random weights, made locally) or a model dir",
    )
    p.add_argument(
        "--configs",
        default=DECODE_CONFIGS,
        help="comma-separated BACKEND:PRECISION[:DECODE] to time side by side; DECODE is the "
        "onnxruntime decode path, fused (the CPU kernel) or graph (lm_decode)",
    )
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("-o", "--output", help="directory for decode.json and decode.md")
    p.set_defaults(func=cmd_bench_decode)
    from facert.bench.scenarios import add_scenarios

    add_scenarios(bench, cmd_bench_scenario)  # tasks, throughput, ..., memory, startup

    p = bench.add_parser("quality", help="task accuracy on held-out synthetic faces, per config")
    p.add_argument("--model", help="facert model directory (default: the bundled model)")
    p.add_argument(
        "--configs",
        default="onnxruntime:fp32,onnxruntime:int8",
        help="comma-separated BACKEND:PRECISION to evaluate (default: the embedded runtime in "
        "fp32 and int8; add onnxruntime:int4 or torch:fp32, the slow reference, as wanted)",
    )
    p.add_argument("-n", type=int, default=1000, help="held-out faces (default 1000)")
    p.add_argument(
        "--faces",
        default="evaluation",
        choices=("evaluation", "validation"),
        help="the held-out face set: evaluation (where the defaults were chosen) or validation "
        "(faces nobody tuned on, where they are confirmed)",
    )
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    _candidates_arg(p)
    _views_arg(p)
    p.add_argument(
        "-o", "--output", type=Path, help="directory for quality-MODEL[-validation].json"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench_quality)

    p = bench.add_parser("serve", help="the HTTP server beside the Python API: req/s, p50/p99")
    p.add_argument("--model", help="facert model directory (default: the bundled model)")
    p.add_argument("--concurrency", default="1,8,32", help="concurrent clients (1,8,32)")
    p.add_argument(
        "--requests",
        type=int,
        default=32,
        help="requests per endpoint and concurrency level (default 32)",
    )
    p.add_argument(
        "--pairs", type=int, default=40, help="HTTP / API pairs timed for the overhead (40)"
    )
    p.add_argument("-o", "--output", type=Path, help="directory for serve.json and serve.md")
    p.set_defaults(func=cmd_bench_serve)

    p = bench.add_parser("soak", help="the HTTP server under minutes of mixed load: leaks, errors")
    p.add_argument("--model", help="facert model directory (default: the bundled model)")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("-o", "--output", type=Path, help="directory for soak.json and soak.md")
    p.set_defaults(func=cmd_bench_soak)

    p = bench.add_parser("detectors", help="face detectors on real photos: recall, false, speed")
    p.add_argument("-o", "--output", type=Path, help="directory for detectors.json and .md")
    p.set_defaults(func=cmd_bench_detectors)

    p = bench.add_parser("vqgan", help="the VQGAN in fp32 against int8: speed, PSNR, codes")
    p.add_argument("--model", type=Path, help="model directory (default: the base shape)")
    p.add_argument("--runs", type=int, default=5, help="interleaved timed runs (default 5)")
    p.add_argument("--faces", type=int, default=4, help="held-out faces for quality (default 4)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    p.add_argument("--engine-only", action="store_true", help="skip the other int8 variants")
    p.add_argument("-o", "--output", type=Path, help="directory for vqgan.json and vqgan.md")
    p.set_defaults(func=cmd_bench_vqgan)

    p = bench.add_parser("camera", help="facert camera on a video file: frames/s and latency")
    p.add_argument("--seconds", type=float, default=10.0, help="video length (default 10)")
    p.add_argument("--fps", type=float, default=30.0, help="video frame rate (default 30)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between readings (1)")
    p.add_argument("-o", "--output", type=Path, help="directory for camera.json and camera.md")
    p.set_defaults(func=cmd_bench_camera)

    p = sub.add_parser("serve", help="serve the model over HTTP (FastAPI; see README, Serving)")
    p.add_argument("model_dir", nargs="?", metavar="MODEL", help="model directory (or -m)")
    _model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1 and /metrics "
        "(default: $FACERT_API_KEY; the environment keeps it out of `ps`)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="waiting requests before new ones get 429 (default 256)",
    )
    p.add_argument(
        "--max-body-mb", type=float, default=32.0, help="largest request body, MiB (default 32)"
    )
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds SIGTERM lets running requests finish (default 30)",
    )
    p.add_argument("--no-access-log", action="store_true", help="no line per request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("camera", help="read the faces in a camera, video file or stream, live")
    p.add_argument("--source", required=True, help="camera index (0), video file or stream URL")
    _model_arg(p)
    p.add_argument("--display", action="store_true", help="show the annotated frames (q quits)")
    p.add_argument("--out", type=Path, help="write the annotated frames to this .mp4 or .avi")
    p.add_argument(
        "--jsonl",
        help="one JSON line per processed frame to this file ('-': stdout; the default "
        "without --display and --out)",
    )
    p.add_argument("--attributes", help="comma-separated names (default: all the model knows)")
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between two readings of one face (default 1)",
    )
    _views_arg(p)
    p.add_argument("--min-face", type=int, default=40, help="smallest face, pixels (default 40)")
    p.add_argument(
        "--every-frame",
        action="store_true",
        help="a video file: process every frame as fast as possible (default: in real time, "
        "dropping frames the pipeline has no time for, as a camera does)",
    )
    p.set_defaults(func=cmd_camera)

    p = sub.add_parser("demo", help="draw faces from a sentence and read them back (contact sheet)")
    p.add_argument("--text", default=None, help="what to draw (default: a sample sentence)")
    _model_arg(p)
    p.add_argument("-n", type=int, default=4, help="number of faces (default 4)")
    p.add_argument("-o", "--output", default="demo-out", help="output dir (default demo-out)")
    p.add_argument("--seed", type=int, default=0)
    _candidates_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("doctor", help="self-check: parity and timings on this device's providers")
    p.add_argument("-m", "--model", help="facert model directory (default: the bundled model)")
    p.add_argument(
        "--only",
        choices=["onnxruntime", "cuda", "tensorrt"],
        help="check only ONNX Runtime's providers, the CUDA backend or the TensorRT backend "
        "(default: all that can run here)",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("info", help="describe a model directory or an exported engine directory")
    p.add_argument("model")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input is one line and status 2; a failing disk or file system one
    line and status 1; anything else is a facert bug, reported in one line unless
    FACERT_DEBUG=1 asks for the traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FacertError as e:
        print(f"facert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("facert: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"facert: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if os.environ.get("FACERT_DEBUG"):
            raise
        print(
            f"facert: internal error: {type(e).__name__}: {e} (a bug in facert; please report "
            "it with the output of FACERT_DEBUG=1 and the command)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
