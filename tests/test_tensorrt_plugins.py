"""The Triton kernels as TensorRT plugins, without TensorRT: which PTX a GPU gets, the entries
rewritten to TensorRT's argument order (and assembled by ptxas), launch geometry and scalars,
and the registration's plumbing against a stand-in for `tensorrt.plugin`. Whether TensorRT
builds and launches them is not tested anywhere yet."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from facert.export import tensorrt_plugins as tp
from facert.kernels.triton.aot import PTX_DIR
from facert.runtime.errors import FacertError

MANIFEST = tp.load_manifest()


@pytest.mark.parametrize(
    "capability, target",
    [((8, 7), "sm_87"), ((9, 0), "sm_90a"), ((8, 9), "sm_87"), ((10, 0), "sm_87"),
     ((12, 0), "sm_87")],
)  # fmt: skip
def test_ptx_per_compute_capability(capability, target):
    for kernel in ("attention", "sampling"):
        assert tp.select_ptx(kernel, capability, MANIFEST)["target"] == target


def test_gpus_older_than_the_shipped_targets_are_refused_with_the_fix():
    for capability in ((8, 6), (8, 0), (7, 2)):
        with pytest.raises(FacertError, match="TARGETS in kernels/triton/aot.py"):
            tp.select_ptx("attention", capability, MANIFEST)
    with pytest.raises(FacertError, match="shipped: none"):
        tp.select_ptx("no-such-kernel", (9, 0), MANIFEST)


def test_ptx_is_read_against_its_manifest_hash(tmp_path):
    entry = tp.select_ptx("attention", (8, 7), MANIFEST)
    assert ".entry _decode_attention_kernel(" in tp.read_ptx(entry)
    (tmp_path / entry["file"]).write_text(tp.read_ptx(entry) + "\n")
    with pytest.raises(FacertError, match="does not match its sha256"):
        tp.read_ptx(entry, tmp_path)


def _entry_params(ptx: str, name: str) -> list[str]:
    lines = ptx.split("\n")
    start = next(i for i, s in enumerate(lines) if f".entry {name}(" in s)
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == ")")
    return [s.strip().rstrip(",").split()[-1] for s in lines[start + 1 : end]]


def _ptxas() -> str | None:
    """Triton's bundled ptxas (the one aot.py's compiles go through), else one on PATH."""
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0]) / "backends/nvidia/bin/ptxas"
        if bundled.is_file():
            return str(bundled)
    return shutil.which("ptxas")


@pytest.mark.parametrize("capability", [(8, 7), (9, 0)])
@pytest.mark.parametrize("plugin", tp.PLUGINS, ids=lambda p: p.name)
def test_entries_take_tensorrts_argument_order_and_still_assemble(plugin, capability, tmp_path):
    name, ptx, entry = tp.kernel_for(plugin, capability)
    original = tp.read_ptx(entry)
    signature = list(entry["signature"])
    before = _entry_params(original, name)
    assert len(before) == len(signature) + entry["scratch_params"]
    after = _entry_params(ptx, name)
    wanted = [*plugin.inputs, *plugin.scalars, *plugin.outputs]
    assert after == [before[signature.index(n)] for n in wanted]  # scratch pointers dropped
    head = original.split(f".entry {name}(")[0]
    assert ptx.startswith(head) and ptx.endswith(original.split("\n)\n", 1)[1])  # body as is
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("no ptxas (Triton's bundled one or on PATH)")
    (tmp_path / "k.ptx").write_text(ptx)
    arch = entry["target"]
    run = subprocess.run(
        [ptxas, f"--gpu-name={arch}", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr


def test_a_parameter_the_body_reads_is_never_dropped():
    ptx = "\n".join(
        [".visible .entry k(", "\t.param .u64 k_param_0,", "\t.param .u32 k_param_1", ")",
         "{", "\tld.param.u32 %r1, [k_param_1];", "}"]
    )  # fmt: skip
    assert _entry_params(tp.tensorrt_entry(ptx, "k", [1, 0]), "k") == ["k_param_1", "k_param_0"]
    assert _entry_params(tp.tensorrt_entry(ptx, "k", [1]), "k") == ["k_param_1"]
    with pytest.raises(FacertError, match="reads its parameter k_param_1"):
        tp.tensorrt_entry(ptx, "k", [0])
    with pytest.raises(FacertError, match="no entry"):
        tp.tensorrt_entry(ptx, "other", [0])


def test_a_signature_that_is_not_the_plugins_is_refused():
    entry = {"signature": {"q": "*fp32", "out": "*fp32"}}
    with pytest.raises(FacertError, match="is not the plugin's"):
        tp.parameter_order(tp.ATTENTION, entry)


def test_launch_geometry_and_scalars():
    entry = tp.select_ptx("attention", (8, 7), MANIFEST)
    assert entry["grid"] == "(B, H)" and entry["block"] == [256, 1, 1]  # 8 warps, as launched
    grid, extra = tp.attention_launch((3, 12, 64), (16, 12, 334, 64), 64, entry)
    assert grid == (3, 12, 1)
    assert extra[:4] == (16, 12, 334, 64)
    scale = struct.unpack("<f", struct.pack("<i", extra[4]))[0]  # the kernel reads .f32 bytes
    assert scale == pytest.approx(1 / math.sqrt(64), rel=1e-7)
    assert tp.float_bits(-2.0) < 0  # sign bit set: a negative int32
    with pytest.raises(FacertError, match="head_dim up to 64"):
        tp.attention_launch((3, 2, 128), (16, 2, 334, 128), 128, entry)
    assert tp.select_ptx("sampling", (9, 0), MANIFEST)["grid"] == "(B,)"
    assert tp.sampler_launch((5, 1024)) == ((5, 1, 1), (1024, 1024))


def test_scratch_needing_ptx_is_refused(tmp_path):
    manifest = json.loads((PTX_DIR / "manifest.json").read_text())
    for e in manifest:
        shutil.copy(PTX_DIR / e["file"], tmp_path / e["file"])
        e["global_scratch_bytes"] = 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FacertError, match="scratch memory"):
        tp.kernel_for(tp.SAMPLER, (8, 7), tmp_path)


def test_registration_needs_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(FacertError, match="JetPack"):
        tp.register_plugins((8, 7))


class _TensorDesc:
    def __init__(self, shape, dtype="float32"):
        self.shape_expr, self.dtype = list(shape), dtype

    def like(self):
        return _TensorDesc(self.shape_expr, self.dtype)


def _stand_in_plugin_api() -> tuple[ModuleType, dict]:
    """A `tensorrt.plugin` that records what is registered (names from TensorRT 10's docs)."""
    registry: dict = {}

    def recorder(kind):
        def by_id(plugin_id):
            def keep(fn):
                registry.setdefault(plugin_id, {})[kind] = fn
                return fn

            return keep

        return by_id

    trtp = ModuleType("tensorrt.plugin")
    trtp.register, trtp.autotune, trtp.aot_impl = map(recorder, ("desc", "types", "aot"))
    trtp.TensorDesc = _TensorDesc
    trtp.KernelLaunchParams = SimpleNamespace
    trtp.SymInt32 = lambda v: ("i32", v)
    trtp.SymIntExprs = SimpleNamespace(from_tuple=tuple)
    trtp.AutoTuneCombination = str
    trtp.ShapeExprs = lambda n: [None] * n
    return trtp, registry


def test_registration_against_a_stand_in_plugin_api(monkeypatch):
    trtp, registry = _stand_in_plugin_api()
    trt = ModuleType("tensorrt")
    trt.__version__, trt.int64, trt.plugin = "10.3.0.30", "int64", trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(tp, "_registered", {})
    assert tp.register_plugins((8, 7)) == ["facert::decode_attention", "facert::sample"]
    assert tp.register_plugins((8, 7)) == ["facert::decode_attention", "facert::sample"]  # once
    with pytest.raises(FacertError, match="registered for compute capability"):
        tp.register_plugins((9, 0))

    attention = registry["facert::decode_attention"]
    q, cache = _TensorDesc((3, 12, 64)), _TensorDesc((16, 12, 334, 64))
    ids = _TensorDesc((3,), "int64")
    inputs = (q, cache, cache, q, q, ids, ids)
    assert attention["desc"](*inputs, head_dim=64).shape_expr == [3, 12, 64]
    assert attention["types"](*inputs, outputs=()) == [tp.ATTENTION.types]
    name, ptx, launch, extra = attention["aot"](*inputs, 64, outputs=(), tactic=0)
    assert name == "_decode_attention_kernel" and ".target sm_87" in ptx
    assert (launch.grid_x, launch.grid_y, launch.grid_z) == (3, 12, 1)
    assert (launch.block_x, launch.shared_mem) == (256, 1024)
    assert [v for _, v in extra][:4] == [16, 12, 334, 64]

    sample = registry["facert::sample"]
    logits, rows = _TensorDesc((5, 1024)), _TensorDesc((5,))
    out = sample["desc"](logits, rows, _TensorDesc((5,), "int32"), rows, rows)
    assert (out.shape_expr, out.dtype) == ([5], "int64")
    name, ptx, launch, extra = sample["aot"](logits, rows, rows, rows, rows, (), 0)
    assert name == "_sample_kernel" and (launch.grid_x, launch.shared_mem) == (5, 2048)
    assert extra == (("i32", 1024), ("i32", 1024))


def test_build_registers_them_when_asked(tiny_model_dir, tmp_path, monkeypatch):
    from facert.export import tensorrt_build as tb
    from tests.test_tensorrt_build import _FakeTensorRT

    trtp, registry = _stand_in_plugin_api()
    trt = _FakeTensorRT()
    trt.plugin, trt.int64 = trtp, "int64"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(tp, "_registered", {})
    monkeypatch.setattr(tb, "gpu_identity", lambda: ("NVIDIA Jetson AGX Orin", (8, 7)))
    manifest = tb.build(tiny_model_dir, "fp32", max_batch=2, engines_root=tmp_path, plugins=True)
    assert manifest["plugins"] == ["facert::decode_attention", "facert::sample"]
    assert set(registry) == set(manifest["plugins"])
    assert tb.build(tiny_model_dir, "fp32", max_batch=2, engines_root=tmp_path)["plugins"] == []
