"""Every image input is decoded correctly or refused with one FacertError.

Each format is written here (PIL, OpenCV, or header bytes crafted by hand) and the result is
compared with a reference computed independently in numpy, not with PIL's conversion.
"""

import io
import resource
import struct
import tracemalloc
import warnings
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageFile

from facert.runtime.errors import FacertError, ImageError, InvalidArgument, LimitExceeded
from facert.runtime.images import load_rgb, model_input

S = 16  # output size; the test images are S x S so nothing is resized unless a test wants it
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def rgb_pattern(h: int = S, w: int = S, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **params)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height 8-bit RGB, with one small IDAT."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(tag + data))
        return struct.pack(">I", len(data)) + tag + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def assert_close(got: np.ndarray, want: np.ndarray, atol: int) -> None:
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= atol


# --- 8-bit RGB stays bit-identical to the reference pipeline ---------------------------------


def test_8bit_rgb_path_pil_array_bytes_match_reference(tmp_path):
    arr = rgb_pattern(20, 12)
    want = np.asarray(Image.fromarray(arr).resize((S, S), Image.BILINEAR))
    path = tmp_path / "face.png"
    Image.fromarray(arr).save(path)
    data = path.read_bytes()
    inputs = [path, str(path), Image.fromarray(arr), arr, data, bytearray(data), io.BytesIO(data)]
    for image in inputs:
        np.testing.assert_array_equal(load_rgb(image, S), want)


def test_non_contiguous_arrays_equal_their_copies():
    arr = rgb_pattern(40, 40)
    for view in (arr[::2, ::2], arr[:, ::-1], arr.transpose(1, 0, 2)):
        np.testing.assert_array_equal(load_rgb(view, S), load_rgb(view.copy(), S))


def test_bytes_and_file_objects_in_model_input():
    data = png_bytes(Image.fromarray(rgb_pattern()))
    one = model_input(data, S, "taming")
    assert one.shape == (1, 3, S, S)
    two = model_input([io.BytesIO(data), memoryview(data)], S, "taming")
    np.testing.assert_array_equal(two, np.concatenate([one, one]))


# --- every PIL mode goes through a correct conversion ----------------------------------------


def test_16bit_gray_png_is_scaled_not_white(tmp_path):
    gray = (np.arange(S * S).reshape(S, S) * 257).astype(np.uint16)  # 0 .. 65535 gradient
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    want = np.repeat(np.round(gray / 257).astype(np.uint8)[..., None], 3, 2)
    assert_close(load_rgb(tmp_path / "g16.png", S), want, 1)


