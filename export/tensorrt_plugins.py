"""facert's Triton kernels as TensorRT plugins: TensorRT 10's Python plugins (`tensorrt.plugin`)
with ahead-of-time implementations, whose kernel is the PTX shipped in kernels/triton/ptx, so an
engine that uses them launches the kernel itself, with no Python at run time.

NOT RUN ON HARDWARE, and NO GRAPH USES THEM YET. TensorRT cannot be installed where this was
written; `register_plugins` follows TensorRT 10's documented `tensorrt.plugin` API (register,
autotune, aot_impl returning the kernel's name, its PTX, KernelLaunchParams and SymIntExprs),
which tensorrt-stubs does not cover, so mypy cannot check those calls either. What is tested
(tests/test_tensorrt_plugins.py): the PTX chosen per compute capability, the manifest lookup and
hashes, the rewritten entries (assembled by ptxas for each target), the launch geometry and the
scalar arguments. `facert build` registers them only when asked (`build(..., plugins=True)`).

What remains before a graph can call them:
- decode attention writes the new key and value into `k_cache`/`v_cache` in place, which are
  plugin inputs: TensorRT must be told that they alias outputs (I/O aliasing, which the
  TensorRT-ready lm_decode graph avoids with its two KV pools, tensorrt_graphs.py), and the
  graph must call the plugin per layer in place of its attention pattern;
- the sampler needs a graph of its own (head logits + per-row parameters -> tokens);
- the shipped PTX is fp32 only (aot.py compiles one specialisation per kernel): fp16 engines
  need fp16 specialisations;
- the parser must map the graph's custom nodes to these plugins (domain `facert`).

TensorRT's launch convention differs from Triton's, and `tensorrt_entry` bridges the two. An AOT
plugin's kernel takes the input tensors' pointers, then the extra scalar arguments, then the
output pointers, and nothing else; Triton's entry takes its signature's order (attention: ...,
`out`, then the scalars) plus two trailing scratch pointers that a kernel with no scratch never
reads. A PTX entry names its parameters and the body reads them by name, so reordering the
declarations (and dropping the unread scratch pointers) changes only how arguments are passed.
Extra arguments are 32-bit integers: attention's fp32 `scale` goes as its bit pattern, which the
kernel reads back as `.f32` from the same four bytes.
"""

import hashlib
import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facert.kernels.triton.aot import PTX_DIR
from facert.runtime.errors import FacertError

NAMESPACE = "facert"


@dataclass(frozen=True)
class PluginKernel:
    """How TensorRT passes one kernel's arguments: signature names, in TensorRT's order."""

    name: str  # the plugin is NAMESPACE::name
    kernel: str  # the manifest's "kernel"
    inputs: tuple[str, ...]
    scalars: tuple[str, ...]  # TensorRT's extra arguments (SymInt32)
    outputs: tuple[str, ...]
    types: str  # the one type combination the PTX was compiled for: inputs, then outputs

    @property
    def plugin_id(self) -> str:
        return f"{NAMESPACE}::{self.name}"


ATTENTION = PluginKernel(
    "decode_attention",
    "attention",
    ("q", "k_cache", "v_cache", "k_new", "v_new", "slots", "positions"),
    ("n_slots", "n_heads", "capacity", "head_dim", "scale"),
    ("out",),
    "FP32, FP32, FP32, FP32, FP32, INT64, INT64, FP32",
)
SAMPLER = PluginKernel(
    "sample",
    "sampling",
    ("logits", "temperature", "top_k", "top_p", "uniform"),
    ("stride_row", "vocab"),
    ("out",),
    "FP32, FP32, INT32, FP32, FP32, INT64",
)
PLUGINS = (ATTENTION, SAMPLER)


# ----------------------------------------------------------------------------- the PTX


def load_manifest(ptx_dir: Path = PTX_DIR) -> list[dict]:
    return json.loads((ptx_dir / "manifest.json").read_text())


def _sm(target: str) -> int:
    match = re.fullmatch(r"sm_(\d+)(a?)", target)
    if match is None:
        raise FacertError(f"unknown PTX target {target!r} in the kernels' manifest")
    return int(match[1])


