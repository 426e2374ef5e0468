"""Convert released checkpoints into a facert model directory.

TencentPretrain `talk2face.bin` + its config json + the BERT vocab, and the taming `last.ckpt`
+ its yaml, become `facert.json`, `lm.safetensors`, `vqgan.safetensors` and `vocab.txt`.
Weights are loaded strictly: every expected tensor must be present with the right shape and a
finite floating-point value, and anything unexpected is reported, never silently dropped.
Every input is checked before anything is written (a bad one is a ModelFileError, a bad argument
an InvalidArgument), and the model directory appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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
    ReadingCalibration,
    VQGANConfig,
    write_config,
)
from facert.runtime.errors import InvalidArgument, ModelFileError
from facert.runtime.files import directory_lock, staged
from facert.runtime.images import model_input
from facert.runtime.reading_quality import calibrate, check_calibration_faces, vqgan_psnr

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
        raise ModelFileError("\n".join(lines))


def _tensors(raw: Any, what: str) -> dict[str, torch.Tensor]:
    """`raw` if it maps names to tensors; a checkpoint can hold any picklable value."""
    if not isinstance(raw, dict):
        raise ModelFileError(f"{what} is not a state dict but a {type(raw).__name__}")
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ModelFileError(f"{what} has a key that is not a name: {key!r:.80}")
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(f"{what}: {key} is {value!r:.80}, not a tensor")
    return raw


def _float32_weights(
    state: dict[str, torch.Tensor], what: str, name: Callable[[str], str]
) -> dict[str, torch.Tensor]:
    """Own float32 copies of `state`, refusing integer tensors and NaN / infinite values, which
    would otherwise surface only as garbage output at inference time. Copies never share memory
    with the checkpoint or each other, as safetensors requires."""
    weights = {}
    for key, value in state.items():
        if not value.is_floating_point():
            raise ModelFileError(f"{what}: {name(key)} holds {value.dtype}, not float weights")
        weights[key] = value.detach().to(
            torch.float32, memory_format=torch.contiguous_format, copy=True
        )
        if not torch.isfinite(weights[key]).all():
            raise ModelFileError(f"{what}: {name(key)} holds NaN or infinite values")
    return weights


def _meta_model(build: Callable[[], torch.nn.Module], what: str) -> torch.nn.Module:
    """Build a network on the meta device (no memory); a config whose shapes cannot make one
    (e.g. channels GroupNorm cannot divide into 32 groups) is the config's error."""
    try:
        with torch.device("meta"):
            return build()
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        raise ModelFileError(f"{what} describes a network that cannot be built: {e}") from e


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        raise ModelFileError(f"{what} is missing")
    if not isinstance(value, dict):
        raise ModelFileError(f"{what} must be a mapping, not a {type(value).__name__}")
    return value


# Bounds far above any real model's, so that a hostile config cannot make building the network
# to check it against (one module per layer or block) take minutes.
MAX_SIZE = 1 << 24
MAX_REPEATS = 256


def _positive_int(
    d: dict, key: str, what: str, default: int | None = None, most: int = MAX_SIZE
) -> int:
    value = d.get(key, default)
    if value is None:
        raise ModelFileError(f"{what} has no {key}")
    if type(value) is not int or not 1 <= value <= most:  # bool is an int, and not a size
        raise ModelFileError(
            f"{what}: {key} must be an integer from 1 to {most}, not {value!r:.80}"
        )
    return value


def _positive_ints(d: dict, key: str, what: str, allow_empty: bool) -> tuple[int, ...]:
    value = d.get(key)
    if (
        not isinstance(value, list)
        or not (value or allow_empty)
        or len(value) > MAX_REPEATS
        or any(type(v) is not int or not 1 <= v <= MAX_SIZE for v in value)
    ):
        raise ModelFileError(
            f"{what}: {key} must be a list of positive integers, not {value!r:.80}"
        )
    return tuple(value)


