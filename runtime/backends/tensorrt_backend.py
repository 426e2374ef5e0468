"""The TensorRT backend: the engines `facert build` made for this GPU, run through cuda-python.

NOT YET RUN ON HARDWARE. Written against TensorRT 10's documented Python API (Runtime,
deserialize_cuda_engine, execution contexts with set_input_shape / set_tensor_address /
execute_async_v3, set_optimization_profile_async) and cuda-python's runtime bindings. What is
checked without a GPU: the graphs it runs (tests/test_tensorrt_graphs.py, ONNX Runtime against
the torch model), this file's own logic on a simulated device, where memory is a numpy array
and each engine runs its graph with ONNX Runtime (tests/test_tensorrt_build.py), and every
TensorRT call against tensorrt-stubs with mypy (tests/test_tensorrt_typecheck.py; cuda-python's
bindings are compiled and carry no type information). TensorRT's and CUDA's behaviour under
these calls is not.

Memory, allocated once in `allocate`, on one stream:
- the KV cache, per layer and for keys and values, twice: lm_decode reads past_* and writes
  whole present_* buffers (tensorrt_graphs.py), and TensorRT does not promise that an output
  may alias an input. So each slot's cache lives in one of two pools (`parity`); a decode whose
  rows are consecutive slots with the same parity binds the pools directly (read one, write the
  other, flip those slots), any other batch is staged: each row's cache is copied into a batch
  buffer and back (device to device);
- batch buffers for every other engine input and output, sized for the largest profile.
Only ids, the final hidden states and the logits cross to the host (the Backend protocol's
sampler runs on the host). `sample` keeps the logits on the device: the head engine, then the
shipped sampling PTX (kernels/triton/ptx) launched through the CUDA driver API, so only the
(N,) ids come back; the engine does not call it yet (as the cuda backend's `sample`). On the
simulated device the launch runs facert's CPU sampler on the bound memory, which checks the
plumbing (buffers, argument order), not the PTX.

CUDA graphs: lm_decode has one execution context per optimization profile (TensorRT gives a
profile to one context at a time), all on one scratch allocation (they never run at once, being
on one stream). A direct decode of slots 0..B-1 whose B fills its profile's batch bucket binds
the same addresses every time for each pool parity, so after one eager run of such a step (which
TensorRT asks for before a capture) the next one is captured as a CUDA graph and every later
one replays it: one launch instead of one per layer's kernels. Other batches run eagerly.
Assumed, not verified on hardware: that a graph captured from a context stays valid while the
same context runs other shapes of its profile eagerly in between (every device-side step of
execute_async_v3 is in the graph; only host-side state changes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import ModelConfig
from ..errors import FacertError
from .base import pad_rows

if TYPE_CHECKING:
    import tensorrt

LM_STEPS = ("lm_prefill", "lm_decode", "head_text", "head_image")


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python 12.6 and later
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise FacertError(
                "the tensorrt backend needs cuda-python: pip install cuda-python"
            ) from e
    return cudart


def _driver():
    """cuda-python's driver API (module loading and kernel launches): `sample` only."""
    try:
        from cuda.bindings import driver  # cuda-python 12.6 and later
    except ImportError:
        from cuda import cuda as driver  # older cuda-python
    return driver


def create(
    model_dir: Path, config: ModelConfig, precision: str = "fp16", engines_root: Path | None = None
) -> TensorRTBackend:
    """The backend, or a FacertError naming what this machine lacks (TensorRT, cuda-python,
    engines built for this GPU and the command that builds them)."""
    from facert.export.tensorrt_build import find_engines, require_tensorrt

    require_tensorrt()
    cudart = _cudart()
    engine_dir, manifest = find_engines(model_dir, precision, engines_root)
    return TensorRTBackend(engine_dir, manifest, config, cudart)


