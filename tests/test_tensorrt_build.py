"""`facert build` without TensorRT: engine cache keys, refusal of mismatched engines,
optimization-profile planning, Jetson detection, and the build's orchestration against a
stand-in for the tensorrt module. The real build runs only where TensorRT is installed."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from facert.export import tensorrt_build as tb
from facert.export.tensorrt_build import (
    BuildTarget,
    buckets,
    check_engine,
    engine_key,
    pick_profile,
    plan_profiles,
)
from facert.runtime import jetson
from facert.runtime.config import load_config
from facert.runtime.errors import FacertError, InvalidArgument

TARGET = BuildTarget("NVIDIA Jetson AGX Orin", (8, 7), "10.3.0.30", "fp16", "ab" * 32)
requires_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed"
)


def test_engine_key_names_the_target_and_changes_with_every_field():
    key = engine_key(TARGET)
    assert key.startswith("nvidia-jetson-agx-orin-sm87-trt10.3.0.30-fp16-")
    assert engine_key(TARGET) == key  # stable
    changed = [
        replace(TARGET, gpu_name="NVIDIA Jetson Orin Nano"),
        replace(TARGET, compute_capability=(8, 6)),
        replace(TARGET, tensorrt_version="10.3.0.31"),
        replace(TARGET, precision="int8"),
        replace(TARGET, graphs_sha256="cd" * 32),
    ]
    assert len({key, *map(engine_key, changed)}) == 6


def _manifest(target: BuildTarget) -> dict:
    fields = {**target.__dict__, "compute_capability": list(target.compute_capability)}
    return {"format": tb.ENGINE_FORMAT, "target": fields, "max_batch": 8}


def test_a_mismatched_engine_is_refused_with_the_command_that_rebuilds_it():
    check_engine(_manifest(TARGET), TARGET, "models/t2f")  # the same target passes
    other = replace(TARGET, tensorrt_version="10.7.0.23", gpu_name="Orin Nano")
    with pytest.raises(FacertError) as e:
        check_engine(_manifest(other), TARGET, "models/t2f")
    message = str(e.value)
    assert "tensorrt_version '10.7.0.23' (here '10.3.0.30')" in message
    assert "gpu_name" in message
    assert "facert build -m models/t2f --precision fp16 --max-batch 8" in message
    stale_graphs = _manifest(replace(TARGET, graphs_sha256="00" * 32))
    with pytest.raises(FacertError, match="graphs_sha256"):
        check_engine(stale_graphs, TARGET, "m")


def test_batch_and_length_buckets():
    assert buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(12) == [1, 2, 4, 8, 12]
    assert buckets(1) == [1]
    assert buckets(144, 16) == [16, 32, 64, 128, 144]
    with pytest.raises(InvalidArgument):
        buckets(0)


def test_profiles_cover_every_batch_and_prompt_length_once(tiny_model_dir):
    config = load_config(tiny_model_dir)
    lm = config.lm
    profiles = plan_profiles(config, max_batch=12, max_prompt=100, capacity=334)
    assert len(profiles["lm_decode"]) == 5 and len(profiles["lm_prefill"]) == 5 * 4
    for graph, ps in profiles.items():
        for p in ps:
            for lo, opt, hi in p.shapes.values():
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), graph
    for batch in range(1, 13):
        decode = {"input_ids": (batch, 1), "past_key_0": (batch, lm.n_head, 334, lm.head_dim)}
        i = pick_profile(profiles["lm_decode"], decode)
        assert profiles["lm_decode"][i].shapes["input_ids"][1][0] >= batch  # tuned at or above
        for length in (1, 16, 17, 100):
            shapes = {"input_ids": (batch, length), "segment_ids": (batch, length)}
            covering = [p for p in profiles["lm_prefill"] if p.covers(shapes)]
            assert len(covering) == 1
    with pytest.raises(InvalidArgument, match="no optimization profile"):
        pick_profile(profiles["lm_decode"], {"input_ids": (13, 1)})
    with pytest.raises(InvalidArgument):
        plan_profiles(config, 4, 400, 334)


def test_missing_tensorrt_names_jetpack(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(FacertError, match="JetPack 6.1"):
        tb.import_tensorrt()
    with pytest.raises(FacertError, match="TensorRT 10"):
        tb.build("no-such-model", "fp16")
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="8.6.2"))
    with pytest.raises(FacertError, match="8.6.2 is too old"):
        tb.import_tensorrt()


def test_the_backend_needs_tensorrt_and_says_so(tiny_model_dir, monkeypatch):
    from facert.runtime.backends import tensorrt_backend

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    config = load_config(tiny_model_dir)
    with pytest.raises(FacertError, match="JetPack"):
        tensorrt_backend.create(tiny_model_dir, config, "fp16")


class _FakeTensorRT:
    """Records what build_engines asks of TensorRT's Python API (10.x names)."""

    __version__ = "10.3.0.30"
    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
    MemoryPoolType = SimpleNamespace(WORKSPACE=0)

    def __init__(self):
        self.calls: list = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+"

        class Config:
            def __init__(self):
                self.profiles, self.cache = [], None

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def create_timing_cache(self, data):
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network", flags))
                return SimpleNamespace()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return SimpleNamespace(set_shape=lambda name, lo, opt, hi: None)

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", network.path, len(config.profiles)))
                return b"plan:" + network.path.encode()

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                self.network.path = path.rsplit("/", 1)[-1]
                return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser


