"""Checks that synthetic face labels match the pixels, by measuring the drawings themselves.

Each visual test draws one face twice with the same random layout and a single attribute
changed, so every pixel difference belongs to that attribute.
"""

import re

import cv2
import numpy as np
import pytest

from facert.export.synthetic import (
    ATTRIBUTES,
    Face,
    attribute_answer,
    caption,
    draw_face,
    make_face,
    sample_attributes,
)

BASE = {
    "expression": "neutral",
    "hair color": "red",
    "hair length": "short",
    "eyewear": "none",
    "beard": "no",
    "age": "young",
    "skin tone": "medium",
    "background": "blue",
}


def render(layout_seed: int = 7, size: int = 256, **changes: str) -> np.ndarray:
    attributes = dict(BASE)
    attributes.update({name.replace("_", " "): value for name, value in changes.items()})
    return draw_face(attributes, np.random.default_rng(layout_seed), size)


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels where two drawings clearly differ (well above the +-3 noise)."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > 30


def luminance(img: np.ndarray, mask: np.ndarray) -> float:
    return float(img[mask].astype(np.float64).mean())


def centroid_row(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[0].mean())


def count_near(img: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 25) -> int:
    return int((np.abs(img.astype(np.int16) - rgb).max(axis=2) < tolerance).sum())


SEEDS = (1, 7, 23)
AGED = ("middle-aged", "old")


@pytest.mark.parametrize("seed", SEEDS)
def test_sunglasses_darken_the_eyes_and_glasses_keep_them_visible(seed):
    bare, glasses, sunglasses = (
        render(seed, eyewear=value) for value in ("none", "glasses", "sunglasses")
    )
    lens_area = changed(bare, sunglasses)
    assert lens_area.sum() > 1200
    assert luminance(sunglasses, lens_area) < 40 < luminance(bare, lens_area) - 60
    eye_white = (245, 245, 245)
    assert count_near(sunglasses, eye_white, 12) < 0.1 * count_near(bare, eye_white, 12)
    assert count_near(glasses, eye_white, 12) > 0.7 * count_near(bare, eye_white, 12)
    assert changed(bare, glasses).sum() > 400


@pytest.mark.parametrize("seed", SEEDS)
def test_hair_length_changes_the_amount_of_hair(seed):
    red_hair = (190, 62, 26)
    bald, short, long = (render(seed, hair_length=v) for v in ("bald", "short", "long"))
    counts = [count_near(img, red_hair) for img in (bald, short, long)]
    assert counts[0] < 900  # just the eyebrows
    assert counts[1] > counts[0] + 3000
    assert counts[2] > counts[1] + 4000
    # Long hair reaches the shoulders: hair pixels well below the chin.
    rows = np.nonzero(np.abs(long.astype(np.int16) - red_hair).max(axis=2) < 25)[0]
    assert rows.max() > 200 * long.shape[0] / 256


@pytest.mark.parametrize("seed", SEEDS)
def test_skin_tone_orders_face_brightness(seed):
    light, medium, dark = (render(seed, skin_tone=v) for v in ("light", "medium", "dark"))
    skin = changed(light, dark)
    assert skin.sum() > 8000
    assert luminance(light, skin) > luminance(medium, skin) + 30 > luminance(dark, skin) + 60


@pytest.mark.parametrize("seed", SEEDS)
def test_expressions_change_the_mouth_below_the_eyes(seed):
    neutral, smiling, surprised = (
        render(seed, expression=v) for v in ("neutral", "smiling", "surprised")
    )
    mouth = changed(neutral, smiling)
    assert mouth.sum() > 150
    eyes = changed(render(seed), render(seed, eyewear="sunglasses"))
    assert centroid_row(mouth) > centroid_row(eyes) + 25
    # An open mouth is a dark filled hole; surprise also lifts the brows above the eyes.
    hole = (60, 12, 20)
    assert count_near(surprised, hole, 25) > count_near(neutral, hole, 25) + 100
    surprise = changed(neutral, surprised)
    assert np.nonzero(surprise)[0].min() < np.nonzero(eyes)[0].min()