def select_ptx(kernel: str, capability: tuple[int, int], manifest: list[dict]) -> dict:
    """The manifest entry of `kernel` for a GPU of this compute capability: the newest target it
    can run. The driver compiles PTX for sm_XY on any GPU of capability >= X.Y, except the
    arch-specific sm_XYa (Hopper's sm_90a), which runs on X.Y only."""
    cc = capability[0] * 10 + capability[1]
    usable = [
        e
        for e in manifest
        if e["kernel"] == kernel
        and (_sm(e["target"]) == cc if e["target"].endswith("a") else _sm(e["target"]) <= cc)
    ]
    if not usable:
        shipped = sorted(e["target"] for e in manifest if e["kernel"] == kernel)
        raise FacertError(
            f"no shipped PTX of the {kernel} kernel runs on sm_{cc} (shipped: "
            f"{', '.join(shipped) or 'none'}); add the target to TARGETS in "
            "kernels/triton/aot.py and run `python -m facert.kernels.triton.aot`"
        )
    return max(usable, key=lambda e: (_sm(e["target"]), e["target"].endswith("a")))


def read_ptx(entry: dict, ptx_dir: Path = PTX_DIR) -> str:
    """The PTX text of a manifest entry, checked against its sha256."""
    text = (ptx_dir / entry["file"]).read_text()
    if hashlib.sha256(text.encode()).hexdigest() != entry["sha256"]:
        raise FacertError(
            f"{ptx_dir / entry['file']} does not match its sha256 in manifest.json: reinstall "
            "facert or rerun `python -m facert.kernels.triton.aot`"
        )
    return text


def parameter_order(plugin: PluginKernel, entry: dict) -> list[int]:
    """Indices of the entry's PTX parameters in the order TensorRT passes them."""
    names = list(entry["signature"])
    wanted = [*plugin.inputs, *plugin.scalars, *plugin.outputs]
    if sorted(wanted) != sorted(names):
        raise FacertError(
            f"the {plugin.kernel} kernel's signature {names} is not the plugin's {wanted}"
        )
    return [names.index(n) for n in wanted]


def tensorrt_entry(ptx: str, entry_name: str, order: Sequence[int]) -> str:
    """`ptx` with the parameter list of `.entry entry_name` rewritten to `order` (indices into
    the original list); parameters left out must not be read by the body."""
    lines = ptx.split("\n")
    start = next((i for i, s in enumerate(lines) if f".entry {entry_name}(" in s), None)
    if start is None:
        raise FacertError(f"the PTX has no entry {entry_name}")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == ")")
    params = [s.rstrip().rstrip(",") for s in lines[start + 1 : end]]
    names = [s.split()[-1] for s in params]
    body = "\n".join(lines[end + 1 :])
    for i in sorted(set(range(len(params))) - set(order)):
        if re.search(rf"\b{re.escape(names[i])}\b", body):
            raise FacertError(f"{entry_name} reads its parameter {names[i]}: it cannot be dropped")
    kept = [params[i] for i in order]
    return "\n".join([*lines[: start + 1], ",\n".join(kept), *lines[end:]])


def kernel_for(
    plugin: PluginKernel, capability: tuple[int, int], ptx_dir: Path = PTX_DIR
) -> tuple[str, str, dict]:
    """(entry name, PTX in TensorRT's argument order, manifest entry) for this GPU."""
    entry = select_ptx(plugin.kernel, capability, load_manifest(ptx_dir))
    if entry["global_scratch_bytes"] or entry["profile_scratch_bytes"]:
        raise FacertError(f"{entry['file']} needs scratch memory, which TensorRT does not pass")
    ptx = tensorrt_entry(read_ptx(entry, ptx_dir), entry["entry"], parameter_order(plugin, entry))
    return entry["entry"], ptx, entry


# ----------------------------------------------------------------------------- launches
# Each takes shapes whose items are ints (tests) or TensorRT's symbolic shape expressions.


