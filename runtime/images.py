"""Image input and output: anything a user hands us -> the VQGAN's input, and back to pixels.

Every input is either decoded to the picture a viewer would show, or refused with one clear
FacertError: ImageError for data that is not a usable picture (unreadable, corrupt, empty,
wrong array shape or dtype, NaN), LimitExceeded for one over the model's Limits (pixels per
image, images per call), InvalidArgument for a Python object of the wrong type. Like the
reference script, decoding ignores EXIF orientation and ICC profiles (the model was trained on
the stored pixels), drops alpha without compositing and reads the first frame of an animation.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .config import IMAGE_SCALINGS
from .errors import ImageError, InvalidArgument, LimitExceeded
from .limits import Limits, check_int, check_limit

# A path, encoded image data (bytes or a binary file object), a PIL image, or a uint8 array
# [H, W] / [H, W, 1] gray, [H, W, 3] RGB or [H, W, 4] RGBA.
ImageLike = Any

_ENCODED = (bytes, bytearray, memoryview)
_ARRAY_FORMS = "uint8 RGB [H, W, 3], RGBA [H, W, 4] or gray [H, W] / [H, W, 1]"
_RAISE_PIXELS = "raise it with facert.load(..., limits=Limits(max_image_pixels=...))"
MAX_PIXELS = Limits().max_image_pixels
MAX_IMAGES = Limits().max_images
# Raster formats photos and camera frames come in. Anything else is refused unopened: PIL would
# hand an EPS or PDF file to Ghostscript, an interpreter, which an upload must never reach.
READ_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


def image_suffixes() -> tuple[str, ...]:
    """File name suffixes of READ_FORMATS (".png", ".jpg", ...), as PIL registers them."""
    Image.init()
    return tuple(sorted(e for e, f in Image.registered_extensions().items() if f in READ_FORMATS))


def _gray8(pixels: np.ndarray) -> np.ndarray:
    """Integer gray (I;16*, and "I" as PIL reads 16-bit PGM: 0..65535, clipped) -> uint8 by its
    high byte, as PIL reads 16-bit RGB PNGs, so gray and colour 16-bit files agree. Float ("F")
    gray is 0..255, as PIL's own conversions take it."""
    if pixels.dtype.kind == "f":
        if not np.isfinite(pixels).all():
            raise ValueError("its float pixels include NaN or inf")
        return np.round(np.clip(pixels, 0, 255)).astype(np.uint8)
    return (np.clip(pixels, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)


def _rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is dropped without compositing (the reference script's colour
    fix). PIL's own conversion of 16-bit and float gray clips to 255 (a white face), so those
    are scaled here first; every other mode (1, L, P, LA, PA, CMYK, YCbCr, LAB, HSV, RGBa...)
    has a correct PIL conversion to RGBA."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":  # I, I;16, I;16B, I;16L, I;16N, F
        img = Image.fromarray(_gray8(np.asarray(img)), "L")
    elif img.mode == "La":  # premultiplied: PIL converts it to LA only
        img = img.convert("LA")
    img = img.convert("RGBA") if img.mode != "RGBA" else img
    return Image.merge("RGB", img.split()[:3])


def _check_size(width: int, height: int, name: str, max_pixels: int) -> None:
    """Refuse an empty image, or one over max_pixels before a single pixel is decoded."""
    if width * height == 0:
        raise ImageError(f"image {name} is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise LimitExceeded(
            f"image {name} has {width}x{height} = {width * height:,} pixels, over this model's "
            f"limit of {max_pixels:,} ({_RAISE_PIXELS})"
        )


def _pil_rgb(img: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """A PIL image, perhaps opened but not yet decoded -> RGB, within the pixel limit."""
    _check_size(*img.size, name, max_pixels)
    try:
        img.load()
        return _rgb(img)
    except Exception as e:  # PIL's decoders raise OSError, ValueError, SyntaxError... on bad data
        raise ImageError(f"cannot read image {name}: {e}") from e


def _decode(source: Any, max_pixels: int) -> Image.Image:
    """A path, bytes or binary file -> RGB. Image.open reads only the header, so a declared
    size over max_pixels is refused before any pixel is decoded. PIL's own bomb check (a global
    we leave alone) warns or raises first for sizes over Image.MAX_IMAGE_PIXELS: its warning is
    silenced (our limit decides) and its error becomes LimitExceeded."""
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
    elif isinstance(source, _ENCODED):
        name, source = f"<{len(source)} bytes>", io.BytesIO(source)
    else:
        name = str(getattr(source, "name", f"<{type(source).__name__}>"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source, formats=READ_FORMATS)
    except FileNotFoundError as e:
        raise ImageError(f"image not found: {name}") from e
    except Image.DecompressionBombError as e:
        raise LimitExceeded(
            f"image {name} is too large: {e} (this model's limit is {max_pixels:,} pixels; "
            f"{_RAISE_PIXELS})"
        ) from e
    except Exception as e:  # not an image, a directory, unreadable, or a malformed header
        raise ImageError(f"cannot read image {name}: {e}") from e
    with img:
        return _pil_rgb(img, name, max_pixels)


def _array_rgb(pixels: np.ndarray, max_pixels: int) -> Image.Image:
    """A uint8 array -> RGB: gray is repeated, alpha dropped. Other dtypes are refused rather
    than guessed at (is a float 0..1 or 0..255? is a uint16 10- or 16-bit?)."""
    shape = list(pixels.shape)
    if pixels.dtype != np.uint8 or not (
        pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (1, 3, 4))
    ):
        raise ImageError(f"an image array must be {_ARRAY_FORMS}; got {pixels.dtype} {shape}")
    _check_size(pixels.shape[1], pixels.shape[0], f"array {shape}", max_pixels)
    rgb = pixels.reshape(*pixels.shape[:2], -1)[..., :3]  # (H, W, 1 or 3)
    if rgb.shape[2] == 1:
        rgb = rgb.repeat(3, axis=2)
    return Image.fromarray(np.ascontiguousarray(rgb))


def load_rgb(image: ImageLike, size: int | None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One image -> uint8 [size, size, 3] RGB, resized bilinearly as the reference does (size
    None: uint8 [H, W, 3] as it is, e.g. to find the faces in a photo)."""
    max_pixels = check_int(max_pixels, "max_pixels", lo=1)
    if isinstance(image, Image.Image):
        img = _pil_rgb(image, f"<PIL {image.mode} image>", max_pixels)
    elif isinstance(image, np.ndarray):
        img = _array_rgb(image, max_pixels)
    elif isinstance(image, (str, os.PathLike, *_ENCODED)) or hasattr(image, "read"):
        img = _decode(image, max_pixels)
    else:
        raise InvalidArgument(
            f"unsupported image type {type(image).__name__}: give a path, encoded bytes or a "
            f"binary file, a PIL image, or a numpy array ({_ARRAY_FORMS})"
        )
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def scale_pixels(rgb: np.ndarray, scaling: str) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] VQGAN input, x -> 2x - 1 applied as configured."""
    x = rgb.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)  # (N, 3, H, W) in [0, 1]
    for _ in range(IMAGE_SCALINGS[scaling]):
        x = x * np.float32(2.0) - np.float32(1.0)
    return x


def _scaled_batch(x: np.ndarray, size: int, max_images: int) -> np.ndarray:
    """A float32 batch the caller already scaled: checked, not rescaled. NaN or inf would
    encode silently to arbitrary codes, so they are refused."""
    if x.ndim != 4 or x.shape[1:] != (3, size, size):
        raise ImageError(
            f"a float32 image batch must be [N, 3, {size}, {size}] and already scaled; "
            f"got {list(x.shape)}"
        )
    check_limit(len(x), "len(images)", max_images, "max_images")
    finite = np.isfinite(x).all(axis=(1, 2, 3))
    if not finite.all():
        raise ImageError(f"float32 image {int(np.argmin(finite))} has NaN or inf values")
    return np.ascontiguousarray(x)


def model_input(
    images: Any,
    size: int,
    scaling: str,
    *,
    max_pixels: int = MAX_PIXELS,
    max_images: int = MAX_IMAGES,
) -> np.ndarray:
    """Images in any accepted form -> float32 [N, 3, size, size] encoder input.

    Accepts one image or a list of them (see ImageLike), a uint8 batch [N, H, W, 3], or a
    float32 batch [N, 3, size, size] that is already scaled (checked, passed through). At most
    max_images images of at most max_pixels pixels each (LimitExceeded otherwise).
    """
    max_images = check_int(max_images, "max_images", lo=1)
    if isinstance(images, np.ndarray) and images.dtype == np.float32:
        return _scaled_batch(images, size, max_images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        batch = list(images)
    elif isinstance(images, Sequence) and not isinstance(images, (str, *_ENCODED)):
        batch = list(images)
    else:
        batch = [images]
    check_limit(len(batch), "len(images)", max_images, "max_images")
    rgb = np.stack([load_rgb(im, size, max_pixels) for im in batch])  # (N, H, W, 3)
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
