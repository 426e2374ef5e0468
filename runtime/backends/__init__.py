"""Backends execute graphs; they hold no scheduling logic. Every backend has the same interface
(`Backend`), so engines, tasks and tests do not care which one runs."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import LM_FILE, VQGAN_FILE, ModelConfig, TensorStream, read_model
from ..errors import FacertError, InvalidArgument
from .base import Backend

if TYPE_CHECKING:
    from facert.kernels.decode import FusedDecoder

BACKENDS = ("onnxruntime", "torch", "cuda", "tensorrt")


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
    the LM runs on facert's fused CPU kernel ("fused"; "auto" where it applies: CPU provider,
    fp32 or int8), or every step through the exported graphs ("graph"). The cuda backend takes
    `precision` too (fp16, bf16 or fp32: its weights and KV cache). Each model file is read
    once: hashed (and checked against facert.json's record) while the weights a backend computes
    with are kept, or, for the fused kernel, packed tensor by tensor as they are read."""
    if name == "onnxruntime":
        from ..onnx_engines import PRECISIONS, resolve_engine

        if precision not in PRECISIONS:
            raise InvalidArgument(
                f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"
            )
        fused = uses_fused_kernel(precision, providers, decode)
        stream = {LM_FILE: fused_decoder(config, precision, threads)} if fused else None
        files = read_model(model_dir, stream=stream)
        engine = resolve_engine(model_dir, precision, engine_dir, progress, files.hash)
        if fused:
            from .fused_cpu_backend import FusedCpuBackend

            return FusedCpuBackend(engine, config, files.streamed[LM_FILE], threads)
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(engine, config, providers=providers, threads=threads)
    if name == "torch":
        try:
            from .torch_backend import TorchBackend
        except ImportError as e:
            raise FacertError("the torch backend needs PyTorch: pip install 'facert[torch]'") from e
        return TorchBackend(read_model(model_dir, keep=(LM_FILE, VQGAN_FILE)), config)
    if name == "cuda":
        return load_cuda_backend(model_dir, config, precision)
    if name == "tensorrt":
        from .tensorrt_backend import create as create_tensorrt

        return create_tensorrt(model_dir, config, precision, engine_dir)  # engine_dir: the root
    raise InvalidArgument(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def load_cuda_backend(model_dir: Path, config: ModelConfig, precision: str) -> Backend:
    """The CUDA backend, or a FacertError that names the fix when this machine cannot run it."""
    try:
        import torch

        from .cuda_backend import PRECISIONS, CudaBackend
    except ImportError as e:
        raise FacertError(
            "the cuda backend needs PyTorch with CUDA: pip install torch (a CUDA build)"
        ) from e
    if precision not in PRECISIONS:
        raise InvalidArgument(
            f"the cuda backend's precision is one of {', '.join(PRECISIONS)}, not {precision!r}"
        )
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise FacertError(
            f"the cuda backend needs an NVIDIA GPU that PyTorch can see, and there is none "
            f"(torch {torch.__version__}, {build}): install a CUDA build of PyTorch on a machine "
            f"with a GPU and its driver, or use backend='torch' or 'onnxruntime'"
        )
    return CudaBackend(read_model(model_dir, keep=(LM_FILE, VQGAN_FILE)), config, precision)


DECODE_CHOICES = ("auto", "fused", "graph")


def uses_fused_kernel(precision: str, providers: list[str] | None, decode: str) -> bool:
    """Whether the LM runs on the fused CPU kernel (CPU provider, fp32 or int8) or the graphs."""
    from facert.kernels.decode import PRECISIONS

    if decode not in DECODE_CHOICES:
        raise InvalidArgument(f"decode must be one of {', '.join(DECODE_CHOICES)}, not {decode!r}")
    providers = providers or ["CPUExecutionProvider"]
    applies = providers == ["CPUExecutionProvider"] and precision in PRECISIONS
    if decode == "fused" and not applies:
        raise FacertError(
            f"the fused kernel runs on the CPU provider in {' or '.join(PRECISIONS)}; "
            f"use decode='graph' for {precision} on {', '.join(providers)}"
        )
    return decode == "fused" or (decode == "auto" and applies)


def fused_decoder(
    config: ModelConfig, precision: str, threads: int | None
) -> Callable[[TensorStream], FusedDecoder]:
    """The fused CPU kernel, made from the LM's tensors as read_model streams them."""
    from facert.kernels.decode import FusedDecoder

    lm = config.lm
    return partial(FusedDecoder, n_head=lm.n_head, eps=lm.layernorm_eps, precision=precision,
                   threads=threads)  # fmt: skip
