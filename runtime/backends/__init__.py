"""Backends execute graphs; they hold no scheduling logic. Every backend has the same interface
(`Backend`), so engines, tasks and tests do not care which one runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import LM_FILE, ModelConfig, load_weights, model_hash
from ..errors import FacertError, InvalidArgument
from .base import Backend

if TYPE_CHECKING:
    from facert.kernels.decode import FusedDecoder

BACKENDS = ("onnxruntime", "torch")


def create_backend(
    name: str,
    model_dir: Path,
    config: ModelConfig,
    precision: str = "fp32",
    engine_dir: Path | None = None,
    providers: list[str] | None = None,
    threads: int | None = None,
    decode: str = "auto",
    progress: bool = True,
) -> Backend:
    """Instantiate a backend by name; heavy imports (torch, onnxruntime) happen only here.
    `precision`, `engine_dir`, `providers`, `threads` and `decode` are ONNX Runtime settings:
    decode steps run facert's fused CPU kernel ("fused"; "auto" where it applies: CPU provider,
    fp32 or int8) or the exported lm_decode graph ("graph")."""
    if name == "onnxruntime":
        from ..onnx_engines import PRECISIONS, resolve_engine

        if precision not in PRECISIONS:
            raise InvalidArgument(
                f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"
            )
        from .onnxruntime_backend import OnnxRuntimeBackend

        engine = resolve_engine(model_dir, precision, engine_dir, progress)
        fused = fused_decoder(model_dir, config, precision, providers, threads, decode)
        return OnnxRuntimeBackend(engine, config, providers=providers, threads=threads,
                                  fused_decoder=fused)  # fmt: skip
    if name == "torch":
        model_hash(model_dir)  # checks the files against facert.json's sha256 record
        try:
            from .torch_backend import TorchBackend
        except ImportError as e:
            raise FacertError("the torch backend needs PyTorch: pip install 'facert[torch]'") from e
        return TorchBackend(model_dir, config)
    raise InvalidArgument(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


DECODE_CHOICES = ("auto", "fused", "graph")


def fused_decoder(
    model_dir: Path,
    config: ModelConfig,
    precision: str,
    providers: list[str] | None,
    threads: int | None,
    decode: str,
) -> FusedDecoder | None:
    """The fused CPU decode kernel over the model's weights, or None for the lm_decode graph."""
    from facert.kernels.decode import PRECISIONS, FusedDecoder

    if decode not in DECODE_CHOICES:
        raise InvalidArgument(f"decode must be one of {', '.join(DECODE_CHOICES)}, not {decode!r}")
    providers = providers or ["CPUExecutionProvider"]
    applies = providers == ["CPUExecutionProvider"] and precision in PRECISIONS
    if decode == "graph" or (decode == "auto" and not applies):
        return None
    if not applies:
        raise FacertError(
            f"the fused decode kernel runs on the CPU provider in {' or '.join(PRECISIONS)}; "
            f"use decode='graph' for {precision} on {', '.join(providers)}"
        )
    weights = load_weights(model_dir / LM_FILE)
    return FusedDecoder(weights, config.lm.n_head, config.lm.layernorm_eps, precision, threads)
