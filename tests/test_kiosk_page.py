"""The kiosk page at `/` of `facert serve` as a visitor uses it: a real server process (API key
on), a real headless Chromium whose fake camera plays a photo of a real face (scikit-image's
astronaut), and the page's own buttons. What the page shows is checked against the face
detector and the model's answers in this process."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import facert
from facert.runtime.faces import FaceDetector, crop_face

from .test_server import KEY, Server

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the kiosk page tests need Playwright: pip install playwright"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="the kiosk page tests need a Chromium binary: apt-get install chromium"
)
ORANGE = [0xFF, 0x91, 0x00, 0xFF]  # kiosk.js's colour for a reading the server flags unreliable
TIMEOUT_MS = 30_000


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def write_y4m(path: Path, rgb: np.ndarray, frames: int = 2, fps: int = 5) -> Path:
    """A Y4M video (text header, then raw I420 frames) of one still picture: BT.601
    limited-range YUV, chroma averaged over 2x2 pixels, as Chromium's fake camera reads it."""
    height, width = rgb.shape[:2]
    r, g, b = (rgb[..., i].astype(np.float64) / 255 for i in range(3))
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    u = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    v = 128 + 112.0 * r - 93.786 * g - 18.214 * b

    def plane(p: np.ndarray, sub: int) -> bytes:
        p = p.reshape(height // sub, sub, width // sub, sub).mean(axis=(1, 3))
        return np.clip(np.round(p), 0, 255).astype(np.uint8).tobytes()

    frame = b"FRAME\n" + plane(y, 1) + plane(u, 2) + plane(v, 2)
    header = f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode()
    path.write_bytes(header + frame * frames)
    return path


def iou(a: list[int], b: list[int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("kiosk") / "server.log"
    server = Server(log, "--api-key", KEY, "--no-access-log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    video = write_y4m(tmp_path_factory.mktemp("camera") / "astronaut.y4m", astronaut())
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={video}"]  # fmt: skip
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def visitor(server, browser):
    """A fresh tab on the kiosk page (its own sessionStorage), no key entered; the page's
    script must raise nothing."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    script_errors = []
    page.on("pageerror", lambda error: script_errors.append(error))
    page.goto(f"http://127.0.0.1:{server.port}/")
    try:
        yield page
    finally:
        context.close()
    assert not script_errors


@pytest.fixture
def page(visitor):
    """The kiosk page with the server's API key entered."""
    visitor.fill("#key", KEY)
    return visitor


def faces_shown(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#faces li",
        "items => items.map(li => ({box: li.dataset.box.split(',').map(Number),"
        " reliable: li.dataset.reliable, text: li.textContent}))",
    )


def overlay_pixel(page, x: int, y: int) -> list[int]:
    return page.evaluate(
        "([x, y]) => Array.from(document.getElementById('overlay').getContext('2d')"
        ".getImageData(x, y, 1, 1).data)",
        [x, y],
    )


def test_the_api_key_is_asked_for_and_kept_for_the_tab(visitor):
    visitor.fill("#text", "a bald man")
    visitor.click("#draw-button")
    error = visitor.locator("#draw-error")
    error.wait_for()
    assert "missing or wrong API key" in error.text_content()
    assert "401 unauthorized" in error.text_content()

    visitor.fill("#key", KEY)
    visitor.reload()
    assert visitor.input_value("#key") == KEY  # sessionStorage: kept across a reload
    visitor.fill("#text", "a bald man")
    visitor.click("#draw-button")
    visitor.locator("#drawings img").wait_for()
    assert visitor.locator("#draw-error").is_hidden()


def test_camera_faces_are_boxed_and_read_one_frame_at_a_time(page):
    """Frames go to /v1/analyze one at a time; every face gets a box on the overlay and its
    attributes, and the astronaut (a photo, unlike the bundled model's cartoon faces) is
    flagged unreliable."""
    in_flight, most, answered = 0, 0, []

    def sent(request):
        nonlocal in_flight, most
        if request.url.endswith("/v1/analyze"):
            in_flight += 1
            most = max(most, in_flight)

    def ended(request):
        nonlocal in_flight
        if request.url.endswith("/v1/analyze"):
            in_flight -= 1
            answered.append(request)

    page.on("request", sent)
    page.on("requestfinished", ended)
    page.on("requestfailed", ended)
    page.click("#camera")
    page.locator("#faces li").first.wait_for()
    for _ in range(TIMEOUT_MS // 100):  # a second reading: the page goes on reading frames
        if len(answered) >= 2:
            break
        page.wait_for_timeout(100)
    assert len(answered) >= 2 and most == 1
    assert page.text_content("#camera") == "Stop camera"
    assert page.locator("#video").is_visible()

    (expected,) = FaceDetector().detect(astronaut())
    (face,) = faces_shown(page)
    x, y, w, h = face["box"]
    assert iou(face["box"], [expected.x, expected.y, expected.w, expected.h]) > 0.6, face
    assert face["reliable"] == "false" and "UNRELIABLE" in face["text"]
    for name in ("expression", "hair color", "age", "background"):
        assert f"{name}: " in face["text"]
    assert overlay_pixel(page, x, y + h // 2) == ORANGE  # the box's left edge
    assert overlay_pixel(page, x + w // 2, y + h // 2) == [0, 0, 0, 0]  # the face is not covered
    size = page.eval_on_selector("#overlay", "c => [c.width, c.height]")
    assert size == list(astronaut().shape[1::-1])  # boxes in the frame's pixels

    page.click("#camera")
    assert page.text_content("#camera") == "Start camera"


def test_a_photo_is_read(page, tmp_path):
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()).save(photo)
    page.set_input_files("#photo", photo)
    page.locator("#faces li").first.wait_for()

    (expected,) = FaceDetector().detect(astronaut())
    (face,) = faces_shown(page)
    assert face["box"] == [expected.x, expected.y, expected.w, expected.h]  # same pixels
    assert face["reliable"] == "false"
    with facert.load() as m:
        crop = crop_face(astronaut(), expected)
        answers = m.attributes(crop, list(m.config.attributes))
        score = m.reading_quality(crop)["score"]
    assert f"UNRELIABLE: {score:.1f} dB" in face["text"]
    for name, a in answers.items():
        percent = math.floor(a["prob"] * 100 + 0.5)  # JavaScript's Math.round
        assert f"{name}: {a['value']} {percent} %" in face["text"]
    assert page.locator("#picture").is_visible() and page.locator("#video").is_hidden()
    assert "1 face(s)" in page.text_content("#read-status")


def test_a_sentence_is_drawn_with_a_progress_bar(page):
    page.fill("#text", "a smiling young woman with long blonde hair")
    page.click("#draw-button")
    bar = "document.getElementById('progress').value"
    page.wait_for_function(f"() => {bar} > 0 && {bar} < 100", polling="raf")
    page.locator("#drawings img").wait_for()
    assert page.evaluate(bar) == 100
    assert page.text_content("#percent") == "100 %"
    size = page.eval_on_selector("#drawings img", "img => [img.naturalWidth, img.naturalHeight]")
    assert size == [64, 64]  # the bundled model's faces, decoded by the browser
    assert page.is_enabled("#draw-button")


def test_server_errors_are_shown_on_the_page(page, tmp_path):
    page.click("#draw-button")  # no text
    page.locator("#draw-error").wait_for()
    assert page.text_content("#draw-error") == "text is empty (422 invalid_argument)"

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    page.set_input_files("#photo", not_an_image)
    page.locator("#read-error").wait_for()
    assert "(422 image_error)" in page.text_content("#read-error")
