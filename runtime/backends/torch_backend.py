"""The reference backend: the exact PyTorch model (facert.export) with a static KV cache."""

from __future__ import annotations

import numpy as np
import torch

from facert.export.lm import Talk2FaceLM, decode_mask_bias, prefix_mask_bias
from facert.export.vqgan import VQGAN

from ..config import LM_FILE, VQGAN_FILE, ModelConfig, ModelFiles
from .base import pad_rows


def _tensors(files: ModelFiles, name: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in files.weights(name).items()}


class TorchBackend:
    name = "torch"
    lm_path = "torch"

    def __init__(self, files: ModelFiles, config: ModelConfig, device: str = "cpu"):
        """`files`: the model directory read with its hash, keeping LM_FILE and VQGAN_FILE."""
        self.config, self.device = config, torch.device(device)
        self.lm = Talk2FaceLM(config.lm)
        self.lm.load_state_dict(_tensors(files, LM_FILE))
        self.vqgan = VQGAN(config.vqgan)
        self.vqgan.load_state_dict(_tensors(files, VQGAN_FILE))
        self.lm.to(self.device).eval()
        self.vqgan.to(self.device).eval()
        self.cache_dtype = np.dtype(np.float32)
        self.weight_bytes = sum(t.nbytes for m in (self.lm, self.vqgan)
                                for t in (*m.parameters(), *m.buffers()))  # fmt: skip
        self.k_cache = self.v_cache = None

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)

    def allocate(self, num_slots: int, max_len: int) -> None:
        c = self.config.lm
        shape = (c.n_layer, num_slots, c.n_head, max_len, c.head_dim)  # (L, S, H, T, D)
        self.k_cache = torch.zeros(shape, device=self.device)
        self.v_cache = torch.zeros(shape, device=self.device)

    @torch.inference_mode()
    def forward_logits(self, ids: np.ndarray, segs: np.ndarray) -> np.ndarray:
        logits = self.lm(self._tensor(ids)[None], self._tensor(segs)[None])  # (1, L, V)
        return logits[0].float().cpu().numpy()

    @torch.inference_mode()
    def prefill(
        self,
        slots: np.ndarray,
        ids: list[np.ndarray],
        segs: list[np.ndarray],
    ) -> np.ndarray:
        batch_ids, batch_segs, lengths = pad_rows(ids, segs)
        T = batch_ids.shape[1]
        ids_t, segs_t, slots_t = (
            self._tensor(batch_ids),
            self._tensor(batch_segs),
            self._tensor(slots),
        )
        positions = torch.arange(T, device=self.device).expand_as(ids_t)

        def store(
            layer: int, k: torch.Tensor, v: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            self.k_cache[layer, slots_t, :, :T] = k  # (B, H, T, D)
            self.v_cache[layer, slots_t, :, :T] = v
            return k, v

        h = self.lm.hidden(ids_t, segs_t, positions, prefix_mask_bias(segs_t), store)  # (B, T, C)
        last = h[torch.arange(len(ids)), self._tensor(lengths) - 1]  # (B, C)
        return last.float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        slots_t, pos_t = self._tensor(slots), self._tensor(positions)
        key_len = int(pos_t.max()) + 1

        def append(
            layer: int, k: torch.Tensor, v: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            k_layer, v_layer = self.k_cache[layer], self.v_cache[layer]  # (S, H, T, D)
            k_layer[slots_t, :, pos_t] = k[:, :, 0]  # (B, H, D)
            v_layer[slots_t, :, pos_t] = v[:, :, 0]
            return k_layer[slots_t, :, :key_len], v_layer[slots_t, :, :key_len]  # (B, H, Tk, D)

        ids_t = self._tensor(tokens)[:, None]  # (B, 1)
        segs_t = torch.full_like(ids_t, 2)
        bias = decode_mask_bias(pos_t, key_len)  # (B, 1, 1, Tk)
        h = self.lm.hidden(ids_t, segs_t, pos_t[:, None], bias, append)  # (B, 1, C)
        return h[:, 0].float().cpu().numpy()

    @torch.inference_mode()
    def head(self, hidden: np.ndarray, window: tuple[int, int]) -> np.ndarray:
        h = torch.as_tensor(np.asarray(hidden, dtype=np.float32), device=self.device)  # (N, C)
        return self.lm.logits(h, window).float().cpu().numpy()

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32), device=self.device)
        return self.vqgan.encode(x).cpu().numpy()

    @torch.inference_mode()
    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        return self.vqgan.decode(self._tensor(codes)).clamp(-1.0, 1.0).cpu().numpy()