class _Cuda:
    """The few cuda-python calls used, each checked."""

    def __init__(self, cudart):
        self.rt = cudart
        self.stream = self.check(cudart.cudaStreamCreate())
        self.handle = int(self.stream)  # what TensorRT takes for the stream
        self.allocations: list[int] = []
        self.graphs: list = []  # cudaGraph_t, cudaGraphExec_t: freed with the rest
        self.executables: list = []

    def check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise FacertError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest or None

    def malloc(self, nbytes: int) -> int:
        ptr = int(self.check(self.rt.cudaMalloc(max(nbytes, 1))))
        self.allocations.append(ptr)
        return ptr

    def to_device(self, dst: int, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, a.ctypes.data, a.nbytes, kind, self.stream))
        self.sync()  # `a` may be freed as soon as this returns

    def to_host(self, src: int, shape: tuple, dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(out.ctypes.data, src, out.nbytes, kind, self.stream))
        self.sync()
        return out

    def copy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, rows: int):
        """Device to device: `rows` rows of `width` bytes."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.check(
            self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, kind, self.stream)
        )

    def sync(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream))

    def capture(self, enqueue: Callable[[], None]):
        """What `enqueue` puts on the stream, as an instantiated CUDA graph (not run)."""
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.check(self.rt.cudaStreamBeginCapture(self.stream, mode))
        try:
            enqueue()
        finally:
            graph = self.check(self.rt.cudaStreamEndCapture(self.stream))
        self.graphs.append(graph)
        executable = self.check(self.rt.cudaGraphInstantiate(graph, 0))
        self.executables.append(executable)
        return executable

    def launch(self, executable) -> None:
        self.check(self.rt.cudaGraphLaunch(executable, self.stream))

    def free(self) -> None:
        for executable in self.executables:
            self.rt.cudaGraphExecDestroy(executable)
        for graph in self.graphs:
            self.rt.cudaGraphDestroy(graph)
        for ptr in self.allocations:
            self.rt.cudaFree(ptr)
        self.allocations.clear()
        self.graphs.clear()
        self.executables.clear()


class TensorRTBackend:
    name = "tensorrt"
    lm_path = "TensorRT engines"

    def __init__(
        self,
        engine_dir: Path,
        manifest: dict,
        config: ModelConfig,
        cudart,
        graphs: bool = True,
        driver=None,
    ):
        """graphs: replay the decode steps that allow it as CUDA graphs (module docstring);
        driver: cuda-python's driver API for `sample` (imported on first use when None)."""
        import tensorrt as trt  # create() asked require_tensorrt first

        self.config, self.manifest = config, manifest
        self.cuda = _Cuda(cudart)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines: dict[str, tensorrt.ICudaEngine] = {}
        self.contexts: dict[str, tensorrt.IExecutionContext] = {}
        self.weight_bytes = 0
        for name in (*LM_STEPS, "vqgan_encoder", "vqgan_decoder"):
            plan = (engine_dir / f"{name}.engine").read_bytes()
            if hashlib.sha256(plan).hexdigest() != manifest["files"][f"{name}.engine"]:
                raise FacertError(
                    f"{engine_dir / name}.engine is damaged: rebuild with {manifest['rebuild']}"
                )
            self.engines[name] = runtime.deserialize_cuda_engine(plan)
            if name != "lm_decode":
                self.contexts[name] = self.engines[name].create_execution_context()
            self.weight_bytes += len(plan)
        decode = self.engines["lm_decode"]
        scratch_bytes = decode.device_memory_size_v2
        scratch = self.cuda.malloc(scratch_bytes)
        self.decode_contexts: list[tensorrt.IExecutionContext] = []
        for index in range(len(manifest["profiles"]["lm_decode"])):
            context = decode.create_execution_context(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED
            )
            context.set_device_memory(scratch, scratch_bytes)
            context.set_optimization_profile_async(index, self.cuda.handle)
            self.decode_contexts.append(context)
        self.graphs = graphs
        self.driver = driver
        self.sampler: tuple | None = None  # (CUfunction, manifest entry), loaded on first use
        self.decode_graphs: dict[tuple[int, int], object] = {}  # (profile, parity) -> graph
        self.warm: set[tuple[int, int]] = set()  # run eagerly once: the next one is captured
        self.cache_dtype = self._dtype("lm_decode", "past_key_0")
        self.max_batch = int(manifest["max_batch"])
        self.max_prompt = int(manifest["max_prompt"])
        self.max_images = int(manifest["max_images"])
        self.buffers: dict[tuple[str, str], int] = {}
        self.pools: list[list[list[int]]] = []  # allocate()

    # ------------------------------------------------------------------ plumbing

    def _dtype(self, graph: str, tensor: str) -> np.dtype:
        import tensorrt as trt

        return np.dtype(trt.nptype(self.engines[graph].get_tensor_dtype(tensor)))

    def _buffer(self, graph: str, tensor: str, shape: tuple) -> int:
        """The batch buffer of one engine tensor, allocated at its largest shape on first use."""
        key = (graph, tensor)
        if key not in self.buffers:
            nbytes = int(np.prod(shape)) * self._dtype(graph, tensor).itemsize
            self.buffers[key] = self.cuda.malloc(nbytes)
        return self.buffers[key]

    def _profile(self, graph: str, shapes: dict[str, tuple]) -> int:
        """Select the profile covering these input shapes and set them; returns its index."""
        from facert.export.tensorrt_build import Profile, pick_profile

        profiles = [
            Profile({n: tuple(tuple(s) for s in v) for n, v in p.items()})
            for p in self.manifest["profiles"][graph]
        ]
        index = pick_profile(profiles, {n: shapes[n] for n in profiles[0].shapes})
        if graph == "lm_decode":
            context = self.decode_contexts[index]  # bound to its profile for good
        else:
            context = self.contexts[graph]
            context.set_optimization_profile_async(index, self.cuda.handle)
        for name, shape in shapes.items():
            if name in profiles[0].shapes:
                context.set_input_shape(name, shape)
        return index

    def _bind(self, context: tensorrt.IExecutionContext, addresses: dict[str, int]) -> None:
        for name, ptr in addresses.items():
            context.set_tensor_address(name, ptr)

    def _run(self, graph: str, addresses: dict[str, int], index: int = 0) -> None:
        context = self.decode_contexts[index] if graph == "lm_decode" else self.contexts[graph]
        self._bind(context, addresses)
        if not context.execute_async_v3(self.cuda.handle):
            raise FacertError(f"TensorRT could not run {graph}")

    def _largest(self, graph: str, tensor: str) -> tuple:
        return tuple(self.manifest["profiles"][graph][-1][tensor][2])

    # ------------------------------------------------------------------ Backend protocol

    def allocate(self, num_slots: int, max_len: int) -> None:
        c = self.config.lm
        capacity = int(self.manifest["capacity"])
        if max_len > capacity:
            raise FacertError(f"these engines hold {capacity} positions, not {max_len}")
        self.slot_bytes = c.n_head * capacity * c.head_dim * self.cache_dtype.itemsize
        self.pools = [
            [
                [self.cuda.malloc(num_slots * self.slot_bytes) for _kv in range(2)]
                for _layer in range(c.n_layer)
            ]
            for _parity in range(2)
        ]  # [parity][layer][key/value] -> (S, H, M, D)
        self.parity = np.zeros(num_slots, np.int8)

    def _slot(self, parity: int, layer: int, kv: int, slot: int) -> int:
        return self.pools[parity][layer][kv] + int(slot) * self.slot_bytes

    def forward_logits(self, ids: np.ndarray, segs: np.ndarray) -> np.ndarray:
        hidden = self._prefill_hidden([ids], [segs])[0]  # (T, C)
        lm = self.config.lm
        text = self.head(hidden, (0, lm.text_vocab_size))
        return np.concatenate([text, self.head(hidden, (lm.text_vocab_size, lm.vocab_size))], 1)

    def _prefill_hidden(self, ids, segs, slots=None) -> np.ndarray:
        """Run lm_prefill; with `slots`, store each row's keys and values in its slot."""
        batch_ids, batch_segs, lengths = pad_rows(ids, segs)
        B, T = batch_ids.shape
        g, lm = "lm_prefill", self.config.lm
        self._profile(g, {"input_ids": (B, T), "segment_ids": (B, T)})
        largest = self._largest(g, "input_ids")
        addresses = {n: self._buffer(g, n, largest) for n in ("input_ids", "segment_ids")}
        self.cuda.to_device(addresses["input_ids"], batch_ids)
        self.cuda.to_device(addresses["segment_ids"], batch_segs)
        addresses["hidden"] = self._buffer(g, "hidden", (*largest, lm.n_embd))
        kv_shape = (largest[0], lm.n_head, largest[1], lm.head_dim)
        for i in range(lm.n_layer):
            for kv in ("key", "value"):
                addresses[f"present_{kv}_{i}"] = self._buffer(g, f"present_{kv}_{i}", kv_shape)
        self._run(g, addresses)
        if slots is not None:  # present (B, H, T, D) -> each slot's (H, M, D) positions 0..T-1
            item = self.cache_dtype.itemsize
            row = T * lm.head_dim * item
            for i in range(lm.n_layer):
                for k, kv in enumerate(("key", "value")):
                    src = addresses[f"present_{kv}_{i}"]
                    for r, slot in enumerate(slots):
                        dst = self._slot(self.parity[slot], i, k, slot)
                        self.cuda.copy_2d(
                            dst,
                            self.slot_bytes // lm.n_head,
                            src + r * lm.n_head * row,
                            row,
                            row,
                            lm.n_head,
                        )
        hidden = self.cuda.to_host(addresses["hidden"], (B, T, lm.n_embd), self._dtype(g, "hidden"))
        return hidden.astype(np.float32)

    def prefill(
        self, slots: np.ndarray, ids: list[np.ndarray], segs: list[np.ndarray]
    ) -> np.ndarray:
        if len(ids) > self.max_batch:  # the engines' profiles stop at max_batch rows
            n = self.max_batch
            return np.concatenate(
                [
                    self.prefill(slots[i : i + n], ids[i : i + n], segs[i : i + n])
                    for i in range(0, len(ids), n)
                ]
            )
        hidden = self._prefill_hidden(ids, segs, slots)  # (B, T, C)
        lengths = np.array([len(x) for x in ids])
        return hidden[np.arange(len(ids)), lengths - 1]

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if len(slots) > self.max_batch:
            n = self.max_batch
            return np.concatenate(
                [
                    self.decode(slots[i : i + n], tokens[i : i + n], positions[i : i + n])
                    for i in range(0, len(slots), n)
                ]
            )
        g, lm = "lm_decode", self.config.lm
        B = len(slots)
        capacity = int(self.manifest["capacity"])
        cache_shape = (B, lm.n_head, capacity, lm.head_dim)
        shapes: dict[str, tuple[int, ...]] = {"input_ids": (B, 1), "position_ids": (B, 1)}
        shapes.update(
            {f"past_{kv}_{i}": cache_shape for i in range(lm.n_layer) for kv in ("key", "value")}
        )
        index = self._profile(g, shapes)
        largest = self._largest(g, "input_ids")
        addresses = {n: self._buffer(g, n, largest) for n in ("input_ids", "position_ids")}
        self.cuda.to_device(addresses["input_ids"], np.asarray(tokens, np.int64)[:, None])
        self.cuda.to_device(addresses["position_ids"], np.asarray(positions, np.int64)[:, None])
        addresses["hidden"] = self._buffer(g, "hidden", (largest[0], 1, lm.n_embd))
        s0, parity = int(slots[0]), int(self.parity[slots[0]])
        direct = (
            np.array_equal(slots, np.arange(s0, s0 + B)) and (self.parity[slots] == parity).all()
        )
        full = (largest[0], lm.n_head, capacity, lm.head_dim)
        for i in range(lm.n_layer):
            for k, kv in enumerate(("key", "value")):
                if direct:
                    past, present = self._slot(parity, i, k, s0), self._slot(1 - parity, i, k, s0)
                else:
                    past = self._buffer(g, f"past_{kv}_{i}", full)
                    present = self._buffer(g, f"present_{kv}_{i}", full)
                    for r, slot in enumerate(slots):
                        self._copy_slot_bytes(
                            past + r * self.slot_bytes, self._slot(self.parity[slot], i, k, slot)
                        )
                addresses[f"past_{kv}_{i}"], addresses[f"present_{kv}_{i}"] = past, present
        bucket = self.manifest["profiles"][g][index]["input_ids"][2][0]
        if self.graphs and direct and s0 == 0 and B == bucket:  # the same addresses every time
            self._decode_graph(index, parity, addresses)
        else:
            self._run(g, addresses, index)
        if direct:
            self.parity[slots] = 1 - parity
        else:
            for i in range(lm.n_layer):
                for k, kv in enumerate(("key", "value")):
                    for r, slot in enumerate(slots):
                        self._copy_slot_bytes(
                            self._slot(self.parity[slot], i, k, slot),
                            addresses[f"present_{kv}_{i}"] + r * self.slot_bytes,
                        )
        hidden = self.cuda.to_host(addresses["hidden"], (B, 1, lm.n_embd), self._dtype(g, "hidden"))
        return hidden[:, 0].astype(np.float32)

    def _decode_graph(self, index: int, parity: int, addresses: dict[str, int]) -> None:
        key = (index, parity)
        if key not in self.decode_graphs and key not in self.warm:
            self._run("lm_decode", addresses, index)  # TensorRT's setup before a capture
            self.warm.add(key)
            return
        if key not in self.decode_graphs:
            context = self.decode_contexts[index]
            self._bind(context, addresses)

            def enqueue() -> None:
                if not context.execute_async_v3(self.cuda.handle):
                    raise FacertError("TensorRT could not capture lm_decode")

            self.decode_graphs[key] = self.cuda.capture(enqueue)
        self.cuda.launch(self.decode_graphs[key])

    def _copy_slot_bytes(self, dst: int, src: int) -> None:
        self.cuda.copy_2d(dst, self.slot_bytes, src, self.slot_bytes, self.slot_bytes, 1)

    def head(self, hidden: np.ndarray, window: tuple[int, int]) -> np.ndarray:
        g = self._head_graph(window)
        out = []
        width = window[1] - window[0]
        for start in range(0, len(hidden), self.max_batch):  # heads are built for max_batch rows
            rows = np.asarray(hidden[start : start + self.max_batch])
            y = self._logits(g, rows, width)
            out.append(self.cuda.to_host(y, (len(rows), width), self._dtype(g, "logits")))
        return np.concatenate(out).astype(np.float32)

    def _head_graph(self, window: tuple[int, int]) -> str:
        lm = self.config.lm
        if window == (0, lm.text_vocab_size):
            return "head_text"
        if window == (lm.text_vocab_size, lm.vocab_size):
            return "head_image"
        raise FacertError(f"the TensorRT engines hold the text and image heads, not {window}")

    def _logits(self, g: str, rows: np.ndarray, width: int) -> int:
        """Run a head engine on at most max_batch rows: the device address of their logits."""
        self._profile(g, {"hidden": rows.shape})
        largest = self._largest(g, "hidden")
        x = self._buffer(g, "hidden", largest)
        self.cuda.to_device(x, rows.astype(self._dtype(g, "hidden")))
        y = self._buffer(g, "logits", (largest[0], width))
        self._run(g, {"hidden": x, "logits": y})
        return y

    def sample(
        self,
        hidden: np.ndarray,
        window: tuple[int, int],
        temperature: np.ndarray,
        top_k: np.ndarray,
        top_p: np.ndarray,
        uniforms: np.ndarray,
    ) -> np.ndarray:
        """Head and sampling on the device: (N, C) hidden -> (N,) window-relative ids, the
        semantics of facert.kernels.sampling for the same uniforms (module docstring)."""
        import ctypes

        g, width = self._head_graph(window), window[1] - window[0]
        function, entry = self.sampler or self._load_sampler()
        n, scratch = self.max_batch, entry["scratch_params"]  # Triton's unused scratch pointers
        scalar = {"i32": ctypes.c_int, "fp32": ctypes.c_float}  # the rest are pointers
        types = [scalar.get(t, ctypes.c_void_p) for t in entry["signature"].values()]
        types += [ctypes.c_void_p] * scratch
        params = {  # per-row parameters as the kernel's signature types them
            "temperature": (np.float32, temperature),
            "top_k": (np.int32, np.clip(top_k, 0, width)),
            "top_p": (np.float32, top_p),
            "uniform": (np.float32, uniforms),
        }
        rows_at = {name: self._rows_buffer(name, dtype) for name, (dtype, _) in params.items()}
        out = self._rows_buffer("out", np.int64)
        tokens = []
        for start in range(0, len(hidden), n):
            rows = np.asarray(hidden[start : start + n])
            values = {"logits": self._logits(g, rows, width), "out": out}
            for name, (dtype, value) in params.items():
                self.cuda.to_device(rows_at[name], np.asarray(value[start : start + n], dtype))
                values[name] = rows_at[name]
            values.update(stride_row=width, vocab=width)
            args = [values[name] for name in entry["signature"]] + [0] * scratch
            self.cuda.check(
                self.driver.cuLaunchKernel(
                    function, len(rows), 1, 1, *entry["block"], entry["shared_bytes"],
                    self.cuda.handle, (tuple(args), tuple(types)), 0,
                )
            )  # fmt: skip
            tokens.append(self.cuda.to_host(out, (len(rows),), np.int64))
        return np.concatenate(tokens)

    def _rows_buffer(self, name: str, dtype) -> int:
        """A device buffer of max_batch values for one of the sampler's per-row arguments."""
        key = ("sampler", name)
        if key not in self.buffers:
            self.buffers[key] = self.cuda.malloc(self.max_batch * np.dtype(dtype).itemsize)
        return self.buffers[key]

    def _load_sampler(self) -> tuple:
        from facert.export.tensorrt_plugins import load_manifest, read_ptx, select_ptx

        self.driver = self.driver or _driver()
        capability = tuple(self.manifest["target"]["compute_capability"])
        entry = select_ptx("sampling", (capability[0], capability[1]), load_manifest())
        module = self.cuda.check(self.driver.cuModuleLoadData(read_ptx(entry).encode() + b"\0"))
        function = self.cuda.check(self.driver.cuModuleGetFunction(module, entry["entry"].encode()))
        self.sampler = (function, entry)
        return self.sampler

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        lm = self.config.lm
        row = self.slot_bytes // lm.n_head  # one head's (M, D) positions
        width = length * lm.head_dim * self.cache_dtype.itemsize
        for i in range(lm.n_layer):
            for k in range(2):
                self.cuda.copy_2d(
                    self._slot(self.parity[dst], i, k, dst),
                    row,
                    self._slot(self.parity[src], i, k, src),
                    row,
                    width,
                    lm.n_head,
                )

    def _images(self, graph: str, x: np.ndarray, inp: str, out: str, out_shape: tuple):
        results = []
        for start in range(0, len(x), self.max_images):
            part = x[start : start + self.max_images]
            self._profile(graph, {inp: part.shape})
            largest = self._largest(graph, inp)
            a = self._buffer(graph, inp, largest)
            self.cuda.to_device(a, part.astype(self._dtype(graph, inp)))
            b = self._buffer(graph, out, (largest[0], *out_shape))
            self._run(graph, {inp: a, out: b})
            results.append(self.cuda.to_host(b, (len(part), *out_shape), self._dtype(graph, out)))
        return np.concatenate(results)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        vq = self.config.vqgan
        codes = self._images("vqgan_encoder", images, "images", "codes", (vq.num_codes_per_image,))
        return codes.astype(np.int64)

    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        vq = self.config.vqgan
        shape = (vq.out_ch, vq.resolution, vq.resolution)
        return self._images(
            "vqgan_decoder", codes.astype(np.int64), "codes", "images", shape
        ).astype(np.float32)

    def close(self) -> None:
        self.cuda.free()
