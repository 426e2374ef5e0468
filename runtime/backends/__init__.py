"""Backends execute graphs; they hold no scheduling logic. Every backend has the same interface
(`Backend`), so engines, tasks and tests do not care which one runs."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from ..errors import FacertError
from .base import Backend

BACKENDS = ("torch",)


def create_backend(name: str, model_dir: Path, config: ModelConfig) -> Backend:
    """Instantiate a backend by name; heavy imports (torch, onnxruntime) happen only here."""
    if name == "torch":
        try:
            from .torch_backend import TorchBackend
        except ImportError as e:
            raise FacertError("the torch backend needs PyTorch: pip install 'facert[torch]'") from e
        return TorchBackend(model_dir, config)
    raise FacertError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
