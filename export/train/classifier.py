"""Train the evaluation kit's attribute classifier and export it to ONNX (CPU, about 12 minutes).

`facert bench quality` judges generated faces with it: does a face drawn from a caption show
the caption's attributes? It learns from ground-truth labels of synthetic faces, half of them
as drawn (lightly blurred or noised) and half passed through the bundled VQGAN, so that it reads
decoded faces as well as drawn ones; the evaluation reports its accuracy on both.

    python -m facert.export.train.classifier -o train-out   # needs vqgan.safetensors there
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from facert.export.synthetic import ATTRIBUTES
from facert.export.vqgan import VQGAN
from facert.runtime.images import scale_pixels, to_uint8

from . import vqgan as vq
from .common import Log, learning_rate, resume, save_checkpoint, script_main, set_lr, setup
from .data import EVAL_SEED, faces

SEED = 3  # its own faces: neither the LM's training faces nor the evaluation's
STEPS, BATCH, PEAK_LR, WARMUP = 800, 64, 2e-3, 30
CHECKPOINT, ONNX_FILE = "classifier.ckpt", "attribute_classifier.onnx"
NAMES = list(ATTRIBUTES)
SIZES = [len(v) for v in ATTRIBUTES.values()]


class AttributeClassifier(nn.Module):
    """uint8 [N, R, R, 3] RGB faces -> [N, sum of value counts] logits, attribute by attribute."""

    def __init__(self):
        super().__init__()
        chans = [3, 32, 48, 64, 64]  # about 0.25M parameters (1 MB shipped)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout),
                       nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout),
                       nn.ReLU()]  # fmt: skip
        self.features = nn.Sequential(*layers)
        side = vq.CONFIG.resolution // 16
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 64), nn.ReLU(), nn.Linear(64, sum(SIZES))
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0  # (N, 3, R, R)
        return self.head(self.features(x))


def labels(attributes: list[dict[str, str]]) -> torch.Tensor:
    """(N, attributes) value indices."""
    return torch.tensor([[ATTRIBUTES[n].index(a[n]) for n in NAMES] for a in attributes])


def loss_and_accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    loss, correct = 0.0, 0.0
    for k, part in enumerate(logits.split(SIZES, dim=1)):
        loss = loss + F.cross_entropy(part, y[:, k])
        correct += (part.argmax(1) == y[:, k]).float().mean().item()
    return loss / len(SIZES), correct / len(SIZES)


@torch.no_grad()
def through_vqgan(vqgan: VQGAN, images: np.ndarray) -> np.ndarray:
    """uint8 faces -> the same faces encoded and decoded by the VQGAN (uint8)."""
    x = torch.from_numpy(scale_pixels(images, vq.IMAGE_SCALING))
    return to_uint8(vqgan.decode(vqgan.encode(x)).clamp(-1, 1).numpy())


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Drawn faces, a little softened or noised as a decoder's output may be."""
    out = images.astype(np.float32)
    for i in range(len(out)):
        if rng.random() < 0.5:
            out[i] = cv2.GaussianBlur(out[i], (5, 5), rng.uniform(0.3, 1.2))
    out += rng.normal(0, rng.uniform(0, 6), out.shape)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def batch(vqgan: VQGAN, seed: int, step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, attributes = faces(seed, range(step * n, (step + 1) * n), vq.CONFIG.resolution)
    rng = np.random.default_rng([SEED, step])
    half = n // 2
    images = np.concatenate([augment(images[:half], rng), through_vqgan(vqgan, images[half:])])
    return torch.from_numpy(images), labels(attributes)


def export(model: AttributeClassifier, path: Path) -> None:
    """ONNX with the attribute layout in its metadata, so the evaluation needs nothing else."""
    import onnx

    model.eval()
    size = vq.CONFIG.resolution
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    torch.onnx.export(
        model, (example,), str(path), input_names=["images"], output_names=["logits"],
        dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    proto = onnx.load(str(path))
    store_weights_in_half(proto.graph)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "attributes", json.dumps({n: list(v) for n, v in ATTRIBUTES.items()})
    onnx.save(proto, str(path))


def store_weights_in_half(graph, min_size: int = 1024) -> None:
    """Store the large float32 weights as float16, each cast back to float32 by a Cast node that
    ONNX Runtime folds at load: halves the file, which ships inside the package (30 MB budget)."""
    import onnx
    from onnx import numpy_helper

    casts = []
    for tensor in list(graph.initializer):
        if tensor.data_type != onnx.TensorProto.FLOAT or np.prod(tensor.dims) < min_size:
            continue
        half = numpy_helper.from_array(
            numpy_helper.to_array(tensor).astype(np.float16), tensor.name + "_fp16"
        )
        graph.initializer.remove(tensor)
        graph.initializer.append(half)
        casts.append(
            onnx.helper.make_node("Cast", [half.name], [tensor.name], to=onnx.TensorProto.FLOAT)
        )
    for node in reversed(casts):  # first in the graph: every consumer comes after its cast
        graph.node.insert(0, node)


def train(out_dir: Path, steps: int = STEPS) -> Path:
    """Train (or resume), report held-out accuracy, and write the ONNX classifier in out_dir."""
    setup(2)
    vqgan = VQGAN(vq.CONFIG)
    vqgan.load_state_dict(load_file(str(out_dir / vq.WEIGHTS)))
    vqgan.eval()
    model = AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=1e-4)
    start = resume(out_dir / CHECKPOINT, model=model, optimizer=optimizer)
    log = Log("classifier", steps, every=50)
    model.train()
    for step in range(start, steps):
        lr = learning_rate(step, steps, PEAK_LR, WARMUP)
        set_lr(optimizer, lr)
        x, y = batch(vqgan, SEED, step, BATCH)
        loss, acc = loss_and_accuracy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.add(step, lr, loss=loss.item(), acc=acc)
        if (step + 1) % 200 == 0 or step + 1 == steps:
            save_checkpoint(out_dir / CHECKPOINT, step + 1, model=model, optimizer=optimizer)
    model.eval()
    images, attributes = faces(EVAL_SEED, range(500), vq.CONFIG.resolution)
    with torch.no_grad():
        for kind, x in (("drawn", images), ("through the VQGAN", through_vqgan(vqgan, images))):
            _, acc = loss_and_accuracy(model(torch.from_numpy(x)), labels(attributes))
            print(f"classifier accuracy on 500 held-out faces, {kind}: {acc:.4f}", flush=True)
    path = out_dir / ONNX_FILE
    export(model, path)
    return path


if __name__ == "__main__":
    script_main(__doc__, train, STEPS)
