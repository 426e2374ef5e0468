"""The CUDA backend: the exact Talk2Face math (export/lm.py) on one NVIDIA GPU.

Where the bytes are, precision is low; where rounding would change the answer, it is fp32:
- weights (linears, embeddings, LM head) and the static KV cache in fp16, bf16 or fp32: a decode
  step reads every weight once, so their width sets its floor;
- the residual stream, LayerNorms, gelu, attention scores/softmax and the logits in fp32 (a few
  KB per row), so fp16 cannot overflow in gelu's cube and bf16 rounding cannot tie the top logits;
- the VQGAN in fp32 with TF32 off: its quantizer's argmin decides codes on near ties.

The VQGAN runs on a CUDA stream of its own and outside the LM's lock, so a face drawn on the
finisher thread (tens of milliseconds) does not hold up the engine's decode steps: their kernels
interleave with its convolutions. Only a graph capture excludes it (no other work may start on
the device while one records).

The KV cache (layers, slots + 1, heads, capacity, head_dim) lives on the device and is written in
place; the extra slot is scratch for padding. A decode step is captured once per batch-size
bucket (1, 2, 4, ...) as a CUDA graph and replayed, so a step costs one launch instead of a few
hundred; a batch is padded to its bucket with rows that write only the scratch slot.

A small model's step on a big GPU is bound by the kernels it runs, not by its bytes, so the block
runs facert.kernels.triton's fused kernels when they import and work here: decode attention, the
residual add with the next LayerNorm, and GELU (about 11 kernels a layer instead of 35); else
the same math in torch ops (`torch_decode_attention`, `torch_add_layer_norm`, `torch_gelu`).
`self.kernels` says which, and `self.kernels_note` why. Sampling stays on the host like every
backend (`head` returns logits; the engine samples); `sample` is the device-side path for later,
checked by doctor.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from facert.export.lm import MASK_VALUE, Talk2FaceLM, gelu_fast, prefix_mask_bias, tp_layer_norm
from facert.export.vqgan import VQGAN

from ..config import LM_FILE, VQGAN_FILE, ModelConfig, ModelFiles
from ..errors import FacertError
from .base import pad_rows

PRECISIONS = ("fp16", "bf16", "fp32")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KERNEL_CHOICES = ("auto", "triton", "torch")
NO_TRITON = "no Triton on the CPU (its interpreter runs kernels='triton' if TRITON_INTERPRET=1)"

KernelFn = Callable[..., torch.Tensor]


def torch_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """The Triton kernel's contract in torch ops (static shapes, so a CUDA graph can hold it):
    q, k_new, v_new (B, H, D); one layer's caches (S, H, M, D), written in place at
    [slots[b], :, positions[b]]; row b attends to its positions 0..positions[b] -> (B, H, D).
    Scores and softmax in fp32; hidden keys get the reference's additive -10000, whose exp is 0."""
    k_cache[slots, :, positions] = k_new
    v_cache[slots, :, positions] = v_new
    k, v = k_cache[slots].float(), v_cache[slots].float()  # (B, H, M, D)
    scores = torch.matmul(k, q.float()[..., None])[..., 0] / math.sqrt(float(q.shape[-1]))
    j = torch.arange(k.shape[2], device=q.device)
    hidden = (j[None, :] > positions[:, None]).float() * MASK_VALUE  # (B, M)
    probs = torch.softmax(scores + hidden[:, None, :], dim=-1)  # (B, H, M)
    return torch.matmul(probs[:, :, None], v)[:, :, 0].to(q.dtype)  # (B, H, D)


def torch_add_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    delta: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The Triton kernel's contract (facert.kernels.triton.add_layer_norm) in torch ops: x (..., C)
    fp32 += delta in place, then TencentPretrain's LayerNorm of x (unbiased std, eps on the std)
    in out_dtype (default fp32)."""
    if delta is not None:
        x += delta  # fp32 += low precision: promoted, as x + delta.float()
    return tp_layer_norm(x, weight, bias, eps).to(out_dtype or torch.float32)


def torch_gelu(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel's contract (facert.kernels.triton.gelu) in torch ops: gelu_fast in fp32,
    in x's dtype (into `out` when given)."""
    y = gelu_fast(x.float()).to(x.dtype)
    return y if out is None else out.copy_(y)