def test_build_orchestration_with_a_stand_in_for_tensorrt(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "gpu_identity", lambda: ("NVIDIA Jetson AGX Orin", (8, 7)))
    trt = _FakeTensorRT()
    root = tmp_path / "engines"
    manifest = tb.build(tiny_model_dir, "fp32", max_batch=4, engines_root=root, trt=trt)
    engine_dir = root / manifest["key"]
    assert manifest["key"].startswith("nvidia-jetson-agx-orin-sm87-trt10.3.0.30-fp32-")
    assert ("network", 1 << 1) in trt.calls  # strongly typed
    builds = {c[1]: c[2] for c in trt.calls if c[0] == "build"}
    assert builds["lm_decode.onnx"] == 3 and builds["vqgan_decoder.onnx"] == 1  # 1, 2, 4
    assert (engine_dir / "lm_decode.engine").read_bytes() == b"plan:lm_decode.onnx"
    assert (root / tb.TIMING_CACHE).read_bytes() == b"+" * 6  # grown by each of six builds
    assert json.loads((engine_dir / "manifest.json").read_text())["files"] == manifest["files"]

    found, _ = tb.find_engines(tiny_model_dir, "fp32", root, trt)
    assert found == engine_dir
    monkeypatch.setattr(tb, "gpu_identity", lambda: ("NVIDIA GeForce RTX 4090", (8, 9)))
    with pytest.raises(FacertError, match="facert build -m .* --precision fp32") as e:
        tb.find_engines(tiny_model_dir, "fp32", root, trt)
    assert manifest["key"] in str(e.value)  # names what was built here
    with pytest.raises(FacertError, match="no TensorRT engines"):
        tb.find_engines(tiny_model_dir, "fp16", root, trt)


@requires_tensorrt
def test_real_build_on_this_gpu(tiny_model_dir, tmp_path):
    manifest = tb.build(tiny_model_dir, "fp16", max_batch=2, engines_root=tmp_path)
    assert len(manifest["files"]) == 6


def _device(tmp_path, release: str | None, model: bytes = b"", meminfo: str = ""):
    if release is not None:
        (tmp_path / "etc").mkdir(parents=True)
        (tmp_path / "etc" / "nv_tegra_release").write_text(release)
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    if model:
        (tmp_path / "proc" / "device-tree" / "model").write_bytes(model)
    if meminfo:
        (tmp_path / "proc" / "meminfo").write_text(meminfo)
    return tmp_path


ORIN = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x\n"


def test_jetson_detection_from_a_device_tree(tmp_path):
    root = _device(
        tmp_path,
        ORIN,
        b"NVIDIA Jetson AGX Orin Developer Kit\0",
        "MemTotal: 64000000 kB\nMemAvailable: 8388608 kB\n",
    )
    found = jetson.detect_jetson(root, probe_gpu=False)
    assert found == jetson.Jetson("36.4.3", 6, "NVIDIA Jetson AGX Orin Developer Kit", (8, 7))
    assert found.supports_tensorrt_10
    jetpack_6_0 = replace(found, l4t="36.3.0")  # TensorRT 8.6
    assert jetpack_6_0.jetpack == 6 and not jetpack_6_0.supports_tensorrt_10
    assert jetson.available_memory(root) == 8 << 30
    defaults = jetson.edge_defaults(found, 8 << 30)
    assert defaults.precision == "fp16"
    assert defaults.memory_budget == int(((8 << 30) - (512 << 20)) * 0.6)
    assert defaults.max_batch == 8


def test_older_or_unknown_jetsons_and_other_machines(tmp_path):
    assert jetson.detect_jetson(_device(tmp_path / "pc", None)) is None
    assert jetson.edge_defaults(None, 1 << 30) is None
    nano = jetson.detect_jetson(
        _device(
            tmp_path / "nano",
            "# R32 (release), REVISION: 7.1, GCID: 1\n",
            b"NVIDIA Jetson Nano Developer Kit\0",
        ),
        probe_gpu=False,
    )
    assert (nano.jetpack, nano.sm, nano.supports_tensorrt_10) == (4, (5, 3), False)
    odd = jetson.detect_jetson(_device(tmp_path / "odd", "garbled"), probe_gpu=False)
    assert (odd.l4t, odd.jetpack, odd.board, odd.sm) == ("unknown", None, "", None)
    small = jetson.edge_defaults(odd, None)  # MemAvailable unreadable: assume 2 GiB
    assert small.max_batch == 4 and small.memory_budget >= 256 << 20


