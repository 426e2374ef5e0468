"""`facert demo`: draw faces from a sentence, read each back (greedy caption and every attribute
in score mode), and lay them out on a contact sheet, so that one command shows the model working.

Writes face-I.png, contact-sheet.png and report.json into the output directory.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from facert.runtime.errors import FacertError
from facert.runtime.model import FaceModel

from .mentions import mentioned

DEFAULT_TEXT = "A smiling young person with short blond hair and glasses on a blue background."
TILE = 256  # faces are enlarged to this width on the sheet
PAD = 8


def run_demo(
    model: FaceModel, text: str, n: int, out_dir: Path, seed: int = 0,
    candidates: int | None = None,
) -> dict:  # fmt: skip
    """Generate, analyse and write everything; returns the report (also saved as JSON)."""
    if n < 1:
        raise FacertError("-n must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    faces = model.generate_faces(text, n=n, seed=seed, candidates=candidates)
    asked = {k: v for k, v in mentioned(text).items() if len(v) == 1}  # what the text says
    entries = []
    for i, face in enumerate(faces):
        path = out_dir / f"face-{i}.png"
        Image.fromarray(face).save(path)
        answers = model.attributes(face, list(model.config.attributes), mode="score")
        values = {k: a["value"] for k, a in answers.items()}
        entries.append({
            "file": path.name,
            "caption": model.caption(face),
            "attributes": {k: {"value": a["value"], "prob": round(a["prob"], 3)}
                           for k, a in answers.items()},
            "matches_text": sum(values.get(k) in v for k, v in asked.items()),
        })  # fmt: skip
    report = {
        "model": model.config.name,
        "backend": model.backend.name,
        "text": text,
        "seed": seed,
        "candidates": candidates or model.config.image_candidates,
        "views": model.config.reading_views,
        "attributes_in_text": {k: sorted(v)[0] for k, v in asked.items()},
        "faces": entries,
    }
    contact_sheet(faces, report).save(out_dir / "contact-sheet.png")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only its fixed bitmap font
        return ImageFont.load_default()


def contact_sheet(faces: list[np.ndarray], report: dict) -> Image.Image:
    """Faces side by side, each with its caption and attribute answers underneath."""
    font, title_font = _font(13), _font(16)
    chars = max(10, int(0.9 * TILE / max(1.0, font.getlength("abcdefghij") / 10)))
    line_h = font.getbbox("Ag")[3] + 4
    blocks = []
    for entry in report["faces"]:
        lines = textwrap.wrap(entry["caption"], chars) + [""]
        lines += [f"{k}: {a['value']} ({a['prob']:.2f})" for k, a in entry["attributes"].items()]
        blocks.append(lines)
    title = textwrap.wrap(f'"{report["text"]}"  (seed {report["seed"]})', 2 * chars)
    top = PAD + (line_h + 4) * len(title) + PAD
    text_h = line_h * max(len(b) for b in blocks)
    width = PAD + len(faces) * (TILE + PAD)
    sheet = Image.new("RGB", (width, top + TILE + PAD + text_h + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for k, line in enumerate(title):
        draw.text((PAD, PAD + k * (line_h + 4)), line, fill="black", font=title_font)
    for i, (face, lines) in enumerate(zip(faces, blocks)):
        x = PAD + i * (TILE + PAD)
        sheet.paste(Image.fromarray(face).resize((TILE, TILE), Image.LANCZOS), (x, top))
        for k, line in enumerate(lines):
            draw.text((x, top + TILE + PAD + k * line_h), line, fill="black", font=font)
    return sheet


def summary(report: dict) -> str:
    """The printed table: one row per face."""
    asked = report["attributes_in_text"]
    lines = [f'{report["model"]} ({report["backend"]}): "{report["text"]}"', ""]
    for entry in report["faces"]:
        answers = ", ".join(f"{k} {a['value']}" for k, a in entry["attributes"].items())
        lines += [
            f"{entry['file']}  matches {entry['matches_text']}/{len(asked)} attributes of the text",
            f"  caption:    {entry['caption']}",
            f"  attributes: {answers}",
        ]
    return "\n".join(lines)
