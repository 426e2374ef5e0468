"""Convert released checkpoints into a facert model directory.

TencentPretrain `talk2face.bin` + its config json + the BERT vocab, and the taming `last.ckpt`
+ its yaml, become `facert.json`, `lm.safetensors`, `vqgan.safetensors` and `vocab.txt`.
Weights are loaded strictly: every expected tensor must be present with the right shape, and
anything unexpected is reported, never silently dropped.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from facert.runtime.config import (
    CONFIG_FILE,
    LM_FILE,
    VOCAB_FILE,
    VQGAN_FILE,
    LMConfig,
    ModelConfig,
    VQGANConfig,
)
from facert.runtime.errors import FacertError

from .checkpoint import read_checkpoint
from .lm import Talk2FaceLM
from .vqgan import VQGAN

# Released Talk2Face only documents "gender: " -> male / female; add more with --attributes.
DEFAULT_ATTRIBUTES = {"gender": ["male", "female"]}

# Older TencentPretrain / UER key names (TencentPretrain's own old-to-new conversion table).
OLD_TP_NAMES = {
    "embedding.word_embedding.weight": "embedding.word.embedding.weight",
    "embedding.position_embedding.weight": "embedding.pos.embedding.weight",
    "embedding.segment_embedding.weight": "embedding.seg.embedding.weight",
    "target.output_layer.weight": "target.lm.output_layer.weight",
}

# TencentPretrain name -> facert name; `{i}` is the layer index.
TP_TO_FACERT = {
    "embedding.word.embedding.weight": "wte.weight",
    "embedding.pos.embedding.weight": "wpe.weight",
    "embedding.seg.embedding.weight": "wse.weight",
    "encoder.layer_norm.gamma": "ln_f.weight",
    "encoder.layer_norm.beta": "ln_f.bias",
    "target.lm.output_layer.weight": "lm_head.weight",
}
TP_LAYER_TO_FACERT = {
    "self_attn.linear_layers.0": "attn.q",
    "self_attn.linear_layers.1": "attn.k",
    "self_attn.linear_layers.2": "attn.v",
    "self_attn.final_linear": "attn.proj",
    "feed_forward.linear_1": "mlp.fc",
    "feed_forward.linear_2": "mlp.proj",
    "layer_norm_1": "ln_1",
    "layer_norm_2": "ln_2",
}
_LAYER_KEY = re.compile(r"^encoder\.transformer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")
_PARAM = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


def _facert_lm_name(tp_name: str) -> str | None:
    if tp_name in TP_TO_FACERT:
        return TP_TO_FACERT[tp_name]
    m = _LAYER_KEY.match(tp_name)
    if m and m.group(2) in TP_LAYER_TO_FACERT:
        return f"blocks.{m.group(1)}.{TP_LAYER_TO_FACERT[m.group(2)]}.{_PARAM[m.group(3)]}"
    return None


def _tp_lm_name(facert_name: str) -> str:
    """Inverse of _facert_lm_name, to report a missing tensor under the checkpoint's name."""
    for tp, ours in TP_TO_FACERT.items():
        if ours == facert_name:
            return tp
    layer, rest = facert_name.split(".", 2)[1:]
    module, param = rest.rsplit(".", 1)
    tp_module = next(tp for tp, ours in TP_LAYER_TO_FACERT.items() if ours == module)
    if tp_module.startswith("layer_norm"):
        param = {"weight": "gamma", "bias": "beta"}[param]
    return f"encoder.transformer.{layer}.{tp_module}.{param}"


def check_state_dict(
    found: dict[str, torch.Tensor], model: torch.nn.Module, what: str, name: Callable[[str], str]
) -> None:
    """Strict load check; one error that lists missing, unexpected and mis-shaped tensors,
    each under its checkpoint name (`name` maps ours to theirs)."""
    expected = model.state_dict()
    missing = [name(k) for k in expected if k not in found]
    unexpected = [name(k) for k in found if k not in expected]
    mismatched = [
        f"{name(k)}: checkpoint {tuple(found[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{what} does not match the expected architecture:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape", mismatched),
        ):
            if items:
                shown = items[:20] + (
                    [f"... and {len(items) - 20} more"] if len(items) > 20 else []
                )
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise FacertError("\n".join(lines))