def test_16bit_big_endian_and_32bit_gray():
    gray = np.linspace(0, 65535, S * S).astype(np.uint16).reshape(S, S)
    want = np.repeat((gray // 257).astype(np.uint8)[..., None], 3, 2)
    big = Image.frombytes("I;16B", (S, S), gray.astype(">u2").tobytes())
    assert_close(load_rgb(big, S), want, 1)
    buf = io.BytesIO()  # a 16-bit PGM opens as mode "I"
    Image.fromarray(gray.astype(np.int32), "I").save(buf, "PPM")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I"
    assert_close(load_rgb(buf.getvalue(), S), want, 1)


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_png(tmp_path, channels):
    rgb16 = np.random.default_rng(1).integers(0, 65536, (S, S, channels), dtype=np.uint16)
    bgr16 = rgb16[..., [2, 1, 0, 3][:channels]]
    assert cv2.imwrite(str(tmp_path / "c16.png"), bgr16)
    assert_close(load_rgb(tmp_path / "c16.png", S), (rgb16[..., :3] >> 8).astype(np.uint8), 1)


def test_float_image_is_0_to_255_and_nan_refused():
    values = np.linspace(-10, 300, S * S, dtype=np.float32).reshape(S, S)
    want = np.repeat(np.round(np.clip(values, 0, 255)).astype(np.uint8)[..., None], 3, 2)
    assert_close(load_rgb(Image.fromarray(values, "F"), S), want, 1)
    values[3, 4] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        load_rgb(Image.fromarray(values, "F"), S)


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_png(tmp_path, transparency):
    palette = rgb_pattern(1, 256, seed=2)[0]
    index = np.random.default_rng(3).integers(0, 256, (S, S), dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.tobytes())
    img.save(tmp_path / "p.png", **({"transparency": 7} if transparency else {}))
    np.testing.assert_array_equal(load_rgb(tmp_path / "p.png", S), palette[index])


def test_cmyk_jpeg_matches_its_rgb(tmp_path):
    y, x = np.mgrid[:64, :64]
    rgb = np.stack([x * 4, y * 4, 255 - (x + y) * 2], -1).astype(np.uint8)  # smooth: JPEG-safe
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    got = load_rgb(tmp_path / "c.jpg", 64).astype(int)
    assert np.abs(got - rgb).mean() < 2 and np.abs(got - rgb).max() < 24


def test_alpha_is_dropped_not_composited(tmp_path):
    rgb = rgb_pattern()
    alpha = np.zeros((S, S, 1), np.uint8)  # fully transparent: compositing would erase it all
    Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.png", S), rgb)
    gray = rgb[..., 0]
    Image.fromarray(np.stack([gray, alpha[..., 0]], 2), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "la.png", S), np.dstack([gray] * 3))
    palette = rgb_pattern(1, 256, seed=6)[0]
    pa = Image.fromarray(gray, "P")
    pa.putpalette(palette.tobytes())
    pa = pa.convert("PA")
    assert pa.mode == "PA"
    np.testing.assert_array_equal(load_rgb(pa, S), palette[gray])


def test_bilevel_and_gray_modes():
    bits = np.random.default_rng(4).random((S, S)) > 0.5
    want = np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, 2)
    np.testing.assert_array_equal(load_rgb(Image.fromarray(bits), S), want)
    gray = rgb_pattern()[..., 0]
    np.testing.assert_array_equal(load_rgb(Image.fromarray(gray, "L"), S), np.dstack([gray] * 3))


def test_animation_reads_first_frame():
    frames = [Image.fromarray(np.full((S, S, 3), v, np.uint8)) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert (load_rgb(buf.getvalue(), S) == 0).all()


def test_exif_orientation_is_ignored(tmp_path):
    rgb = rgb_pattern(8, 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": the reference script trains on the stored pixels
    Image.fromarray(rgb).save(tmp_path / "r.png", exif=exif)
    assert Image.open(tmp_path / "r.png").getexif()[0x0112] == 6
    np.testing.assert_array_equal(load_rgb(tmp_path / "r.png", S), load_rgb(rgb, S))


# --- limits: refused before decoding ----------------------------------------------------------


def test_huge_declared_png_is_refused_before_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    with pytest.raises(LimitExceeded, match="max_image_pixels"):
        load_rgb(png_declaring(100_000, 100_000), S)
    with pytest.raises(LimitExceeded, match="max_image_pixels"):  # above our limit, below PIL's
        load_rgb(png_declaring(3000, 3000), S, max_pixels=1_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50_000  # KiB


def test_pil_bomb_warning_and_error_never_escape():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would raise
        with pytest.raises(LimitExceeded):
            load_rgb(png_declaring(10_000, 10_000), S)  # PIL warns over 89M pixels
        with pytest.raises(ImageError, match="truncated|cannot read"):
            load_rgb(png_declaring(10_000, 10_000), S, max_pixels=10**9)  # ours allows it
        with pytest.raises(LimitExceeded):
            load_rgb(png_declaring(100_000, 100_000), S, max_pixels=10**12)  # PIL's error


def test_arrays_and_pil_images_over_the_pixel_limit():
    with pytest.raises(LimitExceeded, match="max_image_pixels"):
        load_rgb(np.zeros((40, 30, 3), np.uint8), S, max_pixels=1000)
    with pytest.raises(LimitExceeded):
        load_rgb(Image.new("RGB", (40, 30)), S, max_pixels=1000)


def test_image_count_limit():
    arr = rgb_pattern()
    with pytest.raises(LimitExceeded, match="max_images"):
        model_input([arr] * 3, S, "taming", max_images=2)
    with pytest.raises(LimitExceeded, match="max_images"):
        model_input(np.zeros((3, 3, S, S), np.float32), S, "taming", max_images=2)
    with pytest.raises(InvalidArgument, match="at least 1"):
        model_input([], S, "taming")
    with pytest.raises(InvalidArgument, match="at least 1"):
        model_input(np.zeros((0, 3, S, S), np.float32), S, "taming")


# --- refusals ---------------------------------------------------------------------------------


def test_unreadable_files(tmp_path):
    good = png_bytes(Image.fromarray(rgb_pattern(64, 64)))
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "dir.png").mkdir()
    for name in ("truncated.png", "empty.png", "text.png", "dir.png"):
        with pytest.raises(ImageError, match="cannot read image"):
            load_rgb(tmp_path / name, S)
    with pytest.raises(ImageError, match="image not found"):
        load_rgb(tmp_path / "missing.png", S)
    with pytest.raises(ImageError, match="cannot read image"):
        load_rgb(b"", S)


def test_array_forms():
    rgba = np.random.default_rng(5).integers(0, 256, (S, S, 4), dtype=np.uint8)
    np.testing.assert_array_equal(load_rgb(rgba, S), rgba[..., :3])
    gray = rgba[..., 0]
    for form in (gray, gray[..., None]):
        np.testing.assert_array_equal(load_rgb(form, S), np.dstack([gray] * 3))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((0, 5), np.uint8), "empty"),
        (np.zeros((5, 0, 3), np.uint8), "empty"),
        (np.zeros((S, S, 3), np.float64), "must be uint8"),
        (np.zeros((S, S, 3), bool), "must be uint8"),
        (np.zeros((S, S, 3), np.uint16), "must be uint8"),
        (np.zeros((S, S, 2), np.uint8), "must be uint8"),
        (np.zeros(S, np.uint8), "must be uint8"),
        (np.zeros((2, 2, S, S, 3), np.uint8), "must be uint8"),
    ],
)
def test_bad_arrays(array, message):
    with pytest.raises(ImageError, match=message):
        model_input(array, S, "taming")