def _triton_block() -> tuple[tuple[KernelFn, KernelFn, KernelFn] | None, str]:
    """facert.kernels.triton's (decode_attention, add_layer_norm, gelu), or None and why not."""
    try:
        from facert.kernels.triton import add_layer_norm, decode_attention, gelu
    except Exception as e:  # no triton, no module yet, or a broken install: torch ops then
        return None, f"facert.kernels.triton unavailable ({type(e).__name__}: {e})"
    return (decode_attention, add_layer_norm, gelu), "facert.kernels.triton"


def _triton_sampler() -> Callable[..., torch.Tensor] | None:
    try:
        from facert.kernels.triton import sample
    except Exception:  # no triton or no module: the host sampler, same semantics
        return None
    return sample


def buckets_for(num_slots: int) -> list[int]:
    """Batch sizes that get a CUDA graph: powers of two up to the first >= num_slots."""
    sizes = [1]
    while sizes[-1] < num_slots:
        sizes.append(sizes[-1] * 2)
    return sizes


@dataclass
class _Layer:
    """One block's weights: LayerNorm parameters in fp32, linears in the backend's dtype; q, k
    and v stacked into one (3C, C) matrix so a step reads them in one GEMM."""

    ln_1: tuple[torch.Tensor, torch.Tensor]
    qkv: tuple[torch.Tensor, torch.Tensor]
    proj: tuple[torch.Tensor, torch.Tensor]
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc: tuple[torch.Tensor, torch.Tensor]
    fc_out: tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # (3, bucket) int64: tokens, slots, positions
    hidden: torch.Tensor  # (bucket, C) fp32


