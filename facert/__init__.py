"""facert: edge inference runtime for Talk2Face-style unified sequence face models.

import facert
m = facert.load("path/to/model_dir")  # ONNX Runtime on the CPU by default
faces = m.generate_faces("a smiling young woman with glasses", n=4, seed=0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from facert.runtime.errors import (
    DeadlineExceeded,
    EngineFailure,
    FacertError,
    FacertOverloaded,
    ImageError,
    InvalidArgument,
    LimitExceeded,
    ModelFileError,
)
from facert.runtime.limits import Limits
from facert.runtime.model import FaceModel

__all__ = [
    "DeadlineExceeded",
    "EngineFailure",
    "FaceModel",
    "FacertError",
    "FacertOverloaded",
    "ImageError",
    "InvalidArgument",
    "LimitExceeded",
    "Limits",
    "ModelFileError",
    "load",
]
__version__ = "0.1.0"
# A tiny Talk2Face trained on synthetic faces (facert.export.train), so everything works offline.
BUNDLED_MODEL = Path(__file__).parent / "models" / "talk2face-synth"


def load(model_dir: str | Path | None = None, **options: Any) -> FaceModel:
    """Load a facert model directory (see `facert convert`), by default the bundled model;
    options are FaceModel's:

    backend: "onnxruntime" (default; torch-free, exports the ONNX graphs on first use) or
    "torch" (the exact reference model). ONNX Runtime settings: precision (fp32, fp16, int8,
    int4), engine_dir (exported graphs to use), providers (e.g. ["CUDAExecutionProvider"]),
    threads (intra-op threads), decode ("auto": decode steps run facert's fused CPU kernel on
    the CPU provider in fp32 and int8, the exported lm_decode graph otherwise; "fused" or
    "graph" to insist). num_slots: how many sequences decode together. progress: show a
    progress bar while exporting. limits: a facert.Limits, the largest request one call may
    make (faces, drawings per face, text length, image pixels); over it is a LimitExceeded.
    max_queue: requests that may wait before new ones get FacertOverloaded. prefill_budget:
    prompt tokens the scheduler starts in one step.
    """
    return FaceModel(BUNDLED_MODEL if model_dir is None else model_dir, **options)