# ----------------------------------------------------------------------------- the backend
# The TensorRT backend's own logic (buffers, profiles, the two KV pools, staged batches, slot
# copies) run against a simulated device: "device memory" is one numpy array, cuda-python's
# copies are numpy copies, and each "engine" runs its ONNX graph with ONNX Runtime on the
# tensors at the addresses bound. What this cannot check is TensorRT and CUDA themselves.


class _FakeCudart:
    """cudaMalloc / cudaMemcpy(2D)Async / streams over a numpy array; host pointers are real."""

    cudaMemcpyKind = SimpleNamespace(
        cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
    )

    def __init__(self, size: int = 64 << 20):
        self.mem = np.zeros(size, np.uint8)
        self.top = 4096  # address 0 stays invalid

    def cudaStreamCreate(self):
        return 0, "stream"

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMalloc(self, nbytes):
        ptr, self.top = self.top, self.top + (nbytes + 255) // 256 * 256
        assert self.top <= len(self.mem), "simulated device out of memory"
        return 0, ptr

    def cudaFree(self, ptr):
        return (0,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        return self.cudaMemcpy2DAsync(dst, count, src, count, count, 1, kind, stream)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, rows, kind, stream):
        for r in range(rows):
            s, d = src + r * spitch, dst + r * dpitch
            if kind == 1:
                self.mem[d : d + width] = np.frombuffer(ctypes.string_at(s, width), np.uint8)
            elif kind == 2:
                ctypes.memmove(d, self.mem[s : s + width].ctypes.data, width)
            else:
                self.mem[d : d + width] = self.mem[s : s + width].copy()
        return (0,)

    def read(self, ptr: int, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.mem[ptr : ptr + n].view(dtype).reshape(shape).copy()

    def write(self, ptr: int, a: np.ndarray) -> None:
        raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        self.mem[ptr : ptr + raw.size] = raw


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64}  # fmt: skip


def _simulated_tensorrt(onnx_dir, cudart: _FakeCudart):
    """The stand-in used for building, plus a Runtime whose engines run ONNX Runtime."""
    import onnxruntime as ort

    trt = _FakeTensorRT()

    class Context:
        def __init__(self, session):
            self.session, self.shapes, self.addresses = session, {}, {}

        def set_optimization_profile_async(self, index, stream):
            self.profile = index

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream):
            feed = {
                i.name: cudart.read(self.addresses[i.name], self.shapes[i.name], _ORT_TYPES[i.type])
                for i in self.session.get_inputs()
            }
            names = [o.name for o in self.session.get_outputs()]
            for name, value in zip(names, self.session.run(names, feed)):
                cudart.write(self.addresses[name], value)
            return True

    class Engine:
        def __init__(self, plan: bytes):
            path = onnx_dir / plan.decode().removeprefix("plan:")
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            tensors = (*self.session.get_inputs(), *self.session.get_outputs())
            self.types = {t.name: _ORT_TYPES[t.type] for t in tensors}

        def get_tensor_dtype(self, name):
            return self.types[name]

        def create_execution_context(self):
            return Context(self.session)

    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=Engine)
    trt.nptype = lambda dtype: dtype
    return trt


