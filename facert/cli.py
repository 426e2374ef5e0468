"""The `facert` command line."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

from facert.runtime.errors import FacertError, ImageError, InvalidArgument

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
        choices=["onnxruntime", "torch"],
        help="execution backend (default: onnxruntime)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16", "int8", "int4"],
        help="ONNX Runtime precision (default: fp32)",
    )
    p.add_argument("--engine", type=Path, help="exported ONNX engine directory to use")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument(
        "--provider",
        action="append",
        dest="providers",
        help="ONNX Runtime execution provider, e.g. CUDAExecutionProvider (repeatable)",
    )


def _load(args: argparse.Namespace):
    import facert

    return facert.load(
        args.model,
        backend=args.backend,
        precision=args.precision,
        engine_dir=args.engine,
        providers=args.providers,
        threads=args.threads,
    )


def cmd_convert(args: argparse.Namespace) -> None:
    from facert.export.convert import convert

    attributes = None
    if args.attributes is not None:
        try:
            attributes = json.loads(Path(args.attributes).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidArgument(f"cannot read attribute vocabulary {args.attributes}: {e}") from e
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
    )
    lm = config.lm
    print(
        f"wrote {args.output}: LM {lm.n_layer}x{lm.n_embd} (vocab {lm.vocab_size}), "
        f"VQGAN {config.vqgan.num_codes_per_image} codes of {config.vqgan.n_embed}, "
        f"image scaling {config.image_scaling}"
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _image_paths(items: list[str]) -> list[str]:
    """Files as given; a folder -> its image files; a pattern the shell left alone -> matches."""
    paths = []
    for item in items:
        if Path(item).is_dir():
            found = sorted(str(f) for f in Path(item).iterdir()
                           if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip
            if not found:
                raise InvalidArgument(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {item}")
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

    def submit(image: str):
        return m.submit("attributes", image, names, mode=args.mode, views=args.views)

    with tqdm(total=len(images), unit="img", desc="analyzing", disable=len(images) < 2) as bar:
        for image, outcome in _in_order(images, submit, 2 * m.engine.pool.num_slots):
            bar.update()
            if isinstance(outcome, FacertError):
                failed += 1
                if args.json:
                    print(json.dumps({"image": image, "error": str(outcome)}), flush=True)
                else:
                    bar.write(f"facert: error: {image}: {outcome}", file=sys.stderr)
            elif args.json:
                print(json.dumps({"image": image, "attributes": outcome}), flush=True)
            else:
                for name, a in outcome.items():
                    bar.write(f"{image}\t{name}: {a['value']}\t(p={a['prob']:.3f})")
    if failed:
        raise FacertError(f"{failed} of {len(images)} images could not be analyzed (above)")


def cmd_export(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from facert.export.onnx_export import export_engine

    out = args.output or Path(args.model) / "onnx" / args.precision
    with tqdm(desc=f"exporting ONNX ({args.precision})", file=sys.stderr) as bar:
        manifest = export_engine(
            args.model, out, args.precision,
            progress=lambda step: (bar.set_postfix_str(step), bar.update()),
        )  # fmt: skip
    print(f"wrote {out} ({manifest['precision']}, {len(manifest['graphs'])} graphs)")


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
        args.views,
    )  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> None:
    from facert.bench.demo import DEFAULT_TEXT, run_demo, summary

    report = run_demo(
        _load(args), args.text or DEFAULT_TEXT, args.n, Path(args.output), args.seed,
        args.candidates,
    )  # fmt: skip
    print(summary(report))
    print(f"wrote {args.output}/contact-sheet.png, report.json and {args.n} faces")


def cmd_doctor(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from facert import BUNDLED_MODEL
    from facert.bench import doctor
    from facert.bench.machine import describe

    m = describe()
    print(f"machine      {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['platform']}")
    print(f"packages     {', '.join(f'{k} {v}' for k, v in m['versions'].items())}")
    print(f"providers    {', '.join(doctor.ort.get_available_providers())}")
    with tqdm(total=len(doctor.plan()), desc="checking", file=sys.stderr) as bar:
        reference, checks = doctor.run(
            Path(args.model or BUNDLED_MODEL),
            progress=lambda s: (bar.set_postfix_str(s), bar.update()),
        )
    print(f"reference    {reference} backend, fp32")
    print(doctor.table(checks))
    if not all(c.passed for c in checks):
        raise FacertError("some checks failed (see the table above)")


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
        "--json", action="store_true", help='JSON lines: {"image", "attributes" or "error"}'
    )
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("export", help="export ONNX graphs (+ manifest) for ONNX Runtime")
    p.add_argument("model", help="facert model directory")
    p.add_argument(
        "-o", "--output", type=Path, help="engine directory (default MODEL/onnx/PRECISION)"
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"])
    p.set_defaults(func=cmd_export)

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

    add_scenarios(bench, cmd_bench_scenario)  # tasks, throughput, load, memory

    p = bench.add_parser("quality", help="task accuracy on held-out synthetic faces, per config")
    p.add_argument("--model", help="facert model directory (default: the bundled model)")
    p.add_argument(
        "--configs",
        default="onnxruntime:fp32,onnxruntime:int8",
        help="comma-separated BACKEND:PRECISION to evaluate (default: the embedded runtime in "
        "fp32 and int8; add onnxruntime:int4 or torch:fp32, the slow reference, as wanted)",
    )
    p.add_argument("-n", type=int, default=1000, help="held-out faces (default 1000)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    _candidates_arg(p)
    _views_arg(p)
    p.add_argument("-o", "--output", type=Path, help="directory for quality-MODEL.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench_quality)

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
