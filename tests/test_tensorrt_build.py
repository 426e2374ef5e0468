"""`facert build` without TensorRT: engine cache keys, refusal of mismatched engines,
optimization-profile planning, Jetson detection, and the build's orchestration against a
stand-in for the tensorrt module (put in sys.modules, where the code imports it from). The real
build runs only where TensorRT is installed."""

from __future__ import annotations

import ctypes
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


def _has_tensorrt() -> bool:
    try:
        tb.require_tensorrt()
    except FacertError:
        return False
    return True


requires_tensorrt = pytest.mark.skipif(not _has_tensorrt(), reason="TensorRT is not installed")


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
        tb.require_tensorrt()
    with pytest.raises(FacertError, match="TensorRT 10"):
        tb.build("no-such-model", "fp16")
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace())  # tensorrt-stubs' folder
    with pytest.raises(FacertError, match="has no version"):
        tb.require_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="8.6.2"))
    with pytest.raises(FacertError, match="8.6.2 is too old"):
        tb.require_tensorrt()


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
    Dims = tuple

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
                def set_shape(name, lo, opt, hi):
                    assert all(type(s) is tuple for s in (lo, opt, hi))  # made with trt.Dims

                return SimpleNamespace(set_shape=set_shape)

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
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    root = tmp_path / "engines"
    manifest = tb.build(tiny_model_dir, "fp32", max_batch=4, engines_root=root)
    engine_dir = root / manifest["key"]
    assert manifest["key"].startswith("nvidia-jetson-agx-orin-sm87-trt10.3.0.30-fp32-")
    assert ("network", 1 << 1) in trt.calls  # strongly typed
    builds = {c[1]: c[2] for c in trt.calls if c[0] == "build"}
    assert builds["lm_decode.onnx"] == 3 and builds["vqgan_decoder.onnx"] == 1  # 1, 2, 4
    assert (engine_dir / "lm_decode.engine").read_bytes() == b"plan:lm_decode.onnx"
    assert (root / tb.TIMING_CACHE).read_bytes() == b"+" * 6  # grown by each of six builds
    assert json.loads((engine_dir / "manifest.json").read_text())["files"] == manifest["files"]

    found, _ = tb.find_engines(tiny_model_dir, "fp32", root)
    assert found == engine_dir
    monkeypatch.setattr(tb, "gpu_identity", lambda: ("NVIDIA GeForce RTX 4090", (8, 9)))
    with pytest.raises(FacertError, match="facert build -m .* --precision fp32") as e:
        tb.find_engines(tiny_model_dir, "fp32", root)
    assert manifest["key"] in str(e.value)  # names what was built here
    with pytest.raises(FacertError, match="no TensorRT engines"):
        tb.find_engines(tiny_model_dir, "fp16", root)


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
# copies, CUDA graphs) run against a simulated device: "device memory" is one numpy array,
# cuda-python's copies are numpy copies, each "engine" runs its ONNX graph with ONNX Runtime on
# the tensors at the addresses bound, and a captured "CUDA graph" is the list of engine runs
# enqueued during the capture, each replayed on what memory holds at launch. What this cannot
# check is TensorRT and CUDA themselves.


