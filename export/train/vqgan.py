"""Train the bundled model's small taming VQGAN on synthetic faces (CPU, about 15 minutes).

64x64 faces -> 8x8 = 64 codes of 512, so the LM's sequences stay short enough to train on two
cores. 64 channels at full resolution, not 32: GroupNorm has 32 groups, and with one channel a
group the decoder's last norm erases each image's mean colour. The architecture is
`facert.export.vqgan.VQGAN` unchanged. Loss: L1 on pixels and on pixel differences (thin strokes
such as wrinkles carry attributes) plus the commitment term; the codebook follows the encoder by
exponential moving averages, and codes unused for a while are moved onto latents of the current
batch so that all of the codebook stays in use.

    python -m facert.export.train.vqgan -o train-out
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facert.export.vqgan import VQGAN
from facert.runtime.config import VQGANConfig
from facert.runtime.images import scale_pixels

from . import common
from .common import Log, learning_rate, resume, save_checkpoint, script_main, set_lr, setup
from .data import TRAIN_SEED, faces

CONFIG = VQGANConfig(
    ch=64, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), z_channels=64,
    embed_dim=32, n_embed=512, resolution=64,
)  # fmt: skip
IMAGE_SCALING = "taming"  # the encoder sees 2x - 1, as the bundled facert.json says
STEPS, BATCH, PEAK_LR, WARMUP = 2500, 8, 1e-3, 50
BETA = 0.25  # commitment weight (taming's)
EMA_DECAY = 0.99
RESET_EVERY = 50  # steps between dead-code resets
CHECKPOINT = "vqgan.ckpt"
WEIGHTS = "vqgan.safetensors"


class EmaCodebook:
    """Codebook statistics for the EMA update (VQ-VAE-2 style) and dead-code resets."""

    def __init__(self, n_embed: int, dim: int):
        self.size = torch.zeros(n_embed)  # (K,) smoothed counts
        self.sums = torch.zeros(n_embed, dim)  # (K, D) smoothed sums of assigned latents
        self.used = torch.zeros(n_embed)  # (K,) assignments since the last reset

    def state_dict(self) -> dict:
        return {"size": self.size, "sums": self.sums, "used": self.used}

    def start(self, weight: torch.Tensor) -> None:
        """Begin the averages at the current codebook, so unused codes keep their place."""
        self.sums, self.size = weight.detach().clone(), torch.ones(len(weight))

    def load_state_dict(self, state: dict) -> None:
        self.size, self.sums, self.used = state["size"], state["sums"], state["used"]

    @torch.no_grad()
    def update(self, weight: torch.Tensor, flat: torch.Tensor, codes: torch.Tensor) -> None:
        """weight (K, D) codebook, flat (N, D) latents, codes (N,) their nearest codes."""
        onehot = F.one_hot(codes, weight.shape[0]).float()  # (N, K)
        self.used += onehot.sum(0)
        self.size.mul_(EMA_DECAY).add_(onehot.sum(0), alpha=1 - EMA_DECAY)
        self.sums.mul_(EMA_DECAY).add_(onehot.t() @ flat, alpha=1 - EMA_DECAY)
        n = self.size.sum()
        size = (self.size + 1e-5) / (n + weight.shape[0] * 1e-5) * n  # Laplace smoothing
        weight.copy_(self.sums / size[:, None])

    @torch.no_grad()
    def reset_dead(self, weight: torch.Tensor, flat: torch.Tensor) -> int:
        """Move codes unused since the last reset onto random latents of this batch."""
        dead = torch.nonzero(self.used == 0).flatten()
        if len(dead):
            pick = flat[torch.randint(len(flat), (len(dead),))]
            weight[dead] = pick
            self.sums[dead] = pick
            self.size[dead] = 1.0
        self.used.zero_()
        return len(dead)


def batch_images(step: int, batch: int) -> torch.Tensor:
    """Fresh faces for every step (no epochs): (B, 3, R, R) scaled for the encoder."""
    images, _ = faces(TRAIN_SEED, range(step * batch, (step + 1) * batch), CONFIG.resolution)
    return torch.from_numpy(scale_pixels(images, IMAGE_SCALING))


def loss_terms(model: VQGAN, x: torch.Tensor, codebook: EmaCodebook) -> tuple[torch.Tensor, dict]:
    # Convolutions in bf16 where native (about 20% faster); the code choice in fp32,
    # exactly as inference makes it.
    with common.fast_products():
        z = model.latents(x).float()  # (B, D, h, w)
    codes = model.quantize.codes(z)  # (B, h*w)
    B, D, h, w = z.shape
    zq = model.quantize.embedding(codes).view(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
    commit = F.mse_loss(z, zq.detach())
    with common.fast_products():
        y = model.decoder(model.post_quant_conv(z + (zq - z).detach())).float()  # straight-through
    l1 = F.l1_loss(y, x)
    edges = F.l1_loss(y.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(y.diff(dim=-2), x.diff(dim=-2))
    loss = l1 + 0.5 * edges + BETA * commit
    if model.training:
        codebook.update(
            model.quantize.embedding.weight,
            z.detach().permute(0, 2, 3, 1).reshape(-1, D),
            codes.flatten(),
        )
    mse = F.mse_loss(y.clamp(-1, 1), x).item()
    psnr = 10 * np.log10(4.0 / max(mse, 1e-10))  # peak-to-peak 2 in [-1, 1]
    return loss, {"loss": loss.item(), "l1": l1.item(), "commit": commit.item(), "psnr": psnr}


def train(out_dir: Path, steps: int = STEPS) -> Path:
    """Train (or resume) and write the weights as `vqgan.safetensors` in out_dir."""
    setup(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = VQGAN(CONFIG)
    codebook = EmaCodebook(CONFIG.n_embed, CONFIG.embed_dim)
    params = [p for n, p in model.named_parameters() if n != "quantize.embedding.weight"]
    optimizer = torch.optim.AdamW(params, lr=PEAK_LR, betas=(0.9, 0.99), weight_decay=0.0)
    start = resume(out_dir / CHECKPOINT, model=model, optimizer=optimizer, codebook=codebook)
    if start == 0:
        with torch.no_grad():  # start the codebook on real latents, not on noise
            z = model.latents(batch_images(0, 64))  # (64, D, h, w)
            flat = z.permute(0, 2, 3, 1).reshape(-1, CONFIG.embed_dim)
            model.quantize.embedding.weight.copy_(flat[torch.randperm(len(flat))[: CONFIG.n_embed]])
        codebook.start(model.quantize.embedding.weight)
    log = Log("vqgan", steps, every=25)
    model.train()
    for step in range(start, steps):
        lr = learning_rate(step, steps, PEAK_LR, WARMUP)
        set_lr(optimizer, lr)
        x = batch_images(step, BATCH)
        loss, metrics = loss_terms(model, x, codebook)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % RESET_EVERY == 0 and step + 1 < steps * 0.9:
            with torch.no_grad():
                flat = model.latents(x).permute(0, 2, 3, 1).reshape(-1, CONFIG.embed_dim)
            dead = codebook.reset_dead(model.quantize.embedding.weight, flat)
            print(f"vqgan step {step + 1}: {dead} unused codes moved", flush=True)
        log.add(step, lr, **metrics)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            save_checkpoint(
                out_dir / CHECKPOINT, step + 1, model=model, optimizer=optimizer, codebook=codebook
            )
    path = out_dir / WEIGHTS
    common.save_weights(model, path)
    return path


if __name__ == "__main__":
    script_main(__doc__, train, STEPS)