def _read_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file, split as the tokenizer reads the vocabulary."""
    if not path.is_file():
        raise InvalidArgument(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{what} {path} is not UTF-8 text: {e}") from e


def read_vocab_size(vocab_path: Path) -> int:
    """Lines in the BERT vocabulary; the text ids the LM's vocabulary starts with."""
    size = len(_read_lines(Path(vocab_path), "vocabulary file"))
    if size == 0:
        raise ModelFileError(f"vocabulary file {vocab_path} is empty")
    return size


def check_attributes(attributes: Any) -> dict[str, list[str]]:
    """The attribute vocabulary as {name: [answers]}: score mode prompts with every name and
    ranks every answer, so each must be a non-empty string and each name needs an answer."""

    def text(value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    if not isinstance(attributes, dict) or not attributes:
        raise InvalidArgument(
            f"attributes must be a non-empty JSON object {{name: [values]}}, not {attributes!r:.80}"
        )
    for name, values in attributes.items():
        if not text(name) or not isinstance(values, list) or not values:
            raise InvalidArgument(
                f"attribute {name!r:.40} must name a non-empty list of values, not {values!r:.80}"
            )
        if not all(text(v) for v in values):
            raise InvalidArgument(
                f"attribute {name!r:.40} has a value that is not text: {values!r:.80}"
            )
    return {name: list(values) for name, values in attributes.items()}


def lm_config_from_tencentpretrain(
    tp: Any, text_vocab_size: int, what: str = "the Talk2Face config"
) -> LMConfig:
    """Map a TencentPretrain model config onto LMConfig; refuse settings facert does not run
    and shapes no network has."""
    tp = _mapping(tp, what)
    required = {
        "hidden_act": "gelu_fast",
        "layernorm_positioning": "pre",
        "mask": "prefix",
        "remove_embedding_layernorm": True,
        "tokenizer": "text_image",
    }
    wrong = {k: tp.get(k) for k, v in required.items() if tp.get(k) != v}
    if wrong:
        raise ModelFileError(f"{what}: unsupported values {wrong}; expected {required}")
    hidden, heads = _positive_int(tp, "hidden_size", what), _positive_int(tp, "heads_num", what)
    if _positive_int(tp, "emb_size", what) != hidden:
        raise ModelFileError(
            f"{what}: factorised embeddings (emb_size != hidden_size) are not supported"
        )
    if hidden % heads:
        raise ModelFileError(f"{what}: hidden_size {hidden} is not divisible by heads_num {heads}")
    max_positions = _positive_int(tp, "max_seq_length", what, 1024)
    seq_length = _positive_int(tp, "seq_length", what, 334)
    if seq_length > max_positions:
        raise ModelFileError(
            f"{what}: seq_length {seq_length} exceeds max_seq_length {max_positions}"
        )
    eps = tp.get("layernorm_eps", 1e-6)
    if type(eps) not in (int, float) or not (math.isfinite(eps) and eps > 0):
        raise ModelFileError(f"{what}: layernorm_eps must be a positive number, not {eps!r:.80}")
    image_tokenizer = _mapping(tp.get("image_tokenizer", {}), f"{what}: image_tokenizer")
    cfg = LMConfig(
        vocab_size=text_vocab_size + _positive_int(image_tokenizer, "image_vocab_size", what, 1024),
        text_vocab_size=text_vocab_size,
        n_layer=_positive_int(tp, "layers_num", what, most=MAX_REPEATS),
        n_head=heads,
        n_embd=hidden,
        n_ffn=_positive_int(tp, "feedforward_size", what),
        max_positions=max_positions,
        seq_length=seq_length,
        layernorm_eps=float(eps),
    )
    _meta_model(lambda: Talk2FaceLM(cfg), what)
    return cfg


def vqgan_config_from_yaml(doc: Any, what: str = "the VQGAN yaml") -> VQGANConfig:
    """Accept a Net2NetTransformer project yaml (VQGAN in first_stage_config) or a VQModel one."""
    model = _mapping(_mapping(doc, what).get("model"), f"{what}: model")
    params = _mapping(model.get("params"), f"{what}: model.params")
    if "first_stage_config" in params:
        stage = _mapping(params["first_stage_config"], f"{what}: first_stage_config")
        params = _mapping(stage.get("params"), f"{what}: first_stage_config.params")
    dd_what = f"{what}: ddconfig"
    dd = _mapping(params.get("ddconfig"), dd_what)
    double_z = dd.get("double_z", False)
    if type(double_z) is not bool:
        raise ModelFileError(f"{dd_what}: double_z must be true or false, not {double_z!r:.80}")
    if double_z:
        raise ModelFileError(f"{what}: double_z VQGAN encoders are not supported")
    sizes = ("ch", "z_channels", "resolution", "in_channels", "out_ch")
    cfg = VQGANConfig(
        **{k: _positive_int(dd, k, dd_what) for k in sizes},
        num_res_blocks=_positive_int(dd, "num_res_blocks", dd_what, most=MAX_REPEATS),
        ch_mult=_positive_ints(dd, "ch_mult", dd_what, allow_empty=False),
        attn_resolutions=_positive_ints(dd, "attn_resolutions", dd_what, allow_empty=True),
        embed_dim=_positive_int(params, "embed_dim", what),
        n_embed=_positive_int(params, "n_embed", what),
    )
    if cfg.resolution % 2 ** (len(cfg.ch_mult) - 1):
        raise ModelFileError(
            f"{dd_what}: resolution {cfg.resolution} cannot be halved {len(cfg.ch_mult) - 1} times"
        )
    _meta_model(lambda: VQGAN(cfg), what)
    return cfg


def lm_state_from_tencentpretrain(raw: Any, cfg: LMConfig) -> dict[str, torch.Tensor]:
    what = "the Talk2Face checkpoint"
    state, source_names = {}, {}
    for key, tensor in _tensors(raw, what).items():
        tp_name = OLD_TP_NAMES.get(key, key)
        name = _facert_lm_name(tp_name) or key
        state[name], source_names[name] = tensor, key

    def checkpoint_name(k: str) -> str:
        return source_names.get(k) or _tp_lm_name(k)

    check_state_dict(state, _meta_model(lambda: Talk2FaceLM(cfg), what), what, checkpoint_name)
    return _float32_weights(state, what, checkpoint_name)


def vqgan_state_from_checkpoint(raw: Any, cfg: VQGANConfig) -> dict[str, torch.Tensor]:
    """Take `first_stage_model.*` from a Net2NetTransformer checkpoint (or a bare VQModel's
    weights), dropping the GPT (`transformer.*`), conditioning and loss weights."""
    what = "the VQGAN checkpoint"
    sd = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    sd = _tensors(sd, f"{what}'s state_dict")
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in sd) else ""
    state = {
        k[len(prefix) :]: v
        for k, v in sd.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith("loss.")
    }
    if not prefix:  # a bare VQModel checkpoint: ignore anything outside the VQGAN's modules
        roots = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
        state = {k: v for k, v in state.items() if k.startswith(roots)}
    check_state_dict(state, _meta_model(lambda: VQGAN(cfg), what), what, lambda k: prefix + k)
    return _float32_weights(state, what, lambda k: prefix + k)


