"""Image input and output: anything a user hands us -> the VQGAN's input, and back to pixels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import IMAGE_SCALINGS
from .errors import FacertError

ImageLike = Any  # a path, a PIL image, or a uint8 RGB array [H, W, 3]


def _rgb(img: Image.Image) -> Image.Image:
    """The reference script's colour fix: alpha is dropped without compositing."""
    if img.mode != "RGB":
        img = img.convert("RGBA") if img.mode != "RGBA" else img
        img = Image.merge("RGB", img.split()[:3])
    return img


def load_rgb(image: ImageLike, size: int) -> np.ndarray:
    """One image -> uint8 [size, size, 3] RGB, resized bilinearly as the reference does."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                f.load()
                img = _rgb(f)
        except FileNotFoundError as e:
            raise FacertError(f"image not found: {image}") from e
        except (UnidentifiedImageError, OSError) as e:
            raise FacertError(f"cannot read image {image}: {e}") from e
    elif isinstance(image, Image.Image):
        img = _rgb(image)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise FacertError(
                f"an image array must be uint8 RGB [H, W, 3]; got {image.dtype} {list(image.shape)}"
            )
        img = Image.fromarray(image)
    else:
        raise FacertError(
            f"unsupported image type {type(image).__name__}: give a path, PIL image or array"
        )
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def scale_pixels(rgb: np.ndarray, scaling: str) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] VQGAN input, x -> 2x - 1 applied as configured."""
    x = rgb.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)  # (N, 3, H, W) in [0, 1]
    for _ in range(IMAGE_SCALINGS[scaling]):
        x = x * np.float32(2.0) - np.float32(1.0)
    return x


def model_input(images: Any, size: int, scaling: str) -> np.ndarray:
    """Images in any accepted form -> float32 [N, 3, size, size] encoder input.

    Accepts one image or a list of them (paths, PIL images, uint8 [H, W, 3]), a uint8 batch
    [N, H, W, 3], or a float32 batch [N, 3, size, size] that is already scaled (passed through).
    """
    if isinstance(images, np.ndarray) and images.dtype == np.float32:
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise FacertError(
                f"a float32 image batch must be [N, 3, {size}, {size}] and already scaled; "
                f"got {list(images.shape)}"
            )
        return np.ascontiguousarray(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        batch = list(images)
    elif isinstance(images, Sequence) and not isinstance(images, str):
        batch = list(images)
    else:
        batch = [images]
    if not batch:
        raise FacertError("no images given")
    rgb = np.stack([load_rgb(im, size) for im in batch])  # (N, H, W, 3)
    return scale_pixels(rgb, scaling)


def face_views(x: np.ndarray, n: int, shift: int) -> np.ndarray:
    """The first n of config.READING_VIEWS of each face: [N, 3, H, W] -> [N * n, 3, H, W], the
    views of face i at i * n .. i * n + n - 1. Shifts move the face `shift` pixels right or
    left, repeating the edge column."""
    edge_left, edge_right = x[..., :1], x[..., -1:]  # (N, 3, H, 1)
    all_views = [
        x,
        x[..., ::-1],
        np.concatenate([np.repeat(edge_left, shift, -1), x[..., :-shift]], -1),
        np.concatenate([x[..., shift:], np.repeat(edge_right, shift, -1)], -1),
    ]
    return np.ascontiguousarray(np.stack(all_views[:n], 1).reshape(-1, *x.shape[1:]))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3], rounded as torchvision's save_image."""
    x = (np.clip(images, -1.0, 1.0) + 1.0) / 2.0
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
