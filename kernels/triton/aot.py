"""Ahead-of-time compilation of the Triton kernels to PTX, with no GPU: `python -m
facert.kernels.triton.aot [--out DIR] [--check]`.

Each kernel is compiled for sm_87 (Jetson Orin) and sm_90 (H100/H200; Triton targets sm_90a) with
concrete signatures and constexprs (the shapes facert runs: GPT-2-small heads and rows, the
sampler's tiles, the taming VQGAN's codebook tiles, faces cropped from up to 3x the output side).
Every compile must succeed: Triton also assembles each PTX with its bundled ptxas, so a PTX that
ptxas rejects fails here.

PTX ISA version: Triton 3.9 would declare the newest its ptxas knows (8.8 for sm_87, 9.4 for
sm_90), and a CUDA driver JIT-compiles only PTX up to its own version. JetPack 6 ships CUDA 12.2
(PTX ISA 8.2), so every kernel is compiled with Triton's `ptx_version` option set to 8.2: LLVM
then emits only ISA 8.2 instructions and the file declares `.version 8.2`, loadable by any CUDA
12.2+ driver. No pointer is assumed 16-byte aligned (a sampler window starts anywhere in a
row), and line info is left out so the files do not depend on where the sources live.

ptx/manifest.json names, for each file: kernel, PTX entry, target, PTX ISA version, signature,
constexprs, grid and block, shared memory bytes, the two scratch pointers Triton appends to the
parameters, whether FMA contraction was allowed, and the Triton version that wrote it. The sampler
and the frame kernel are compiled (and launched) without FMA contraction, so that their float
arithmetic rounds as the interpreter's and the CPU's do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

PTX_DIR = Path(__file__).with_name("ptx")
PTX_VERSION = 82  # PTX ISA 8.2 = CUDA 12.2, JetPack 6's driver
TARGETS = (87, 90)  # Jetson Orin, H100/H200
NUM_WARPS = 4


@dataclass(frozen=True)
class Spec:
    """One kernel specialisation: the launcher module's kernel, argument types, constexprs."""

    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, int] = field(default_factory=dict)
    grid: str = ""  # how its launcher sizes the grid
    num_warps: int = NUM_WARPS  # as its launcher runs it
    exact: bool = False  # compiled without FMA contraction, as its launcher runs it


SPECS = (
    Spec(
        "attention",
        "_decode_attention_kernel",
        {"q": "*fp32", "k_cache": "*fp32", "v_cache": "*fp32", "k_new": "*fp32",
         "v_new": "*fp32", "slots": "*i64", "positions": "*i64", "out": "*fp32",
         "n_slots": "i32", "n_heads": "i32", "capacity": "i32", "head_dim": "i32",
         "scale": "fp32"},
        {"BLOCK_M": 128, "BLOCK_D": 64},  # GPT-2 small: 12 heads of 64; attention.py's tiles
        "(B, H)",
        num_warps=8,
    ),
    Spec(
        "norm",
        "_add_layer_norm_kernel",
        {"x": "*fp32", "delta": "*fp16", "weight": "*fp32", "bias": "*fp32", "out": "*fp16",
         "n_cols": "i32", "eps": "fp32"},
        {"HAS_DELTA": 1, "BLOCK": 1024},  # the fp16 CUDA backend's add + norm, 768 channels
        "(N,)",
    ),
    Spec(
        "activation",
        "_gelu_kernel",
        {"x": "*fp16", "out": "*fp16", "n": "i32", "c": "fp32"},
        {"BLOCK": 1024},
        "(cdiv(n, BLOCK),)",
    ),
    Spec(
        "sampling",
        "_sample_kernel",
        {"logits": "*fp32", "stride_row": "i32", "temperature": "*fp32", "top_k": "*i32",
         "top_p": "*fp32", "uniform": "*fp32", "out": "*i64", "vocab": "i32"},
        {"BLOCK": 256, "RADIX": 16},
        "(B,)",
        exact=True,
    ),
    Spec(
        "codes",
        "_nearest_codes_kernel",
        {"z": "*fp32", "codebook": "*fp32", "out": "*i64", "n": "i32", "n_codes": "i32",
         "dim": "i32"},
        {"BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_D": 32},
        "(cdiv(N, BLOCK_N),)",
    ),
    Spec(
        "frames",
        "_crop_resize_kernel",
        {"frame": "*u8", "squares": "*i32", "out": "*fp32", "height": "i32", "width": "i32",
         "size": "i32"},
        {"SCALINGS": 1, "BLOCK_X": 64, "KX": 8},  # 8 taps: crops up to 3x the output side
        "(N, size, cdiv(size, BLOCK_X))",
        exact=True,
    ),
)  # fmt: skip