class CudaBackend:
    name = "cuda"

    def __init__(
        self,
        files: ModelFiles,
        config: ModelConfig,
        precision: str = "fp16",
        device: str = "cuda",
        graphs: bool | None = None,
        kernels: str = "auto",
    ):
        """files: the model directory read with its hash keeping LM_FILE and VQGAN_FILE (read_model,
        as for every backend: each file is read once); device="cpu" runs the same math without
        CUDA graphs or Triton (to test it anywhere); graphs: capture decode steps (default: on
        CUDA); kernels: the block's fused Triton kernels or torch ops: "auto", "triton" or
        "torch"."""
        if precision not in PRECISIONS:
            raise FacertError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"
            )
        if kernels not in KERNEL_CHOICES:
            raise FacertError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}")
        self.config, self.precision = config, precision
        self.device, self.dtype = torch.device(device), DTYPES[precision]
        on_cuda = self.device.type == "cuda"
        self.graphs = on_cuda if graphs is None else graphs and on_cuda
        # Triton runs on CUDA; on the CPU only when asked for under its interpreter (tests)
        interpreter = kernels == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        self._triton_here = on_cuda or interpreter
        self._load(files)
        self.cache_dtype = _numpy_dtype(self.dtype)
        self._mm_fp32_out = _has_mm_out_dtype(self.device, self.dtype)
        self.k_cache = self.v_cache = None
        self.scratch = 0
        self._graphs: dict[int, _Graph] = {}
        self._pool = None
        self._lock = threading.RLock()  # the LM's cache, graphs and buffers: one call at a time
        self._capturing = threading.Lock()  # held by a graph capture, and by VQGAN calls
        self._image_stream = torch.cuda.Stream(self.device) if on_cuda else None
        self._choose_kernels(kernels)

    def _choose_kernels(self, kernels: str) -> None:
        """Triton's kernels for "auto" on CUDA when they import, for "triton" or an error; torch
        ops otherwise. `kernels` and `kernels_note` say which and why, for doctor."""
        self._use_torch_kernels("kernels='torch' asked for")
        if kernels == "torch":
            return
        fns, note = _triton_block() if self._triton_here else (None, NO_TRITON)
        if fns is None and kernels == "triton":
            raise FacertError(f"kernels='triton' is not available: {note}")
        if fns is not None:
            self._attend, self._add_layer_norm, self._gelu = fns
            self.kernels, self.kernels_note = "triton", note
        else:
            self.kernels_note = note

    def _use_torch_kernels(self, why: str) -> None:
        self._attend: KernelFn = torch_decode_attention
        self._add_layer_norm: KernelFn = torch_add_layer_norm
        self._gelu: KernelFn = torch_gelu
        self.kernels, self.kernels_note = "torch", why

    def _load(self, files: ModelFiles) -> None:
        lm = Talk2FaceLM(self.config.lm)  # loads by name and shape: a wrong file fails here
        lm.load_state_dict({k: torch.from_numpy(v) for k, v in files.weights(LM_FILE).items()})
        dev, dt = self.device, self.dtype

        def low(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dev, dt).contiguous()

        def fp32(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dev, torch.float32).contiguous()

        def linear(*mods: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
            return (
                low(torch.cat([m.weight for m in mods])),
                low(torch.cat([m.bias for m in mods])),
            )

        self.layers = [
            _Layer(
                ln_1=(fp32(b.ln_1.weight), fp32(b.ln_1.bias)),
                qkv=linear(b.attn.q, b.attn.k, b.attn.v),
                proj=linear(b.attn.proj),
                ln_2=(fp32(b.ln_2.weight), fp32(b.ln_2.bias)),
                fc=linear(b.mlp.fc),
                fc_out=linear(b.mlp.proj),
            )
            for b in lm.blocks
        ]
        self.wte, self.wpe, self.wse = (low(e.weight) for e in (lm.wte, lm.wpe, lm.wse))
        self.ln_f = (fp32(lm.ln_f.weight), fp32(lm.ln_f.bias))
        self.lm_head = low(lm.lm_head.weight)  # (V, C)
        self.vqgan = VQGAN(self.config.vqgan)
        vq = files.weights(VQGAN_FILE)
        self.vqgan.load_state_dict({k: torch.from_numpy(v) for k, v in vq.items()})
        self.vqgan.to(dev).eval()
        lm_tensors = [
            *self._layer_tensors(),
            self.wte,
            self.wpe,
            self.wse,
            *self.ln_f,
            self.lm_head,
        ]
        vq_tensors = [*self.vqgan.parameters(), *self.vqgan.buffers()]
        self.weight_bytes = sum(t.nbytes for t in lm_tensors + vq_tensors)

    @property
    def lm_path(self) -> str:
        """Where the LM's decode steps run, for reports."""
        return f"{'CUDA graphs' if self.graphs else 'eager'}, {self.kernels} kernels"

    def step_weight_bytes(self, window: tuple[int, int]) -> int:
        """Weight bytes one decode step and its head read (embedding tables read one row): the
        numerator of the step's bandwidth floor."""
        head = (window[1] - window[0]) * self.lm_head.shape[1] * self.lm_head.element_size()
        return sum(t.nbytes for t in (*self._layer_tensors(), *self.ln_f)) + head

    def _layer_tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for pair in vars(layer).values() for t in pair]

    # ---- the transformer, shared by forward_logits, prefill and decode -------------------------

    def _embed(
        self, ids: torch.Tensor, segs: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        return (self.wte[ids].float() + self.wpe[positions].float()) + self.wse[segs].float()

    def _blocks(
        self, x: torch.Tensor, attend: Callable[[int, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Every block over the embedded rows x (..., C) fp32 (updated in place), then ln_f ->
        (..., C) fp32. attend(layer, qkv (..., 3C)) -> the attention output (..., C). Each
        residual add is fused with the LayerNorm after it (the next block's ln_1, or ln_f)."""
        eps = self.config.lm.layernorm_eps

        def add_norm(delta, params, dtype=self.dtype):  # x += delta; LayerNorm(x) in dtype
            return self._add_layer_norm(x, *params, eps, delta=delta, out_dtype=dtype)

        norms = [layer.ln_1 for layer in self.layers[1:]] + [self.ln_f]
        a = add_norm(None, self.layers[0].ln_1)
        for i, (layer, next_norm) in enumerate(zip(self.layers, norms)):
            y = attend(i, F.linear(a, *layer.qkv))
            a = add_norm(F.linear(y, *layer.proj), layer.ln_2)
            mid = self._gelu(F.linear(a, *layer.fc))
            out_dtype = torch.float32 if next_norm is self.ln_f else self.dtype
            a = add_norm(F.linear(mid, *layer.fc_out), next_norm, out_dtype)
        return a

    def _hidden(
        self,
        ids: torch.Tensor,
        segs: torch.Tensor,
        store: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """(B, T) ids and segments from position 0 -> (B, T, C) fp32 states after ln_f; `store`
        gets each layer's keys and values (B, H, T, D) in the cache dtype."""
        B, T = ids.shape
        H, D = self.config.lm.n_head, self.config.lm.head_dim
        positions = torch.arange(T, device=ids.device).expand_as(ids)
        bias = prefix_mask_bias(segs)  # (B, 1, T, T)

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:  # (B, T, 3C) -> (B, T, C)
            q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
            if store is not None:
                store(i, k, v)
            scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) / math.sqrt(float(D))
            probs = torch.softmax(scores + bias, dim=-1)  # (B, H, T, T)
            y = torch.matmul(probs, v.float()).transpose(1, 2).reshape(B, T, H * D)
            return y.to(self.dtype)

        return self._blocks(self._embed(ids, segs, positions), attend)  # (B, T, C)

    def _decode_hidden(
        self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One segment-2 token per row (B,) -> (B, C) fp32; static shapes, so it can be captured."""
        B, H, D = tokens.shape[0], self.config.lm.n_head, self.config.lm.head_dim

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:  # (B, 3C) -> (B, C)
            q, k, v = (t.contiguous() for t in qkv.view(B, 3, H, D).unbind(1))  # each (B, H, D)
            y = self._attend(q, self.k_cache[i], self.v_cache[i], k, v, slots, positions)
            return y.reshape(B, H * D)

        x = self._embed(tokens, torch.full_like(tokens, 2), positions)  # (B, C)
        return self._blocks(x, attend)

    # ---- the Backend interface -----------------------------------------------------------------

    def _ids(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.int64)).to(self.device)

    def allocate(self, num_slots: int, max_len: int) -> None:
        c = self.config.lm
        shape = (c.n_layer, num_slots + 1, c.n_head, max_len, c.head_dim)  # (L, S + 1, H, M, D)
        with self._lock:
            self._graphs.clear()
            self.k_cache = self.v_cache = None  # free the old cache before the new one
            self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.scratch, self.buckets = num_slots, buckets_for(num_slots)

    @torch.inference_mode()
    def forward_logits(self, ids: np.ndarray, segs: np.ndarray) -> np.ndarray:
        with self._lock:
            h = self._hidden(self._ids(ids)[None], self._ids(segs)[None])[0]  # (L, C)
            return self._logits(h, (0, self.lm_head.shape[0])).cpu().numpy()

    @torch.inference_mode()
    def prefill(
        self, slots: np.ndarray, ids: list[np.ndarray], segs: list[np.ndarray]
    ) -> np.ndarray:
        batch_ids, batch_segs, lengths = pad_rows(ids, segs)
        T = batch_ids.shape[1]
        with self._lock:
            slots_t = self._ids(slots)

            def store(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
                self.k_cache[layer, slots_t, :, :T] = k  # (B, H, T, D)
                self.v_cache[layer, slots_t, :, :T] = v

            h = self._hidden(self._ids(batch_ids), self._ids(batch_segs), store)  # (B, T, C)
            last = h[torch.arange(len(ids), device=self.device), self._ids(lengths) - 1]
            return last.cpu().numpy()  # (B, C)

    @torch.inference_mode()
    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        B = len(slots)
        bucket = next(b for b in self.buckets if b >= B)
        rows = np.zeros((3, bucket), dtype=np.int64)  # tokens, slots, positions
        rows[1] = self.scratch  # padding rows write position 0 of the scratch slot only
        rows[0, :B], rows[1, :B], rows[2, :B] = tokens, slots, positions
        with self._lock:
            if not self.graphs:
                return self._decode_hidden(*self._ids(rows))[:B].cpu().numpy()
            g = self._graphs.get(bucket) or self._capture(bucket)
            g.inputs.copy_(torch.from_numpy(rows))
            g.graph.replay()
            return g.hidden[:B].cpu().numpy()  # (B, C)

    def _capture(self, bucket: int) -> _Graph:
        """Warm up on a side stream (cuBLAS workspaces, Triton compiles), then capture, with no
        VQGAN call running; a Triton kernel that fails either way is dropped for the torch ops,
        with the reason kept."""
        with self._capturing:
            try:
                g = self._try_capture(bucket)
            except Exception as e:
                if self.kernels != "triton":
                    raise
                why = f"a Triton kernel failed in a CUDA graph ({type(e).__name__}: {e})"
                self._use_torch_kernels(why)
                self._graphs.clear()
                g = self._try_capture(bucket)
        self._graphs[bucket] = g
        return g

    def _try_capture(self, bucket: int) -> _Graph:
        inputs = torch.zeros((3, bucket), dtype=torch.int64, device=self.device)
        inputs[1] = self.scratch
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_hidden(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self._decode_hidden(*inputs)
        return _Graph(graph, inputs, hidden)

    @torch.inference_mode()
    def head(self, hidden: np.ndarray, window: tuple[int, int]) -> np.ndarray:
        with self._lock:
            return self._head(hidden, window).cpu().numpy()

    def _head(self, hidden: np.ndarray, window: tuple[int, int]) -> torch.Tensor:
        h = torch.as_tensor(np.asarray(hidden, dtype=np.float32)).to(self.device)  # (N, C)
        return self._logits(h, window)

    def _logits(self, h: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        """(N, C) fp32 -> fp32 logits (N, W), even from fp16/bf16 weights: rounding them to bf16
        (8 bits) would tie the top logits and change greedy picks."""
        w = self.lm_head[window[0] : window[1]]  # (W, C)
        if self.dtype == torch.float32:
            return F.linear(h, w)
        if self._mm_fp32_out:  # accumulate in fp32 and keep it, reading the weights once
            return torch.mm(h.to(self.dtype), w.t(), out_dtype=torch.float32)
        return F.linear(h.to(self.dtype).float(), w.float())

    @torch.inference_mode()
    def sample(
        self,
        hidden: np.ndarray,
        window: tuple[int, int],
        temperature: np.ndarray,
        top_k: np.ndarray,
        top_p: np.ndarray,
        uniforms: np.ndarray,
    ) -> np.ndarray:
        """Head and sampling on the device: (N, C) hidden -> (N,) window-relative ids, the same
        ids as facert.kernels.sampling for the same uniforms. Not used by the engine yet (it
        samples the head's logits on the host); it is the path for keeping tokens on the GPU."""
        from facert.kernels.sampling import sample as host_sample

        params = (temperature, top_k, top_p, uniforms)
        with self._lock:
            logits = self._head(hidden, window)  # (N, W)
            sampler = _triton_sampler() if self._triton_here else None
            if sampler is None:
                return host_sample(logits.cpu().numpy(), *params)
            return sampler(logits, *params).cpu().numpy()  # params move to the device there

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        with self._lock:
            self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
            self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray) -> np.ndarray:
        with self._images():
            x = torch.as_tensor(np.asarray(images, dtype=np.float32)).to(self.device)
            return self.vqgan.encode(x).cpu().numpy()

    @torch.inference_mode()
    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        with self._images():
            return self.vqgan.decode(self._ids(codes)).clamp(-1.0, 1.0).cpu().numpy()

    @contextlib.contextmanager
    def _images(self) -> Iterator[None]:
        """A VQGAN call: on the image stream (its results are copied to the host on it, so they
        are complete when it returns), beside the LM's steps, never during a graph capture."""
        stream = self._image_stream
        with self._capturing, _no_tf32():
            with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                yield


def _no_tf32() -> object:
    """cuDNN convolutions in true fp32 (PyTorch lets them use TF32 by default)."""
    return torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled,
        benchmark=torch.backends.cudnn.benchmark,
        deterministic=torch.backends.cudnn.deterministic,
        allow_tf32=False,
    )


def _has_mm_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm can multiply `dtype` matrices into fp32 here (CUDA, recent PyTorch)."""
    if device.type != "cuda" or dtype == torch.float32:
        return False
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype == torch.bfloat16:
        import ml_dtypes  # numpy has no bfloat16; onnx depends on ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({torch.float16: np.float16, torch.float32: np.float32}[dtype])
