"""Where a model's exported ONNX graphs live, and exporting them on first use.

Looked up in order: an engine directory the caller names (used as is, or refused if stale),
MODEL_DIR/onnx/PRECISION, then the user cache ($FACERT_CACHE or ~/.cache/facert). If none is
current, the graphs are exported into the first writable of the last two, with a progress bar.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import model_hash
from .errors import FacertError


def cache_root() -> Path:
    return Path(os.environ.get("FACERT_CACHE", Path.home() / ".cache" / "facert"))


def _writable(path: Path) -> bool:
    parent = next((p for p in (path, *path.parents) if p.exists()), None)
    return parent is not None and os.access(parent, os.W_OK)


def resolve_engine(
    model_dir: Path, precision: str, engine_dir: Path | None = None, progress: bool = True
) -> Path:
    from facert.export.onnx_export import export_engine, staleness

    if engine_dir is not None:
        why = staleness(engine_dir, model_dir, precision)
        if why:
            raise FacertError(
                f"engine directory {engine_dir} cannot be used: {why}. Re-export it with "
                f"`facert export {model_dir} -o {engine_dir} --precision {precision}`"
            )
        return Path(engine_dir)
    candidates = [
        model_dir / "onnx" / precision,
        cache_root() / "onnx" / model_hash(model_dir)[:16] / precision,
    ]
    for candidate in candidates:
        if staleness(candidate, model_dir, precision) is None:
            return candidate
    target = next((c for c in candidates if _writable(c)), None)
    if target is None:
        raise FacertError(
            f"no writable place to export ONNX graphs (tried {', '.join(map(str, candidates))})"
        )
    from tqdm import tqdm

    with tqdm(desc=f"exporting ONNX ({precision})", file=sys.stderr, disable=not progress) as bar:
        export_engine(
            model_dir,
            target,
            precision,
            progress=lambda step: (bar.set_postfix_str(step), bar.update()),
        )
    return target