def float_bits(x: float) -> int:
    """The float32 nearest x, as the signed int32 with the same four bytes."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def attention_launch(
    q_shape: Sequence, k_cache_shape: Sequence, head_dim: int, entry: dict
) -> tuple[tuple, tuple]:
    """(grid, extra scalars) of decode attention: one program per (row, head), as the launcher
    in kernels/triton/attention.py. q (B, H, D); caches (S, H, M, D); D = head_dim."""
    if head_dim > entry["constexprs"]["BLOCK_D"]:
        raise FacertError(
            f"the shipped attention PTX handles head_dim up to {entry['constexprs']['BLOCK_D']}, "
            f"not {head_dim}"
        )
    slots, heads, capacity = k_cache_shape[0], k_cache_shape[1], k_cache_shape[2]
    grid = (q_shape[0], q_shape[1], 1)
    return grid, (slots, heads, capacity, head_dim, float_bits(1.0 / math.sqrt(head_dim)))


def sampler_launch(logits_shape: Sequence) -> tuple[tuple, tuple]:
    """(grid, extra scalars) of the sampler: one program per row of contiguous (B, V) logits."""
    rows, vocab = logits_shape[0], logits_shape[1]
    return (rows, 1, 1), (vocab, vocab)


# ----------------------------------------------------------------------------- registration

_registered: dict[str, tuple[int, int]] = {}  # plugin id -> the capability registered for


def register_plugins(capability: tuple[int, int], ptx_dir: Path = PTX_DIR) -> list[str]:
    """Register decode attention and the sampler with TensorRT's plugin registry for a GPU of
    this compute capability (once per process); returns their plugin ids. UNVERIFIED: written
    against TensorRT 10's `tensorrt.plugin` documentation, never run."""
    from .tensorrt_build import require_tensorrt

    require_tensorrt()
    import tensorrt as trt
    import tensorrt.plugin as trtp

    for plugin in PLUGINS:
        before = _registered.get(plugin.plugin_id, capability)
        if before != capability:
            raise FacertError(
                f"{plugin.plugin_id} is registered for compute capability {before} in this "
                "process: build for another GPU in a new process"
            )
    kernels = {p.plugin_id: kernel_for(p, capability, ptx_dir) for p in PLUGINS}

    def launch_params(grid: tuple, entry: dict) -> Any:
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = grid
        params.block_x, params.block_y, params.block_z = entry["block"]
        params.shared_mem = entry["shared_bytes"]
        return params

    def scalars(values: tuple) -> Any:
        return trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in values])

    if ATTENTION.plugin_id not in _registered:
        name, ptx, entry = kernels[ATTENTION.plugin_id]

        @trtp.register(ATTENTION.plugin_id)
        def attention(
            q: trtp.TensorDesc,
            k_cache: trtp.TensorDesc,
            v_cache: trtp.TensorDesc,
            k_new: trtp.TensorDesc,
            v_new: trtp.TensorDesc,
            slots: trtp.TensorDesc,
            positions: trtp.TensorDesc,
            head_dim: int,
        ) -> trtp.TensorDesc:
            return q.like()  # out: (B, H, D) like q

        @trtp.autotune(ATTENTION.plugin_id)
        def attention_types(q, k_cache, v_cache, k_new, v_new, slots, positions, outputs):
            return [trtp.AutoTuneCombination(ATTENTION.types)]

        @trtp.aot_impl(ATTENTION.plugin_id)
        def attention_kernel(
            q, k_cache, v_cache, k_new, v_new, slots, positions, head_dim, outputs, tactic
        ):
            grid, extra = attention_launch(q.shape_expr, k_cache.shape_expr, head_dim, entry)
            return name, ptx, launch_params(grid, entry), scalars(extra)

    if SAMPLER.plugin_id not in _registered:
        s_name, s_ptx, s_entry = kernels[SAMPLER.plugin_id]

        @trtp.register(SAMPLER.plugin_id)
        def sample(
            logits: trtp.TensorDesc,
            temperature: trtp.TensorDesc,
            top_k: trtp.TensorDesc,
            top_p: trtp.TensorDesc,
            uniform: trtp.TensorDesc,
        ) -> trtp.TensorDesc:
            out = logits.like()  # (B,) int64 tokens
            out.dtype = trt.int64
            shape = trtp.ShapeExprs(1)
            shape[0] = logits.shape_expr[0]
            out.shape_expr = shape
            return out

        @trtp.autotune(SAMPLER.plugin_id)
        def sample_types(logits, temperature, top_k, top_p, uniform, outputs):
            return [trtp.AutoTuneCombination(SAMPLER.types)]

        @trtp.aot_impl(SAMPLER.plugin_id)
        def sample_kernel(logits, temperature, top_k, top_p, uniform, outputs, tactic):
            grid, extra = sampler_launch(logits.shape_expr)
            return s_name, s_ptx, launch_params(grid, s_entry), scalars(extra)

    for plugin in PLUGINS:
        _registered[plugin.plugin_id] = capability
    return [p.plugin_id for p in PLUGINS]