@pytest.mark.parametrize("seed", SEEDS)
def test_older_faces_have_more_wrinkle_ink(seed):
    young = render(seed, age="young", hair_length="bald")
    aged = [render(seed, age=a, hair_length="bald") for a in AGED]
    middle, old = (changed(young, face) for face in aged)
    assert 500 < middle.sum() and 2 * middle.sum() < old.sum()
    # wrinkles are skin-coloured lines, darker than the skin they cross
    for mask, face in zip((middle, old), aged):
        assert luminance(face, mask) < luminance(young, mask)


@pytest.mark.parametrize("seed", SEEDS)
def test_beard_fills_the_lower_face_in_hair_colour(seed):
    shaven, bearded = render(seed), render(seed, beard="yes")
    beard = changed(shaven, bearded)
    assert beard.sum() > 2500
    eyes = changed(render(seed), render(seed, eyewear="sunglasses"))
    assert centroid_row(beard) > centroid_row(eyes) + 30
    red_hair = (190, 62, 26)
    assert count_near(bearded, red_hair) > count_near(shaven, red_hair) + 1800


def test_hair_and_background_colours():
    def mean_rgb(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return img[mask].astype(np.float64).mean(axis=0)

    hair_area = changed(render(hair_color="black"), render(hair_color="blond"))
    hair_area = cv2.erode(hair_area.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # no rims
    r, g, b = mean_rgb(render(hair_color="red"), hair_area)
    assert r > 2 * g and r > 2 * b
    r, g, b = mean_rgb(render(hair_color="blond"), hair_area)
    assert r > 180 and g > 150 and b < g - 50
    assert mean_rgb(render(hair_color="black"), hair_area).max() < 60
    r, g, b = mean_rgb(render(hair_color="grey"), hair_area)
    assert 130 < g < 220 and abs(r - b) < 20
    r, g, b = mean_rgb(render(hair_color="brown"), hair_area)
    assert r > g > b and 60 < r < 160

    corner = np.zeros((256, 256), bool)
    corner[:24, :24] = True
    hue_checks = {
        "blue": lambda r, g, b: b > r + 60 and b > g + 40,
        "green": lambda r, g, b: g > r + 40 and g > b + 40,
        "purple": lambda r, g, b: b > g + 40 and r > g + 20,
        "pink": lambda r, g, b: r > b > g + 20,
        "white": lambda r, g, b: min(r, g, b) > 215,
    }
    assert set(hue_checks) == set(ATTRIBUTES["background"])
    for color, check in hue_checks.items():
        assert check(*mean_rgb(render(background=color), corner)), color


def test_make_face_is_reproducible_and_varied():
    face = make_face(3, 5)
    assert isinstance(face, Face)
    assert face.image.shape == (256, 256, 3) and face.image.dtype == np.uint8
    again = make_face(3, 5)
    assert again.image.tobytes() == face.image.tobytes()
    assert again.attributes == face.attributes
    assert make_face(3, 6).image.tobytes() != face.image.tobytes()
    assert make_face(4, 5).image.tobytes() != face.image.tobytes()
    # Same labels, different draw: the jitter alone must change the picture.
    other_layout = draw_face(face.attributes, np.random.default_rng(99))
    assert changed(face.image, other_layout).mean() > 0.05


@pytest.mark.parametrize("size", [64, 128, 512])
def test_other_sizes(size):
    image = make_face(0, 0, size).image
    assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_features_survive_downscaling():
    """A 16x16-latent VQGAN sees about this much detail; sunglasses must still read as dark."""
    bare = render(size=32)
    sunglasses = render(size=32, eyewear="sunglasses")
    assert changed(bare, sunglasses).sum() >= 12


def test_draw_face_rejects_unknown_values():
    with pytest.raises(ValueError):
        draw_face({**BASE, "eyewear": "monocle"}, np.random.default_rng(0))
    with pytest.raises(ValueError):
        draw_face({k: v for k, v in BASE.items() if k != "beard"}, np.random.default_rng(0))


def test_attribute_distribution_covers_every_value():
    rng = np.random.default_rng(0)
    samples = [sample_attributes(rng) for _ in range(400)]
    for name, values in ATTRIBUTES.items():
        seen = {s[name] for s in samples}
        assert seen == set(values), name
    assert all(list(s) == list(ATTRIBUTES) for s in samples)
    assert all((s["hair color"] == "grey") == (s["age"] == "old") for s in samples)


# How a caption may name each value (an independent oracle: synonyms a reader would accept).
MENTIONS = {
    "expression": {
        "smiling": r"smil|cheerful|happy",
        "neutral": r"serious|straight|expressionless|neutral",
        "surprised": r"surpris|astonish|open mouth",
    },
    "hair color": {
        "black": r"\bblack\b",
        "brown": r"\bbrown\b",
        "blond": r"\bblonde?\b",
        "red": r"\bred\b|\bginger\b",
        "grey": r"\bgr[ae]y\b|\bsilver\b",
    },
    "hair length": {
        "short": r"\bshort\b",
        "long": r"\blong\b|shoulders",
        "bald": r"\bbald\b|no hair",
    },
    "eyewear": {
        "none": r"no eyewear|bare eyes|not wear any eyewear",
        "glasses": r"(?<!sun)glasses|spectacle",
        "sunglasses": r"sunglasses|\bshades\b",
    },
    "beard": {"no": r"clean-shaven|no facial hair", "yes": r"beard"},
    "age": {
        "young": r"\byoung|youthful",
        "middle-aged": r"middle[- ]age",
        "old": r"\bold\b|elderly|wrinkle",
    },
    "skin tone": {
        "light": r"\blight[- ]skin|pale[- ]skin",
        "medium": r"medium[- ]skin|medium skin tone|olive|tan skin",
        "dark": r"dark[- ]skin",
    },
    "background": {c: rf"\b{c}\b" for c in ("blue", "green", "purple", "pink", "white")},
}


@pytest.mark.parametrize("partial", [False, True], ids=["every attribute", "some attributes"])
def test_captions_mention_what_they_should_and_nothing_false(partial):
    assert {name: set(values) for name, values in MENTIONS.items()} == {
        name: set(values) for name, values in ATTRIBUTES.items()
    }
    sample_rng, caption_rng = np.random.default_rng(1), np.random.default_rng(2)
    names = list(ATTRIBUTES)
    for _ in range(600):
        attributes = sample_attributes(sample_rng)
        said = names
        if partial:
            said = list(sample_rng.choice(names, sample_rng.integers(1, len(names)), replace=False))
        text = caption(attributes, caption_rng, said)
        assert text.isascii() and text[0].isupper() and text.endswith(".")
        lowered = text.lower()
        for name, patterns in MENTIONS.items():
            for value, pattern in patterns.items():
                mentioned = re.search(pattern, lowered) is not None
                assert mentioned == (name in said and value == attributes[name]), (name, text)


def test_captions_reject_unknown_attributes():
    with pytest.raises(ValueError, match="unknown attributes"):
        caption(sample_attributes(np.random.default_rng(0)), np.random.default_rng(0), ["hat"])


def test_captions_are_varied():
    rng = np.random.default_rng(3)
    attributes = sample_attributes(rng)
    captions = [caption(attributes, rng) for _ in range(300)]
    assert len(set(captions)) > 250
    openings = {" ".join(text.split()[:2]) for text in captions}
    assert len(openings) >= 6
    # Clause order varies: where the background is mentioned moves around.
    positions = {text.lower().find(attributes["background"]) * 10 // len(text) for text in captions}
    assert len(positions) >= 5


def test_attribute_answer():
    assert attribute_answer("hair color", "red") == "red"
    assert attribute_answer("beard", "yes") == "yes"
    for name, values in ATTRIBUTES.items():
        for value in values:
            assert attribute_answer(name, value) in values
    with pytest.raises(ValueError):
        attribute_answer("hair color", "green")
    with pytest.raises(ValueError):
        attribute_answer("mood", "happy")