def target_name(capability: int) -> str:
    """Triton compiles sm_90 as sm_90a (the arch-specific Hopper target)."""
    return f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"


def compile_spec(spec: Spec, capability: int) -> tuple[str, dict]:
    """-> (PTX text, its manifest entry). Raises whatever Triton raises if it does not compile."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (kernels are interpreted)")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    triton.knobs.compilation.disable_line_info = True
    fn = getattr(importlib.import_module(f"{__package__}.{spec.module}"), spec.kernel)
    signature = dict(spec.signature, **dict.fromkeys(spec.constexprs, "constexpr"))
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs))
    options = {"num_warps": spec.num_warps, "ptx_version": PTX_VERSION}
    if spec.exact:
        options["enable_fp_fusion"] = False
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = compiled.asm["ptx"]
    target = target_name(capability)
    version = f"{PTX_VERSION // 10}.{PTX_VERSION % 10}"
    for line in (f".version {version}", f".target {target}"):
        if line not in ptx.splitlines():
            raise RuntimeError(f"{spec.kernel} for {target}: the PTX does not declare {line!r}")
    entry = {
        "kernel": spec.module,
        "entry": compiled.metadata.name,
        "target": target,
        "ptx_version": version,
        "signature": spec.signature,
        "constexprs": spec.constexprs,
        "grid": spec.grid,
        "block": [spec.num_warps * 32, 1, 1],
        "shared_bytes": compiled.metadata.shared,
        # Triton appends two pointer parameters (global and profile scratch): pass null when
        # their sizes are 0.
        "scratch_params": 2,
        "global_scratch_bytes": compiled.metadata.global_scratch_size,
        "profile_scratch_bytes": compiled.metadata.profile_scratch_size,
        "fp_fusion": not spec.exact,
        "triton": triton.__version__,
        "file": f"{spec.module}.{target}.ptx",
        "sha256": hashlib.sha256(ptx.encode()).hexdigest(),
    }
    return ptx, entry


def compile_all() -> list[tuple[str, dict]]:
    """Every kernel for every target."""
    return [compile_spec(spec, cc) for spec in SPECS for cc in TARGETS]


def write(out: Path) -> list[dict]:
    """Compile everything and write the PTX files and manifest.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for ptx, entry in compile_all():
        (out / entry["file"]).write_text(ptx)
        entries.append(entry)
    (out / "manifest.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


def _stable(entry: dict) -> dict:
    """A manifest entry without what another Triton version may change."""
    return {k: v for k, v in entry.items() if not k.endswith(("bytes", "sha256", "triton"))}


def check(shipped: Path) -> list[str]:
    """Compile everything and compare with the shipped files -> the differences found."""
    manifest = json.loads((shipped / "manifest.json").read_text())
    shipped_entries = {(e["kernel"], e["target"]): e for e in manifest}
    problems, compiled = [], set()
    for ptx, entry in compile_all():
        key = (entry["kernel"], entry["target"])
        compiled.add(key)
        old = shipped_entries.get(key)
        path = shipped / entry["file"]
        if old is None or not path.exists():
            problems.append(f"{key}: not shipped")
        elif old["triton"] == entry["triton"] and path.read_text() != ptx:
            problems.append(f"{key}: shipped PTX differs from a fresh compile")
        elif _stable(old) != _stable(entry):
            problems.append(f"{key}: manifest entry differs: {old} vs {entry}")
    problems += [f"{key}: shipped but not compiled" for key in set(shipped_entries) - compiled]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m facert.kernels.triton.aot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=PTX_DIR, help="where to write (default: ptx/)")
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out)
        for p in problems:
            print(p, file=sys.stderr)
        print("shipped PTX up to date" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    for entry in write(args.out):
        print(f"{entry['file']}: {entry['entry']}, PTX {entry['ptx_version']}, "
              f"{entry['shared_bytes']} B shared")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