def test_wrong_python_types():
    for image in (3.5, None, [[1, 2, 3]], {"image": 1}):
        with pytest.raises(InvalidArgument, match="unsupported image type"):
            model_input(image, S, "taming")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_batch_must_be_finite(bad):
    x = np.zeros((2, 3, S, S), np.float32)
    np.testing.assert_array_equal(model_input(x, S, "taming"), x)
    x[1, 2, 3, 4] = bad
    with pytest.raises(ImageError, match="image 1 has NaN or inf"):
        model_input(x, S, "taming")
    with pytest.raises(ImageError, match="already scaled"):
        model_input(np.zeros((2, 3, S, S + 1), np.float32), S, "taming")


# --- fuzzing ----------------------------------------------------------------------------------

VALID_PNG = png_bytes(Image.fromarray(rgb_pattern(12, 10)))


@st.composite
def corrupted_png(draw) -> bytes:
    """A valid PNG with a few bytes overwritten, then perhaps cut short."""
    data = bytearray(VALID_PNG)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@FUZZ
@given(st.one_of(st.binary(max_size=512), corrupted_png()))
def test_fuzz_encoded_bytes(data):
    """Random or corrupted bytes are an image or one clear refusal, never another exception."""
    try:
        out = load_rgb(data, S, max_pixels=4096)
    except (ImageError, LimitExceeded):
        return
    assert out.shape == (S, S, 3) and out.dtype == np.uint8


@FUZZ
@given(
    hnp.arrays(
        st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, bool]),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    )
)
def test_fuzz_arrays(array):
    try:
        out = load_rgb(array, S, max_pixels=30)
    except FacertError:
        return
    assert out.shape == (S, S, 3) and out.dtype == np.uint8


def test_postscript_is_refused_unopened(tmp_path):
    """PIL would run an EPS file through Ghostscript; facert reads raster formats only."""
    marker = tmp_path / "ghostscript-ran"
    eps = tmp_path / "face.eps"
    eps.write_text(
        "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
        f"({marker}) (w) file closefile\nshowpage\n%%EOF\n"
    )
    for source in (eps, eps.read_bytes()):
        with pytest.raises(ImageError, match="cannot read image"):
            load_rgb(source, 16)
    assert not marker.exists()
