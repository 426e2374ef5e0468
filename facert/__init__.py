"""facert: edge inference runtime for Talk2Face-style unified sequence face models.

import facert
m = facert.load("path/to/model_dir")  # ONNX Runtime on the CPU by default
faces = m.generate_faces("a smiling young woman with glasses", n=4, seed=0)
"""

from __future__ import annotations

from pathlib import Path

from facert.runtime.errors import FacertError
from facert.runtime.model import FaceModel

__all__ = ["FaceModel", "FacertError", "load"]
__version__ = "0.1.0"


def load(
    model_dir: str | Path,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    engine_dir: str | Path | None = None,
    providers: list[str] | None = None,
    threads: int | None = None,
    num_slots: int = 16,
    progress: bool = True,
) -> FaceModel:
    """Load a facert model directory (see `facert convert`).

    backend: "onnxruntime" (default; torch-free, exports the ONNX graphs on first use) or
    "torch" (the exact reference model). ONNX Runtime settings: precision (fp32, fp16, int8,
    int4), engine_dir (exported graphs to use), providers (e.g. ["CUDAExecutionProvider"]),
    threads (intra-op threads). num_slots: how many sequences decode together.
    """
    return FaceModel(
        model_dir, backend=backend, precision=precision, engine_dir=engine_dir,
        providers=providers, threads=threads, num_slots=num_slots, progress=progress,
    )  # fmt: skip