@torch.inference_mode()
def reading_calibration(
    faces: Sequence[str | Path], vq_state: dict[str, torch.Tensor], config: ModelConfig
) -> ReadingCalibration:
    """Held-out face image files -> the threshold their reading scores set, measured with the
    exact VQGAN (runtime/reading_quality.py) a batch at a time."""
    vqgan = VQGAN(config.vqgan)
    vqgan.load_state_dict(vq_state)
    vqgan.eval()

    def encode(x: np.ndarray) -> np.ndarray:
        return vqgan.encode(torch.from_numpy(x)).numpy()

    def decode(codes: np.ndarray) -> np.ndarray:
        return vqgan.decode(torch.from_numpy(codes)).numpy()

    size, scaling, batch = config.vqgan.resolution, config.image_scaling, 64
    scores = [
        vqgan_psnr(model_input(list(faces[i : i + batch]), size, scaling), scaling, encode, decode)
        for i in range(0, len(faces), batch)
    ]
    return calibrate(np.concatenate(scores))


# What `convert` writes, plus the engines `facert export` adds: a directory holding facert.json
# and nothing outside these is one a new conversion may replace.
MODEL_DIR_ENTRIES = {CONFIG_FILE, LM_FILE, VQGAN_FILE, VOCAB_FILE, "onnx"}


