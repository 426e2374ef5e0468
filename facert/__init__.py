"""facert: edge inference runtime for Talk2Face-style unified sequence face models.

import facert
m = facert.load("path/to/model_dir", backend="torch")
faces = m.generate_faces("a smiling young woman with glasses", n=4, seed=0)
"""

from __future__ import annotations

from pathlib import Path

from facert.runtime.errors import FacertError
from facert.runtime.model import FaceModel

__all__ = ["FaceModel", "FacertError", "load"]
__version__ = "0.1.0"


def load(model_dir: str | Path, backend: str = "torch", num_slots: int = 16) -> FaceModel:
    """Load a facert model directory (see `facert convert`) on a backend."""
    return FaceModel(model_dir, backend=backend, num_slots=num_slots)
