"""What the three training scripts share: threads and seeds, bf16 products where the CPU has
them, the learning-rate schedule, and checkpoints that make every run resumable."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

THREADS = 2
# oneDNN's bf16 kernels need AVX-512 (BF16 or AMX for speed). Without them torch falls back to a
# reference bf16 GEMM about 100x slower than float32 (measured on an AVX2-only EPYC), so such
# CPUs train in float32.
NATIVE_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fast_products() -> torch.autocast:
    """bf16 matrix products on CPUs with native bf16 (about 2x faster steps), else float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=NATIVE_BF16)


def setup(seed: int) -> None:
    """Same threads and seeds in every script, so a rebuild gives the same model."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def resume(path: Path, **objects) -> int:
    """Load `objects` (anything with load_state_dict) from a checkpoint; returns its step, or 0
    when there is none."""
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=True)
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
    print(f"resumed {path} at step {state['step']}", flush=True)
    return state["step"]


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """A trained module's weights as safetensors (what the model directory is built from)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


def save_checkpoint(path: Path, step: int, **objects) -> None:
    """Write atomically so an interrupted save never leaves a broken checkpoint."""
    state = {name: obj.state_dict() for name, obj in objects.items()}
    state["step"] = step
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


class Log:
    """One progress line every `every` steps: step, learning rate, averaged metrics, speed."""

    def __init__(self, name: str, steps: int, every: int):
        self.name, self.steps, self.every = name, steps, every
        self.sums: dict[str, float] = {}
        self.count = 0
        self.start = time.time()

    def add(self, step: int, lr: float, **metrics: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if (step + 1) % self.every and step + 1 != self.steps:
            return
        avg = "  ".join(f"{k} {v / self.count:.4f}" for k, v in self.sums.items())
        per_step = (time.time() - self.start) / self.count
        left = (self.steps - step - 1) * per_step / 60
        print(
            f"{self.name} {step + 1}/{self.steps}  lr {lr:.2e}  {avg}  "
            f"{per_step:.2f} s/step, {left:.1f} min left",
            flush=True,
        )
        self.sums, self.count, self.start = {}, 0, time.time()


def script_main(doc: str, train: Callable[..., Path], steps: int | None = None) -> None:
    """The command line of a training script: `-o DIR [--steps N]` (--steps where the script
    has a single schedule), then print what it wrote."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, required=True, help="training directory")
    if steps is not None:
        p.add_argument("--steps", type=int, default=steps)
    args = p.parse_args()
    print(train(args.output) if steps is None else train(args.output, args.steps))