def check_output(out_dir: Path) -> None:
    """Refuse an output that is not a directory convert may replace: a file, a link, or a
    directory holding anything but a previous model, which replacing would delete."""
    if out_dir.is_symlink():
        raise InvalidArgument(f"output {out_dir} is a symbolic link; give the directory itself")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgument(f"output {out_dir} exists and is not a directory")
    entries = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    if entries and not (CONFIG_FILE in entries and entries <= MODEL_DIR_ENTRIES):
        raise InvalidArgument(
            f"output {out_dir} exists and is not a facert model directory; "
            "choose a new path or remove it"
        )
    parent = next((p for p in out_dir.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InvalidArgument(f"output {out_dir} is inside {parent}, which is not a directory")


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
    calibration_faces: Sequence[str | Path] | None = None,
) -> ModelConfig:
    """Write a facert model directory; returns its config. Every input is checked before
    anything is written. `calibration_faces`: image files of held-out faces like the model's
    training faces, which set the threshold of its readings' in-distribution score; without
    them facert.json records none and readings say neither reliable nor not."""
    out_dir, vocab = Path(out_dir), Path(vocab)
    check_output(out_dir)
    if calibration_faces is not None:
        check_calibration_faces(len(calibration_faces))
    lm_what, vq_what = f"LM config {lm_config}", f"VQGAN config {vqgan_config}"
    try:
        tp = json.loads("".join(_read_lines(Path(lm_config), "LM config")))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(f"{lm_what} is not valid JSON: {e}") from e
    try:
        vq_doc = yaml.safe_load("".join(_read_lines(Path(vqgan_config), "VQGAN config")))
    except (yaml.YAMLError, RecursionError) as e:
        raise ModelFileError(f"{vq_what} is not valid YAML: {' '.join(str(e).split())}") from e
    lm_cfg = lm_config_from_tencentpretrain(tp, read_vocab_size(vocab), lm_what)
    vq_cfg = vqgan_config_from_yaml(vq_doc, vq_what)
    if lm_cfg.image_vocab_size != vq_cfg.n_embed:
        raise ModelFileError(
            f"the LM has {lm_cfg.image_vocab_size} image ids but the VQGAN {vq_cfg.n_embed} codes"
        )
    config = ModelConfig(
        name=name,
        lm=lm_cfg,
        vqgan=vq_cfg,
        image_scaling=image_scaling,
        attributes=dict(DEFAULT_ATTRIBUTES) if attributes is None else check_attributes(attributes),
    )
    lm_state = lm_state_from_tencentpretrain(read_checkpoint(lm_checkpoint), config.lm)
    vq_state = vqgan_state_from_checkpoint(read_checkpoint(vqgan_checkpoint), config.vqgan)
    if calibration_faces is not None:
        calibration = reading_calibration(calibration_faces, vq_state, config)
        config = dataclasses.replace(config, reading_calibration=calibration)

    def write(directory: Path) -> None:
        save_file(lm_state, str(directory / LM_FILE))
        save_file(vq_state, str(directory / VQGAN_FILE))
        shutil.copyfile(vocab, directory / VOCAB_FILE)
        write_config(directory, config)

    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(out_dir), staged(out_dir) as tmp:
        write(tmp)
    return config