def test_backend_on_a_simulated_device_matches_torch(
    tiny_model_dir, tmp_path, monkeypatch, vq_golden
):
    from facert.runtime.backends.tensorrt_backend import TensorRTBackend
    from facert.runtime.backends.torch_backend import TorchBackend
    from facert.runtime.config import LM_FILE, VQGAN_FILE, read_model

    monkeypatch.setattr(tb, "gpu_identity", lambda: ("Simulated GPU", (8, 7)))
    config = load_config(tiny_model_dir)
    root = tmp_path / "engines"
    cudart = _FakeCudart()
    trt = _simulated_tensorrt(root / "onnx-fp32", cudart)
    tb.build(tiny_model_dir, "fp32", max_batch=4, max_prompt=64, engines_root=root, trt=trt)
    engine_dir, manifest = tb.find_engines(tiny_model_dir, "fp32", root, trt)
    ours = TensorRTBackend(engine_dir, manifest, config, trt, cudart)
    ref = TorchBackend(read_model(tiny_model_dir, keep=(LM_FILE, VQGAN_FILE)), config)
    capacity = min(config.lm.seq_length, config.lm.max_positions)
    for b in (ours, ref):
        b.allocate(5, capacity)
    rng = np.random.default_rng(0)
    lo = config.lm.text_vocab_size
    ids = [np.concatenate([[101], rng.integers(1000, 2000, n), [102]]) for n in (9, 4, 13)]
    segs = [np.ones(len(x), np.int64) for x in ids]

    def run(backend, slots, steps=6):
        """Prefill rows into `slots`, then greedy image codes, decoded in two orders."""
        hidden = backend.prefill(slots, ids, segs)
        positions, out = np.array([len(x) for x in ids]), []
        for step in range(steps):
            token = backend.head(hidden, (lo, config.lm.vocab_size)).argmax(1) + lo
            out.append(token)
            order = np.arange(len(slots)) if step % 2 else np.arange(len(slots))[::-1]
            hidden = np.empty_like(hidden)
            hidden[order] = backend.decode(slots[order], token[order], positions[order])
            positions = positions + 1
        return np.stack(out, 1), hidden

    for slots in (np.array([3, 0, 1]), np.array([0, 1, 2])):  # staged, then direct batches
        (a, ha), (b, hb) = run(ours, slots), run(ref, slots)
        np.testing.assert_array_equal(a, b)
        assert np.abs(ha - hb).max() < 1e-4
    assert ours.parity[:3].all()  # the direct path ran (and flipped those slots' pools)
    # A copied slot continues like its source (the prefix cache's use).
    for backend in (ours, ref):
        backend.copy_slot(0, 3, len(ids[0]) + 6)
    tokens, positions = np.array([lo + 5]), np.array([len(ids[0]) + 6])
    a = ours.decode(np.array([3]), tokens, positions)
    assert np.abs(a - ref.decode(np.array([3]), tokens, positions)).max() < 1e-4
    five = np.arange(5)  # more rows than the engines' max_batch (4): run in two chunks
    rows, row_segs = [ids[i % 3] for i in five], [segs[i % 3] for i in five]
    h = ours.prefill(five, rows, row_segs)
    assert np.abs(h - ref.prefill(five, rows, row_segs)).max() < 1e-4
    step = (five + lo, np.array([len(r) for r in rows]))
    assert np.abs(ours.decode(five, *step) - ref.decode(five, *step)).max() < 1e-4
    logits = ours.forward_logits(ids[0], segs[0])
    assert np.abs(logits - ref.forward_logits(ids[0], segs[0])).max() < 1e-3
    images = vq_golden["images"][:1].astype(np.float32)  # (1, 3, R, R)
    codes = ours.encode_images(images)
    np.testing.assert_array_equal(codes, ref.encode_images(images))
    assert np.abs(ours.decode_images(codes) - ref.decode_images(codes)).max() < 1e-4


def test_backend_fp16_on_a_simulated_device_matches_its_graphs(
    tiny_model_dir, tmp_path, monkeypatch
):
    """fp16 engines (half-precision KV cache and hidden states): the backend's results equal
    running the same graphs directly (tests/test_tensorrt_graphs.py's driver), bit for bit."""
    from facert.runtime.backends.tensorrt_backend import TensorRTBackend
    from tests.test_tensorrt_graphs import OrtDriver, _graphs

    monkeypatch.setattr(tb, "gpu_identity", lambda: ("Simulated GPU", (8, 7)))
    config = load_config(tiny_model_dir)
    root = tmp_path / "engines"
    cudart = _FakeCudart()
    trt = _simulated_tensorrt(root / "onnx-fp16", cudart)
    tb.build(tiny_model_dir, "fp16", max_batch=2, max_prompt=32, engines_root=root, trt=trt)
    ours = TensorRTBackend(*tb.find_engines(tiny_model_dir, "fp16", root, trt), config, trt, cudart)
    capacity = min(config.lm.seq_length, config.lm.max_positions)
    ours.allocate(4, capacity)
    assert ours.cache_dtype == np.float16
    driver = OrtDriver(_graphs(tiny_model_dir, "fp16"), capacity)
    ids = [np.array([101, 2000, 2001, 102]), np.array([101, 2002, 102])]
    segs = [np.ones(len(x), np.int64) for x in ids]
    window = (config.lm.text_vocab_size, config.lm.vocab_size)
    for slots in (np.array([3, 1]), np.array([0, 1])):  # staged, then direct
        a, b = ours.prefill(slots, ids, segs), driver.prefill(np.arange(2), ids, segs)
        positions = np.array([len(x) for x in ids])
        for _ in range(3):
            np.testing.assert_array_equal(a, b)
            token = ours.head(a, window).argmax(1) + window[0]
            np.testing.assert_array_equal(token, driver.head(b, window).argmax(1) + window[0])
            a = ours.decode(slots, token, positions)
            b = driver.decode(np.arange(2), token, positions)
            positions = positions + 1
