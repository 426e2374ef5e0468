"""The exact taming VQGAN (VQModel) in PyTorch: encoder, quantizer, decoder.

Module names mirror taming's so a checkpoint's `first_stage_model.*` weights load by name.
GroupNorm(32, eps 1e-6), swish, Downsample pads right/bottom by one before a stride-2 conv,
Upsample is nearest x2 then a 3x3 conv, single-head spatial attention; the quantizer uses the
expanded squared distance and the first minimum on ties, as taming's VectorQuantizer2 does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facert.runtime.config import VQGAN_NORM_EPS, VQGAN_NORM_GROUPS, VQGANConfig


def normalize(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(VQGAN_NORM_GROUPS, ch, eps=VQGAN_NORM_EPS, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = normalize(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = normalize(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = normalize(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(B, C, H * W).permute(0, 2, 1)  # (B, HW, C)
        k = self.k(n).reshape(B, C, H * W)  # (B, C, HW)
        w = torch.bmm(q, k) * (int(C) ** (-0.5))  # (B, HW_query, HW_key)
        w = torch.softmax(w, dim=2)
        v = self.v(n).reshape(B, C, H * W)  # (B, C, HW)
        h = torch.bmm(v, w.permute(0, 2, 1)).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, attention after each block if enabled; the encoder
    adds `downsample` and the decoder `upsample` (taming's key names)."""

    def __init__(self, chans: list[tuple[int, int]], attn: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin, cout) for cin, cout in chans)
        self.attn = nn.ModuleList(AttnBlock(cout) for _, cout in chans) if attn else nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        in_mult = (1, *cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res = cfg.resolution
        for i in range(n_levels):
            cin, cout = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            chans = [(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks)]
            level = Level(chans, res in cfg.attn_resolutions)
            if i != n_levels - 1:
                level.downsample = Downsample(cout)
                res //= 2
            self.down.append(level)
        top = cfg.ch * cfg.ch_mult[-1]
        self.mid = Mid(top)
        self.norm_out = normalize(top)
        self.conv_out = nn.Conv2d(top, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if (downsample := getattr(level, "downsample", None)) is not None:
                h = downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.latent_size
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in)
        levels: list[Level] = []
        for i in reversed(range(n_levels)):
            cout = cfg.ch * cfg.ch_mult[i]
            chans = [(block_in if j == 0 else cout, cout) for j in range(cfg.num_res_blocks + 1)]
            level = Level(chans, res in cfg.attn_resolutions)
            if i != 0:
                level.upsample = Upsample(cout)
                res *= 2
            levels.insert(0, level)
            block_in = cout
        self.up = nn.ModuleList(levels)  # indexed by level, run from the top level down
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if (upsample := getattr(level, "upsample", None)) is not None:
                h = upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class Quantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, h*w) nearest code ids, row-major over (h, w)."""
        B, C, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B*h*w, C)
        e = self.embedding.weight  # (K, C)
        d = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(e**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat, e.t())
        )  # (B*h*w, K)
        return torch.argmin(d, dim=1).view(B, H * W)


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) scaled images -> (B, embed_dim, h, w) pre-quantization latents."""
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) scaled images -> (B, h*w) int64 codes."""
        return self.quantize.codes(self.latents(images))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h*w) codes -> (B, 3, H, W) decoder output (unclamped; callers clamp to [-1, 1])."""
        B, n = codes.shape
        side = self.cfg.latent_size
        z = self.quantize.embedding(codes)  # (B, h*w, C)
        z = z.view(B, side, side, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)
        return self.decoder(self.post_quant_conv(z))
