"""`facert bench quality`: how well a model does its three tasks on held-out synthetic faces,
per backend and precision. Torch-free unless the torch backend is asked for.

On N faces of a dataset seed that training never drew (export/train/data.py):
- attributes: score-mode accuracy per attribute, reading the model's reading_views of each face
  unless --views says otherwise (target: 95% on average); with more than one view, one view
  (the face alone) is reported beside it as "one_view";
- caption recall: of each face's attribute values, the fraction its greedy caption names, and
  names alone (synonyms allowed, bench/mentions.py) (target: 90%);
- faithfulness: one face drawn from a fresh caption of each held-out face (sampling defaults
  and the model's image_candidates unless --candidates says otherwise, seed = face index),
  judged by the model's evaluation kit (eval/attribute_classifier.onnx): how often it shows
  the caption's value, per attribute (target: 85%); with more than one candidate, plain
  sampling (one drawing) is reported beside it as "single";
- short-prompt faithfulness: the same from a caption that names only SHORT_PROMPT_NAMES random
  attributes, as people write them, judged on those (no target; a model that only follows
  the generator's complete captions shows here);
- reconstruction: VQGAN encode + decode PSNR.
The judge's own accuracy on the held-out faces, as drawn and through the VQGAN, is reported
beside faithfulness: a drawn face cannot be judged more reliably than that.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facert.runtime.config import check_views
from facert.runtime.errors import FacertError
from facert.runtime.images import to_uint8
from facert.runtime.model import FaceModel

from .mentions import recall

TARGETS = {"attributes": 0.95, "caption_recall": 0.90, "faithfulness": 0.85}
JUDGE = Path("eval") / "attribute_classifier.onnx"
INT8_TOLERANCE = 0.01  # int8 must stay within one point of fp32
SHORT_PROMPT_NAMES = 3


class Judge:
    """The evaluation kit's attribute classifier: uint8 faces -> attribute values."""

    def __init__(self, model_dir: Path):
        import onnxruntime as ort

        path = Path(model_dir) / JUDGE
        if not path.is_file():
            raise FacertError(f"{model_dir} has no evaluation kit ({JUDGE})")
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.attributes: dict[str, list[str]] = json.loads(meta["attributes"])

    def __call__(self, images: np.ndarray) -> list[dict[str, str]]:
        """uint8 [N, R, R, 3] -> one {attribute: value} per face."""
        logits = self.session.run(None, {"images": images})[0]  # (N, sum of value counts)
        out: list[dict[str, str]] = [{} for _ in images]
        start = 0
        for name, values in self.attributes.items():
            picks = logits[:, start : start + len(values)].argmax(1)
            start += len(values)
            for face, k in zip(out, picks):
                face[name] = values[k]
        return out


def face_seed(faces: str) -> int:
    """The dataset seed of a face set: `evaluation` (EVAL_SEED, where settings such as the
    reading views were chosen) or `validation` (VALID_SEED, where they are confirmed)."""
    from facert.export.train.data import EVAL_SEED, VALID_SEED

    seeds = {"evaluation": EVAL_SEED, "validation": VALID_SEED}
    if faces not in seeds:
        raise FacertError(f"--faces must be one of {', '.join(seeds)}, not {faces!r}")
    return seeds[faces]


def held_out(
    n: int, size: int, faces: str = "evaluation"
) -> tuple[np.ndarray, list[dict[str, str]], list[str]]:
    """n unseen faces of a face set at the model's resolution, their attributes, and a
    caption of each."""
    from facert.export.synthetic import caption
    from facert.export.train.data import faces as make_faces

    seed = face_seed(faces)
    images, attributes = make_faces(seed, range(n), size)
    captions = [caption(a, np.random.default_rng([seed, i])) for i, a in enumerate(attributes)]
    return images, attributes, captions


def short_prompts(
    attributes: list[dict[str, str]], faces: str = "evaluation"
) -> list[tuple[str, list[str]]]:
    """A caption of each face that names SHORT_PROMPT_NAMES random attributes, and those names."""
    from facert.export.synthetic import caption

    prompts = []
    for i, a in enumerate(attributes):
        rng = np.random.default_rng([face_seed(faces), i, 1])
        names = [str(x) for x in rng.choice(list(a), SHORT_PROMPT_NAMES, replace=False)]
        prompts.append((caption(a, rng, names), names))
    return prompts