class _FakeCudart:
    """cudaMalloc / cudaMemcpy(2D)Async / streams over a numpy array; host pointers are real."""

    cudaMemcpyKind = SimpleNamespace(
        cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
    )
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self, size: int = 64 << 20):
        self.mem = np.zeros(size, np.uint8)
        self.top = 4096  # address 0 stays invalid
        self.capturing: list | None = None  # the work enqueued during a capture
        self.launches = 0

    def cudaStreamBeginCapture(self, stream, mode):
        assert self.capturing is None
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphLaunch(self, executable, stream):
        self.launches += 1
        for work in executable:
            work()
        return (0,)

    def cudaGraphExecDestroy(self, executable):
        return (0,)

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7  # a handle, as cuda-python's cudaStream_t converts to

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
        assert self.capturing is None, "copies are never captured"
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
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}
            self.session, self.runs = engine.session, 0

        def set_optimization_profile_async(self, index, stream):
            owner = self.engine.profile_owners.setdefault(index, self)
            assert owner is self, "TensorRT gives a profile to one context at a time"
            self.profile = index

        def set_device_memory(self, ptr, size):
            self.device_memory = ptr

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream):
            assert type(stream) is int  # TensorRT takes the stream's handle
            if cudart.capturing is not None:
                assert self.runs, "TensorRT wants one run before a capture"
                cudart.capturing.append(self.bound())
            else:
                self.bound()()
            self.runs += 1
            return True

        def bound(self):
            """This run, on the shapes and addresses bound now, the data there when it runs."""
            shapes, addresses = dict(self.shapes), dict(self.addresses)

            def run():
                feed = {
                    i.name: cudart.read(addresses[i.name], shapes[i.name], _ORT_TYPES[i.type])
                    for i in self.session.get_inputs()
                }
                names = [o.name for o in self.session.get_outputs()]
                for name, value in zip(names, self.session.run(names, feed)):
                    cudart.write(addresses[name], value)

            return run

    class Engine:
        def __init__(self, plan: bytes):
            path = onnx_dir / plan.decode().removeprefix("plan:")
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            tensors = (*self.session.get_inputs(), *self.session.get_outputs())
            self.types = {t.name: _ORT_TYPES[t.type] for t in tensors}
            self.device_memory_size_v2, self.profile_owners = 4096, {}

        def get_tensor_dtype(self, name):
            return self.types[name]

        def create_execution_context(self, strategy=None):
            return Context(self)

    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=Engine)
    trt.ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED=2)
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
    monkeypatch.setitem(sys.modules, "tensorrt", _simulated_tensorrt(root / "onnx-fp32", cudart))
    tb.build(tiny_model_dir, "fp32", max_batch=4, max_prompt=64, engines_root=root)
    engine_dir, manifest = tb.find_engines(tiny_model_dir, "fp32", root)
    ours = TensorRTBackend(engine_dir, manifest, config, cudart)
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
    monkeypatch.setitem(sys.modules, "tensorrt", _simulated_tensorrt(root / "onnx-fp16", cudart))
    tb.build(tiny_model_dir, "fp16", max_batch=2, max_prompt=32, engines_root=root)
    ours = TensorRTBackend(*tb.find_engines(tiny_model_dir, "fp16", root), config, cudart)
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


def test_decode_steps_replay_as_cuda_graphs_on_a_simulated_device(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Direct steps whose batch fills its bucket: one eager run per pool parity, then a capture,
    then replays, each on the step's own inputs; the same hidden states as without graphs."""
    from facert.runtime.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setattr(tb, "gpu_identity", lambda: ("Simulated GPU", (8, 7)))
    config = load_config(tiny_model_dir)
    root = tmp_path / "engines"
    cudart = _FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", _simulated_tensorrt(root / "onnx-fp32", cudart))
    tb.build(tiny_model_dir, "fp32", max_batch=4, max_prompt=32, engines_root=root)
    found = tb.find_engines(tiny_model_dir, "fp32", root)
    graphed, eager = (TensorRTBackend(*found, config, cudart, graphs=g) for g in (True, False))
    capacity = min(config.lm.seq_length, config.lm.max_positions)
    ids = [np.array([101, 2000, 2001, 102]), np.array([101, 2002, 102])]
    segs = [np.ones(len(x), np.int64) for x in ids]
    lo = config.lm.text_vocab_size
    results = []
    for backend in (graphed, eager):
        backend.allocate(4, capacity)
        slots = np.array([0, 1])  # a direct step of 2 rows fills the bucket of 2
        hidden = [backend.prefill(slots, ids, segs)]
        positions = np.array([len(x) for x in ids])
        for step in range(6):
            tokens = backend.head(hidden[-1], (lo, config.lm.vocab_size)).argmax(1) + lo
            hidden.append(backend.decode(slots, tokens, positions + step))
        three = (np.array([0, 1, 2]), np.append(tokens, lo), np.append(positions + 6, 0))
        hidden.append(backend.decode(*three))  # direct but 3 rows of a bucket of 4: eager
        results.append(np.concatenate(hidden))
    assert sorted(graphed.decode_graphs) == [(1, 0), (1, 1)]  # bucket 2, both parities
    assert cudart.launches == 4 and not eager.decode_graphs
    np.testing.assert_array_equal(results[0], results[1])


class _FakeDriver:
    """cuModuleLoadData / cuModuleGetFunction / cuLaunchKernel over _FakeCudart's memory: a
    launch of the sampling entry runs facert's CPU sampler on the arguments, read by the names
    of the manifest's signature (so the backend must pass them in that order)."""

    def __init__(self, cudart: _FakeCudart):
        self.cudart, self.launches = cudart, 0

    def cuModuleLoadData(self, image):
        assert image.endswith(b"\0") and b".entry _sample_kernel(" in image
        return 0, "module"

    def cuModuleGetFunction(self, module, name):
        return 0, name.decode()

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        from facert.export.tensorrt_plugins import load_manifest, select_ptx
        from facert.kernels.sampling import sample

        entry = select_ptx("sampling", (8, 7), load_manifest())
        assert function == entry["entry"] and type(stream) is int
        assert [bx, by, bz] == entry["block"] and shared == entry["shared_bytes"]
        values, types = params
        names = list(entry["signature"])
        assert len(values) == len(types) == len(names) + entry["scratch_params"]
        for kind, name in zip(types, names):
            assert kind is (ctypes.c_int if entry["signature"][name] == "i32" else ctypes.c_void_p)
        a = dict(zip(names, values))
        rows, vocab, read = gx, a["vocab"], self.cudart.read
        assert a["stride_row"] == vocab and (gy, gz) == (1, 1)
        tokens = sample(
            read(a["logits"], (rows, vocab), np.float32),
            *(read(a[n], (rows,), t) for n, t in
              (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32),
               ("uniform", np.float32))),
        )  # fmt: skip
        self.cudart.write(a["out"], tokens)
        self.launches += 1
        return (0,)


