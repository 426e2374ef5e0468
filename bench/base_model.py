"""A model directory with the real Talk2Face shapes (12 x 768, V 31546, 1024 codes, taming FFHQ
VQGAN) and random weights, generated locally so speed can be measured without a download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from facert.runtime.config import (
    CONFIG_FILE,
    LM_FILE,
    VOCAB_FILE,
    VQGAN_FILE,
    LMConfig,
    ModelConfig,
    VQGANConfig,
    load_config,
    write_config,
)


def base_config() -> ModelConfig:
    """The real shapes, with every attribute the bundled model knows (so `bench attributes`
    asks the base shape as many questions as a real kiosk would)."""
    from facert import BUNDLED_MODEL

    attributes = load_config(BUNDLED_MODEL).attributes
    return ModelConfig(name="talk2face-base-random", lm=LMConfig(), vqgan=VQGANConfig(),
                       attributes=attributes)  # fmt: skip


def _vocab(config: ModelConfig) -> list[str]:
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += ["to", "image", "caption", "attributes", ":", "-"]
    for name, values in config.attributes.items():
        words += [w for text in (name, *values) for w in text.replace("-", " ").split()]
    words = list(dict.fromkeys(words))
    return words + [f"w{i}" for i in range(config.lm.text_vocab_size - len(words))]


def _lm_shapes(c: LMConfig) -> dict[str, tuple[int, ...]]:
    shapes = {
        "wte.weight": (c.vocab_size, c.n_embd),
        "wpe.weight": (c.max_positions, c.n_embd),
        "wse.weight": (3, c.n_embd),
        "ln_f.weight": (c.n_embd,),
        "ln_f.bias": (c.n_embd,),
        "lm_head.weight": (c.vocab_size, c.n_embd),
    }
    for i in range(c.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            shapes[p + ln + ".weight"] = shapes[p + ln + ".bias"] = (c.n_embd,)
        for x in ("q", "k", "v", "proj"):
            shapes[p + f"attn.{x}.weight"], shapes[p + f"attn.{x}.bias"] = (
                (c.n_embd, c.n_embd),
                (c.n_embd,),
            )
        shapes[p + "mlp.fc.weight"], shapes[p + "mlp.fc.bias"] = (c.n_ffn, c.n_embd), (c.n_ffn,)
        shapes[p + "mlp.proj.weight"], shapes[p + "mlp.proj.bias"] = (
            (c.n_embd, c.n_ffn),
            (c.n_embd,),
        )
    return shapes


def _random(shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # 1-D weights are norm gains (start near 1), the rest biases
            base = 1.0 if name.endswith("weight") else 0.0
            out[name] = (base + 0.02 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            scale = 0.02 if len(shape) == 2 else 1.0 / np.sqrt(fan_in)
            out[name] = (scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return out


def make_base_model(out_dir: Path, seed: int = 0) -> Path:
    """Write (once) the random base-shape model directory; returns it. A directory made with
    other attributes gets the current ones (and their words) without new weights."""
    out_dir = Path(out_dir)
    config = base_config()
    if (out_dir / CONFIG_FILE).is_file():
        if load_config(out_dir).attributes != config.attributes:
            (out_dir / VOCAB_FILE).write_text("\n".join(_vocab(config)) + "\n")
            write_config(out_dir, config)
        return out_dir
    import torch

    from facert.export.vqgan import VQGAN

    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(_random(_lm_shapes(config.lm), rng), str(out_dir / LM_FILE))
    with torch.device("meta"):
        vq_shapes = {k: tuple(v.shape) for k, v in VQGAN(config.vqgan).state_dict().items()}
    save_file(_random(vq_shapes, rng), str(out_dir / VQGAN_FILE))
    (out_dir / VOCAB_FILE).write_text("\n".join(_vocab(config)) + "\n")
    write_config(out_dir, config)
    return out_dir