def _rate(hits: list[dict[str, bool]]) -> dict:
    """Hit rate per attribute (over the faces that were asked about it) and their mean."""
    names = dict.fromkeys(name for h in hits for name in h)
    per = {name: float(np.mean([h[name] for h in hits if name in h])) for name in names}
    return {"mean": float(np.mean(list(per.values()))), "per_attribute": per}


def reconstruct(model: FaceModel, images: np.ndarray, batch: int = 50) -> np.ndarray:
    """uint8 faces -> the same faces through the model's VQGAN, encoded and decoded."""
    tok = model.image_tokenizer
    parts = [images[i : i + batch] for i in range(0, len(images), batch)]
    return np.concatenate([to_uint8(tok.decode(tok.encode(x))) for x in parts])


def psnr(images: np.ndarray, reconstructed: np.ndarray) -> float:
    """Mean over faces of the PSNR in dB (uint8 pixels)."""
    mse = ((images.astype(np.float64) - reconstructed) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def judge_accuracy(judge: Judge, images: np.ndarray, attributes: list[dict]) -> float:
    """How often the judge reads the true value, over faces and attributes."""
    hits = [[s[k] == a[k] for k in judge.attributes] for s, a in zip(judge(images), attributes)]
    return float(np.mean(hits))


def evaluate(
    model: FaceModel, judge: Judge, n: int, quiet: bool = False, label: str = "",
    candidates: int | None = None, views: int | None = None, faces: str = "evaluation",
) -> dict:  # fmt: skip
    """All measures for one loaded model on n held-out faces of a face set, drawing with
    `candidates` and reading `views` (defaults: the model's image_candidates and
    reading_views)."""
    candidates = model.config.image_candidates if candidates is None else candidates
    views = model.config.reading_views if views is None else views
    images, attributes, captions = held_out(n, model.config.vqgan.resolution, faces)
    shorts = short_prompts(attributes, faces)
    names = list(model.config.attributes)
    runs = {"": candidates, "_single": 1} if candidates > 1 else {"": 1}
    readings = {"": views, "_one_view": 1} if views > 1 else {"": 1}
    answers = {suffix: [] for suffix in readings}
    recalls, examples = [], []
    drawn = {(suffix, kind): [] for suffix in runs for kind in ("full", "short")}
    start = time.time()
    for i in tqdm(range(n), desc=label or model.backend.name, unit="face", disable=quiet):
        truth = attributes[i]
        for suffix, v in readings.items():
            scored = model.attributes(images[i], names, views=v)
            answers[suffix].append({k: scored[k]["value"] == truth[k] for k in names})
        text = model.caption(images[i])
        recalls.append(recall(text, truth))
        for suffix, k in runs.items():
            drawn[suffix, "full"] += model.generate_faces(captions[i], seed=i, candidates=k)
            drawn[suffix, "short"] += model.generate_faces(shorts[i][0], seed=i, candidates=k)
        if i < 5:
            examples.append({"truth": truth, "caption": text, "prompt": captions[i],
                             "short_prompt": shorts[i][0]})  # fmt: skip
    reconstructed = reconstruct(model, images)
    report = {f"attributes{suffix}": _rate(a) for suffix, a in answers.items()} | {
        "views": views,
        "caption_recall": _rate(recalls),
        "candidates": candidates,
    }
    for suffix in runs:
        report[f"faithfulness{suffix}"] = _rate([
            {k: seen[k] == truth[k] for k in judge.attributes}
            for truth, seen in zip(attributes, judge(np.stack(drawn[suffix, "full"])))
        ])  # fmt: skip
        report[f"short_prompt_faithfulness{suffix}"] = _rate([
            {k: seen[k] == truth[k] for k in said}
            for truth, seen, (_, said) in zip(
                attributes, judge(np.stack(drawn[suffix, "short"])), shorts
            )
        ])  # fmt: skip
    return report | {
        "psnr_db": psnr(images, reconstructed),
        "judge_on_reconstructions": judge_accuracy(judge, reconstructed, attributes),
        "seconds": round(time.time() - start, 1),
        "examples": examples,
    }


def run(
    model_dir: Path | None, configs: str, n: int, threads: int | None = None,
    out_dir: Path | None = None, quiet: bool = False, candidates: int | None = None,
    views: int | None = None, faces: str = "evaluation",
) -> dict:  # fmt: skip
    """Evaluate each BACKEND:PRECISION configuration ("onnxruntime:int8,torch:fp32") on a face
    set, print the tables and write quality-MODEL.json (quality-MODEL-validation.json for the
    validation faces) into out_dir; returns the report."""
    import facert

    from .machine import describe
    from .models import parse_configs

    if n < 1:
        raise FacertError("-n must be at least 1")
    if candidates is not None and candidates < 1:
        raise FacertError("--candidates must be at least 1")
    if views is not None:
        check_views(views, "--views")
    face_seed(faces)
    model_dir = Path(model_dir or facert.BUNDLED_MODEL)
    judge = Judge(model_dir)
    results: dict[str, dict] = {}
    for backend, precision in parse_configs(configs):
        options = {"threads": threads} if backend == "onnxruntime" else {}
        m = facert.load(model_dir, backend=backend, precision=precision, progress=not quiet,
                        **options)  # fmt: skip
        label = f"{backend}:{precision}"
        results[label] = evaluate(m, judge, n, quiet, label, candidates, views, faces)
    images, attributes, _ = held_out(n, m.config.vqgan.resolution, faces)
    report = {
        "scenario": "quality",
        "model": m.config.name,
        "model_dir": str(model_dir),
        "faces": n,
        "face_set": faces,
        "targets": TARGETS,
        "judge_on_drawn_faces": judge_accuracy(judge, images, attributes),
        "machine": describe(),
        "configs": results,
    }
    print(table(report))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if faces == "evaluation" else f"-{faces}"
        path = out_dir / f"quality-{m.config.name}{suffix}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return report


def table(report: dict) -> str:
    """Markdown: one row per configuration, then accuracy per attribute."""
    rows = report["configs"]
    lines = [
        f"quality of {report['model']} on {report['faces']} held-out faces of the "
        f"{report.get('face_set', 'evaluation')} set (targets: attributes "
        f"{TARGETS['attributes']:.0%}, caption recall {TARGETS['caption_recall']:.0%}, "
        f"faithfulness {TARGETS['faithfulness']:.0%}; judge on drawn faces "
        f"{report['judge_on_drawn_faces']:.1%})",
        "",
        "| config | attributes | views | one view | caption recall | faithfulness | short prompts "
        "| drawings per face | one drawing: faithfulness, short | judge on recon. | PSNR dB | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        single = (
            f"{r['faithfulness_single']['mean']:.1%}, "
            f"{r['short_prompt_faithfulness_single']['mean']:.1%}"
            if "faithfulness_single" in r
            else "(same)"
        )
        one_view = (
            f"{r['attributes_one_view']['mean']:.1%}" if "attributes_one_view" in r else "(same)"
        )
        lines.append(
            f"| {name} | {r['attributes']['mean']:.1%} | {r['views']} | {one_view} | "
            f"{r['caption_recall']['mean']:.1%} | "
            f"{r['faithfulness']['mean']:.1%} | {r['short_prompt_faithfulness']['mean']:.1%} | "
            f"{r['candidates']} | {single} | {r['judge_on_reconstructions']:.1%} | "
            f"{r['psnr_db']:.2f} | {r['seconds']:.0f} |"
        )
    lines += ["", "| attribute (score / recall / faithful / short) | " + " | ".join(rows) + " |",
              "|---|" + "---|" * len(rows)]  # fmt: skip
    for attr in next(iter(rows.values()))["attributes"]["per_attribute"]:
        cells = [
            f"{r['attributes']['per_attribute'][attr]:.0%} / "
            f"{r['caption_recall']['per_attribute'][attr]:.0%} / "
            f"{r['faithfulness']['per_attribute'][attr]:.0%} / "
            f"{r['short_prompt_faithfulness']['per_attribute'].get(attr, float('nan')):.0%}"
            for r in rows.values()
        ]
        lines.append(f"| {attr} | " + " | ".join(cells) + " |")
    if "onnxruntime:fp32" in rows and "onnxruntime:int8" in rows:
        gap = max(
            abs(rows["onnxruntime:int8"][k]["mean"] - rows["onnxruntime:fp32"][k]["mean"])
            for k in TARGETS
        )
        verdict = "within" if gap <= INT8_TOLERANCE else "NOT within"
        lines += ["", f"int8 vs fp32: largest gap {gap:.1%}, {verdict} one point"]
    return "\n".join(lines)