def read_vocab_size(vocab_path: Path) -> int:
    if not vocab_path.is_file():
        raise FacertError(f"vocabulary file not found: {vocab_path}")
    with open(vocab_path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def lm_config_from_tencentpretrain(tp: dict, text_vocab_size: int) -> LMConfig:
    """Map a TencentPretrain model config onto LMConfig; refuse settings facert does not run."""
    required = {
        "hidden_act": "gelu_fast",
        "layernorm_positioning": "pre",
        "mask": "prefix",
        "remove_embedding_layernorm": True,
        "tokenizer": "text_image",
    }
    wrong = {k: tp.get(k) for k, v in required.items() if tp.get(k) != v}
    if wrong:
        raise FacertError(f"unsupported TencentPretrain config values {wrong}; expected {required}")
    if tp["emb_size"] != tp["hidden_size"]:
        raise FacertError("factorised embeddings (emb_size != hidden_size) are not supported")
    image_vocab = tp.get("image_tokenizer", {}).get("image_vocab_size", 1024)
    return LMConfig(
        vocab_size=text_vocab_size + image_vocab,
        text_vocab_size=text_vocab_size,
        n_layer=tp["layers_num"],
        n_head=tp["heads_num"],
        n_embd=tp["hidden_size"],
        n_ffn=tp["feedforward_size"],
        max_positions=tp.get("max_seq_length", 1024),
        seq_length=tp.get("seq_length", 334),
        layernorm_eps=tp.get("layernorm_eps", 1e-6),
    )


def vqgan_config_from_yaml(doc: dict) -> VQGANConfig:
    """Accept a Net2NetTransformer project yaml (VQGAN in first_stage_config) or a VQModel one."""
    params = (doc.get("model") or {}).get("params") or {}
    params = (params.get("first_stage_config") or {}).get("params", params)
    dd = params.get("ddconfig")
    if dd is None:
        raise FacertError(
            "VQGAN yaml has no ddconfig under model.params(.first_stage_config.params)"
        )
    if dd.get("double_z", False):
        raise FacertError("double_z VQGAN encoders are not supported")
    return VQGANConfig(
        ch=dd["ch"],
        ch_mult=tuple(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"],
        attn_resolutions=tuple(dd["attn_resolutions"]),
        z_channels=dd["z_channels"],
        embed_dim=params["embed_dim"],
        n_embed=params["n_embed"],
        resolution=dd["resolution"],
        in_channels=dd["in_channels"],
        out_ch=dd["out_ch"],
    )


def lm_state_from_tencentpretrain(raw: dict, cfg: LMConfig) -> dict[str, torch.Tensor]:
    if not isinstance(raw, dict):
        raise FacertError("the LM checkpoint is not a state dict")
    state, source_names = {}, {}
    for key, tensor in raw.items():
        tp_name = OLD_TP_NAMES.get(key, key)
        name = _facert_lm_name(tp_name) or key
        state[name], source_names[name] = tensor, key
    with torch.device("meta"):
        model = Talk2FaceLM(cfg)
    check_state_dict(
        state, model, "the Talk2Face checkpoint", lambda k: source_names.get(k) or _tp_lm_name(k)
    )
    return {k: v.float().contiguous() for k, v in state.items()}


def vqgan_state_from_checkpoint(raw: dict, cfg: VQGANConfig) -> dict[str, torch.Tensor]:
    """Take `first_stage_model.*` from a Net2NetTransformer checkpoint (or a bare VQModel's
    weights), dropping the GPT (`transformer.*`), conditioning and loss weights."""
    sd = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(sd, dict):
        raise FacertError("the VQGAN checkpoint has no state_dict")
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in sd) else ""
    state = {
        k[len(prefix) :]: v
        for k, v in sd.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith("loss.")
    }
    if not prefix:  # a bare VQModel checkpoint: ignore anything outside the VQGAN's modules
        roots = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
        state = {k: v for k, v in state.items() if k.startswith(roots)}
    with torch.device("meta"):
        model = VQGAN(cfg)
    check_state_dict(state, model, "the VQGAN checkpoint", lambda k: prefix + k)
    return {k: v.float().contiguous() for k, v in state.items()}


def convert(
    lm_checkpoint: Path,
    lm_config: Path,
    vocab: Path,
    vqgan_checkpoint: Path,
    vqgan_config: Path,
    out_dir: Path,
    image_scaling: str = "reference",
    attributes: dict[str, list[str]] | None = None,
    name: str = "talk2face",
) -> ModelConfig:
    """Write a facert model directory; returns its config."""
    try:
        tp = json.loads(Path(lm_config).read_text())
        vq_doc = yaml.safe_load(Path(vqgan_config).read_text())
    except FileNotFoundError as e:
        raise FacertError(f"config file not found: {e.filename}") from e
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise FacertError(f"unreadable config: {e}") from e
    lm_cfg = lm_config_from_tencentpretrain(tp, read_vocab_size(Path(vocab)))
    config = ModelConfig(
        name=name,
        lm=lm_cfg,
        vqgan=vqgan_config_from_yaml(vq_doc),
        image_scaling=image_scaling,
        attributes=dict(attributes or DEFAULT_ATTRIBUTES),
    )
    lm_state = lm_state_from_tencentpretrain(read_checkpoint(lm_checkpoint), config.lm)
    vq_state = vqgan_state_from_checkpoint(read_checkpoint(vqgan_checkpoint), config.vqgan)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(lm_state, str(out_dir / LM_FILE))
    save_file(vq_state, str(out_dir / VQGAN_FILE))
    shutil.copyfile(vocab, out_dir / VOCAB_FILE)
    (out_dir / CONFIG_FILE).write_text(config.to_json())
    return config
