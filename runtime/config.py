"""The model directory's description (`facert.json`): one config dataclass, torch-free.

A facert model directory holds `facert.json`, `lm.safetensors`, `vqgan.safetensors` and
`vocab.txt`. Everything a backend or a task needs to know about the model is read from here.
Weights may be stored in float32 or float16 (half the bytes); every backend computes in float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FacertError

FORMAT_VERSION = 1
CONFIG_FILE = "facert.json"
LM_FILE = "lm.safetensors"
VQGAN_FILE = "vqgan.safetensors"
VOCAB_FILE = "vocab.txt"

# Image input scaling fed to the VQGAN encoder, as the number of times x -> 2x - 1 is applied to
# pixels in [0, 1]. "reference" reproduces the released Talk2Face script, which applies it twice
# (the encoder sees 4x - 3); "taming" is the VQGAN's own convention (once).
IMAGE_SCALINGS = {"reference": 2, "taming": 1}
# Views of a face score mode can average, in order (made by images.face_views).
READING_VIEWS = ("face", "mirror", "shifted right", "shifted left")


@dataclass(frozen=True)
class LMConfig:
    """Prefix-LM transformer shape (TencentPretrain names in comments)."""

    vocab_size: int = 31546  # text + image codes
    text_vocab_size: int = 30522  # vocab_bias: image code k is LM id text_vocab_size + k
    n_layer: int = 12  # layers_num
    n_head: int = 12  # heads_num
    n_embd: int = 768  # hidden_size
    n_ffn: int = 3072  # feedforward_size
    max_positions: int = 1024  # rows in the position table (max_seq_length)
    seq_length: int = 334  # total length the reference generates up to
    layernorm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def image_vocab_size(self) -> int:
        return self.vocab_size - self.text_vocab_size


@dataclass(frozen=True)
class VQGANConfig:
    """taming VQModel shape (ddconfig + embed_dim + n_embed)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def num_codes_per_image(self) -> int:
        return self.latent_size**2


def check_views(views: int, what: str = "views") -> int:
    """`views` if it counts 1 to all of READING_VIEWS, else a FacertError naming `what`."""
    if not 1 <= views <= len(READING_VIEWS):
        raise FacertError(f"{what} must be 1 to {len(READING_VIEWS)}, got {views}")
    return views


@dataclass(frozen=True)
class ModelConfig:
    """Everything about a model directory except its weights."""

    name: str = "talk2face"
    lm: LMConfig = field(default_factory=LMConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    image_scaling: str = "reference"
    # Task prompt texts, tokenized into the template after [CLS].
    prompts: dict[str, str] = field(
        default_factory=lambda: {
            "to_image": "to image",
            "to_caption": "to caption",
            "to_attributes": "to attributes",
        }
    )
    # Attribute name -> candidate answers (used by score mode and to validate names).
    attributes: dict[str, list[str]] = field(default_factory=dict)
    cls_id: int = 101
    sep_id: int = 102
    max_text_ids: int = 64  # to_image prompts are cut to this many ids, as the reference does
    # Drawings per face generate_faces makes by default, keeping the one that matches the text
    # best; 1 (plain sampling, as the reference does) unless the model's author measured better.
    image_candidates: int = 1
    # Views of a face score mode reads and averages (log-probabilities summed), in the order of
    # READING_VIEWS: the face, its mirror image, and the face shifted a quarter code cell
    # right and left. 1 (the face alone, as the reference does) unless measured better.
    reading_views: int = 1
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.image_candidates < 1:
            raise FacertError(f"image_candidates must be at least 1, got {self.image_candidates}")
        check_views(self.reading_views, "reading_views")
        if self.image_scaling not in IMAGE_SCALINGS:
            raise FacertError(
                f"image_scaling must be one of {sorted(IMAGE_SCALINGS)}, got {self.image_scaling!r}"
            )
        if self.lm.image_vocab_size != self.vqgan.n_embed:
            raise FacertError(
                f"LM has {self.lm.image_vocab_size} image ids but the VQGAN has "
                f"{self.vqgan.n_embed} codes"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        version = d.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise FacertError(f"unsupported facert.json format_version {version}")
        vq = dict(d.pop("vqgan", {}))
        for k in ("ch_mult", "attn_resolutions"):
            if k in vq:
                vq[k] = tuple(vq[k])
        return cls(lm=LMConfig(**d.pop("lm", {})), vqgan=VQGANConfig(**vq), **d)


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate a model directory's facert.json, with a clear error if it is not one."""
    model_dir = Path(model_dir)
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise FacertError(
            f"{model_dir} is not a facert model directory (no {CONFIG_FILE}); "
            "create one with `facert convert`"
        )
    for name in (LM_FILE, VQGAN_FILE, VOCAB_FILE):
        if not (model_dir / name).is_file():
            raise FacertError(f"model directory {model_dir} is missing {name}")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise FacertError(f"{path} is not a valid facert config: {e}") from e


def model_hash(model_dir: str | Path) -> str:
    """sha256 over the files that define the model, so exported engines can detect staleness."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for name in (CONFIG_FILE, LM_FILE, VQGAN_FILE, VOCAB_FILE):
        h.update(name.encode())
        with open(model_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    """A safetensors file -> float32 arrays by name (float16 files are widened exactly)."""
    from safetensors.numpy import load_file

    try:
        weights = load_file(str(path))
    except (OSError, TypeError, ValueError) as e:  # bfloat16 has no numpy type
        raise FacertError(f"cannot read {path} (float32 or float16 weights expected): {e}") from e
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in weights.items()}
