"""Rebuild the bundled model `facert/models/talk2face-synth` from nothing (CPU only).

    python -m facert.export.train.build_bundled    # work files in ~/.cache/facert/train-synth
    python -m facert.export.train.build_bundled --work DIR

About 70 minutes on two cores with native bf16 (AVX-512): the vocabulary (seconds), the VQGAN
(~15 min), the training faces' codes (~4-14 min), the LM (~26 min for all tasks, then ~9 min
for the drawing stage), the evaluation kit's attribute classifier (~12 min), then the model
directory with float16 weights and fp32 ONNX graphs (seconds). The VQGAN and the LM train with
bf16 products only where the CPU has them natively; elsewhere in float32, about three times
slower (the drawing stage took 35 min on an AVX2-only EPYC).
Every step resumes from its checkpoint and a finished step is skipped, so an interrupted build
picks up where it stopped. Training is seeded; a rebuild gives the same model up to
floating-point differences between machines. Other precisions are exported on first use into
the user cache (`facert export` ships none: the package must stay under 30 MB).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

import facert
from facert import BUNDLED_MODEL
from facert.export.onnx_export import export_engine
from facert.runtime.config import LM_FILE, VOCAB_FILE, VQGAN_FILE, write_config
from facert.runtime.images import scale_pixels
from facert.runtime.model import FaceModel
from facert.runtime.reading_quality import calibrate, vqgan_psnr

from . import classifier, lm, vqgan
from .data import EVAL_SEED, faces, vocabulary

WORK = Path.home() / ".cache" / "facert" / "train-synth"
EVAL_DIR = "eval"
CALIBRATION_FACES = 1000  # held-out faces (EVAL_SEED 0..999) that set the reading threshold


def write_float16(source: Path, target: Path) -> None:
    """Trained float32 weights -> float16 file: half the package's bytes. Every backend widens
    them back exactly, so all of them (and the exported graphs) compute with the same values."""
    weights = load_file(str(source))
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    save_file(half, str(target))


def write_model_dir(work: Path, out: Path) -> None:
    """The trained files -> a facert model directory with its fp32 engine and evaluation kit."""
    vocab = (work / VOCAB_FILE).read_text().splitlines()
    if out.exists():
        shutil.rmtree(out)
    (out / EVAL_DIR).mkdir(parents=True)
    shutil.copyfile(work / VOCAB_FILE, out / VOCAB_FILE)
    for name, source in ((LM_FILE, lm.WEIGHTS), (VQGAN_FILE, vqgan.WEIGHTS)):
        write_float16(work / source, out / name)
    config = lm.bundled_config(len(vocab))
    write_config(out, config)
    shutil.copyfile(work / classifier.ONNX_FILE, out / EVAL_DIR / classifier.ONNX_FILE)
    export_engine(out, out / "onnx" / "fp32", "fp32")
    with facert.load(out, progress=False) as model:
        config.reading_calibration = calibrate(held_out_scores(model))
    write_config(out, config)
    export_engine(out, out / "onnx" / "fp32", "fp32")  # facert.json is part of its source hash


def held_out_scores(model: FaceModel) -> np.ndarray:
    """The reading score (reading_quality.vqgan_psnr) of each held-out calibration face."""
    size, scaling = model.config.vqgan.resolution, model.config.image_scaling
    images, _ = faces(EVAL_SEED, range(CALIBRATION_FACES), size)
    encode, decode = model.backend.encode_images, model.backend.decode_images
    return np.concatenate([
        vqgan_psnr(scale_pixels(images[i : i + 200], scaling), scaling, encode, decode)
        for i in range(0, CALIBRATION_FACES, 200)
    ])  # fmt: skip


def build(work: Path = WORK, out: Path = BUNDLED_MODEL) -> None:
    work.mkdir(parents=True, exist_ok=True)
    if not (work / VOCAB_FILE).is_file():
        (work / VOCAB_FILE).write_text("\n".join(vocabulary()) + "\n")
    if not (work / vqgan.WEIGHTS).is_file():
        vqgan.train(work)
    if not (work / lm.WEIGHTS).is_file():
        lm.train(work)
    if not (work / classifier.ONNX_FILE).is_file():
        classifier.train(work)
    write_model_dir(work, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"wrote {out} ({size:.1f} MiB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=WORK, help="checkpoints and trained weights")
    p.add_argument("-o", "--output", type=Path, default=BUNDLED_MODEL, help="model dir to write")
    args = p.parse_args()
    build(args.work, args.output)


if __name__ == "__main__":
    main()
