"""What every launcher shares: where its tensors may live, and block sizes."""

from __future__ import annotations

import torch
import triton


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on the CPU on CPU tensors (tests)."""
    return bool(triton.knobs.runtime.interpret)


def check_device(t: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; say which is wrong.

    The interpreter is chosen when the kernels are defined, so TRITON_INTERPRET=1 must be set
    before facert.kernels.triton's kernel modules are first imported."""
    if t.device.type == "cpu" and not interpreting():
        raise ValueError(
            "Triton kernels need CUDA tensors (CPU tensors only run under TRITON_INTERPRET=1, "
            "set before the kernels are imported)"
        )


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def output_buffer(
    out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A launcher's result buffer: the caller's `out` (checked) or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be {dtype} {tuple(shape)} on {device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")  # fmt: skip
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out