def test_device_sampler_on_a_simulated_device(tiny_model_dir, tmp_path, monkeypatch):
    """`sample` = the head engine, then the sampling PTX on its logits: the CPU sampler's ids
    on the head's logits, in chunks of max_batch rows."""
    from facert.kernels.sampling import sample as host_sample
    from facert.runtime.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setattr(tb, "gpu_identity", lambda: ("Simulated GPU", (8, 7)))
    config = load_config(tiny_model_dir)
    root = tmp_path / "engines"
    cudart = _FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", _simulated_tensorrt(root / "onnx-fp32", cudart))
    tb.build(tiny_model_dir, "fp32", max_batch=4, max_prompt=32, engines_root=root)
    driver = _FakeDriver(cudart)
    ours = TensorRTBackend(*tb.find_engines(tiny_model_dir, "fp32", root), config, cudart,
                           driver=driver)  # fmt: skip
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((6, config.lm.n_embd)).astype(np.float32)
    params = (
        np.array([0.0, 1.0, 0.7, 1.3, 1.0, 2.0], np.float32),  # temperature (0: greedy)
        np.array([0, 5, 70, 0, 1, 10**6]),  # top_k (0 and >= V: off)
        np.array([0.0, 0.9, 0.5, 1.0, 0.3, 0.95], np.float32),  # top_p
        rng.random(6).astype(np.float32),  # uniforms
    )
    lm = config.lm
    for window in ((0, lm.text_vocab_size), (lm.text_vocab_size, lm.vocab_size)):
        want = host_sample(ours.head(hidden, window), *params)
        np.testing.assert_array_equal(ours.sample(hidden, window, *params), want)
    assert driver.launches == 4  # 6 rows in chunks of 4, two windows


def test_doctor_checks_the_tensorrt_backend_on_a_simulated_device(
    tiny_model_dir, tmp_path, monkeypatch
):
    """`facert doctor`'s TensorRT checks (engines found, parity with the CPU reference, seeded
    draws, step timings, one face) through FaceModel(backend="tensorrt") on the simulated
    device: on a GPU the same function runs the real engines."""
    from facert.bench import doctor
    from facert.runtime.backends import tensorrt_backend

    monkeypatch.setattr(tb, "gpu_identity", lambda: ("Simulated GPU", (8, 7)))
    root = tmp_path / "engines"
    cudart = _FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", _simulated_tensorrt(root / "onnx-fp32", cudart))
    monkeypatch.setattr(tensorrt_backend, "_cudart", lambda: cudart)
    tb.build(tiny_model_dir, "fp32", engines_root=root)
    assert doctor.tensorrt_precisions(tiny_model_dir, root) == ["fp32"]  # found, none built
    (check,) = doctor.run_device(tiny_model_dir, "tensorrt", ["fp32"], engines_root=root)
    assert (check.backend, check.lm_path) == ("tensorrt", "TensorRT engines"), check
    assert check.greedy_equal and check.samples_equal == 1.0 and check.rel_error < 1e-4, check
    assert sorted(check.step_ms) == [1, 16] and check.face_s > 0 and check.face_codes > 0
    assert check.passed and "| tensorrt | fp32 |" in doctor.device_table([check])
