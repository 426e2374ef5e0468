"""Procedural cartoon faces with exact attribute labels, for training a tiny Talk2Face-style model.

There is no model hub to pull a face model from, so we train one on faces whose every label is
known because we drew it. Features are bold (thick strokes, big eyes and mouth, solid fills) so
that each attribute survives a 16x16-latent VQGAN. Drawing is torch-free and takes about 2 ms.

Labels and what is drawn:
- "hair color" is also the colour of the eyebrows and the beard, so it stays visible on bald
  faces. It is "grey" exactly when "age" is "old" (old faces get grey hair and many wrinkles).
- Everything else is sampled uniformly and independently.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import cv2
import numpy as np

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "expression": ("smiling", "neutral", "surprised"),
    "hair color": ("black", "brown", "blond", "red", "grey"),
    "hair length": ("short", "long", "bald"),
    "eyewear": ("none", "glasses", "sunglasses"),
    "beard": ("no", "yes"),
    "age": ("young", "middle-aged", "old"),
    "skin tone": ("light", "medium", "dark"),
    "background": ("blue", "green", "purple", "pink", "white"),
}

CANVAS = 256  # faces are drawn at this resolution, then resized to the requested size

SKIN_RGB = {"light": (242, 208, 182), "medium": (196, 142, 100), "dark": (105, 68, 46)}
HAIR_RGB = {
    "black": (28, 26, 26),
    "brown": (110, 66, 34),
    "blond": (228, 184, 72),
    "red": (190, 62, 26),
    "grey": (178, 178, 182),
}
BACKGROUND_RGB = {
    "blue": (68, 118, 212),
    "green": (84, 172, 96),
    "purple": (138, 92, 182),
    "pink": (240, 158, 204),
    "white": (242, 242, 242),
}
# Nuisance colours, not labelled: they vary so the model cannot tie them to any attribute.
# Shirts avoid the hair colours so long hair on the shoulders always stands out.
SHIRT_RGB = ((40, 60, 120), (50, 110, 60), (30, 130, 140), (120, 50, 110), (150, 190, 230))
IRIS_RGB = ((90, 55, 30), (50, 110, 170), (70, 120, 70))
FRAME_RGB = ((25, 25, 25), (90, 50, 20), (160, 120, 40), (30, 40, 120))
MOUTH_RGB = (150, 30, 40)
MOUTH_INSIDE_RGB = (60, 12, 20)
TEETH_RGB = (250, 250, 245)
LENS_RGB = (18, 18, 24)
AA = cv2.LINE_AA


@dataclass(frozen=True)
class Face:
    image: np.ndarray  # uint8 [size, size, 3] RGB
    attributes: dict[str, str]  # attribute -> value, exactly what is drawn


@dataclass(frozen=True)
class _Layout:
    """Every random nuisance draw for one face, sampled before drawing in a fixed order.

    Drawing the same layout with different attributes changes only the pixels those attributes
    own, which is what makes attribute edits comparable (and testable).
    """

    angle: float
    scale: float
    shift: tuple[float, float]
    head_axes: tuple[int, int]
    eye_gap: int
    eye_y: int
    mouth_y: int
    mouth_half_width: int
    skin_jitter: np.ndarray
    hair_jitter: np.ndarray
    background_jitter: np.ndarray
    shirt_rgb: tuple[int, int, int]
    iris_rgb: tuple[int, int, int]
    frame_rgb: tuple[int, int, int]
    wrinkle_offsets: np.ndarray  # 4 forehead lines, then 3 crow's feet


def _sample_layout(rng: np.random.Generator) -> _Layout:
    return _Layout(
        angle=float(rng.uniform(-8.0, 8.0)),
        scale=float(rng.uniform(0.86, 1.06)),
        shift=(float(rng.uniform(-14.0, 14.0)), float(rng.uniform(-10.0, 12.0))),
        head_axes=(int(rng.integers(56, 64)), int(rng.integers(76, 84))),
        eye_gap=int(rng.integers(22, 27)),
        eye_y=int(rng.integers(114, 120)),
        mouth_y=int(rng.integers(158, 165)),
        mouth_half_width=int(rng.integers(18, 25)),
        skin_jitter=rng.integers(-8, 9, 3),
        hair_jitter=rng.integers(-12, 13) + rng.integers(-4, 5, 3),  # keeps grey grey
        background_jitter=rng.integers(-10, 11, 3),
        shirt_rgb=SHIRT_RGB[rng.integers(len(SHIRT_RGB))],
        iris_rgb=IRIS_RGB[rng.integers(len(IRIS_RGB))],
        frame_rgb=FRAME_RGB[rng.integers(len(FRAME_RGB))],
        wrinkle_offsets=rng.integers(-2, 3, 7),
    )


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    """Uniform over each attribute's values, except that hair is grey exactly when age is old."""
    attributes = {
        name: str(values[rng.integers(len(values))])
        for name, values in ATTRIBUTES.items()
        if name != "hair color"
    }
    if attributes["age"] == "old":
        attributes["hair color"] = "grey"
    else:
        young_colors = [c for c in ATTRIBUTES["hair color"] if c != "grey"]
        attributes["hair color"] = young_colors[rng.integers(len(young_colors))]
    return {name: attributes[name] for name in ATTRIBUTES}


def _rgb(
    base: tuple[int, ...], jitter: np.ndarray | None = None, factor: float = 1.0
) -> tuple[int, int, int]:
    """An OpenCV colour tuple: `base` scaled by `factor`, shifted by `jitter`, clipped."""
    color = np.asarray(base, dtype=np.float64) * factor
    if jitter is not None:
        color = color + jitter
    return tuple(int(c) for c in np.clip(color, 0, 255))


def _draw_hair_back(img: np.ndarray, hair: tuple, head_axes: tuple[int, int]) -> None:
    """Long hair: one solid mass behind the head that falls past the jaw onto the shoulders."""
    half_width = head_axes[0] + 16
    for color, thickness in ((_rgb(hair, factor=0.6), 4), (hair, -1)):
        cv2.ellipse(
            img, (128, 112), (half_width, head_axes[1] - 4), 0, 180, 360, color, thickness, AA
        )
        cv2.rectangle(img, (128 - half_width, 112), (128 + half_width, 214), color, thickness, AA)
        cv2.ellipse(img, (128, 214), (half_width, 16), 0, 0, 180, color, thickness, AA)


def _draw_hair_cap(img: np.ndarray, hair: tuple, head_axes: tuple[int, int], long: bool) -> None:
    """Hair on top of the head with a fringe ending well above the brows, plus sideburns.

    A darker rim keeps light hair (blond, grey) distinct from light skin and backgrounds.
    """
    top = 120 - head_axes[1]
    side_bottom = 132 if long else 108
    sideburns = [
        np.array(
            [
                [128 + side * (head_axes[0] + 4), top + 30],
                [128 + side * (head_axes[0] - 8), top + 30],
                [128 + side * (head_axes[0] - 8), side_bottom - 10],
                [128 + side * (head_axes[0] + 4), side_bottom],
            ],
            dtype=np.int32,
        )
        for side in (-1, 1)
    ]
    cap = cv2.ellipse2Poly((128, top + 34), (head_axes[0] + 6, 40), 0, 180, 360, 5)
    rim = _rgb(hair, factor=0.6)
    if not long:  # long hair is rimmed by the mass behind it; rims here would show as seams
        cv2.polylines(img, [cap, *sideburns], True, rim, 4, AA)
    for part in (cap, *sideburns):  # one call each: overlapping polygons in one call cancel out
        cv2.fillPoly(img, [part], hair, AA)
    if long:
        fringe_x = head_axes[0] - 8
        cv2.line(img, (128 - fringe_x, top + 35), (128 + fringe_x, top + 35), rim, 3, AA)


def _draw_bald_shine(img: np.ndarray, skin: tuple, head_axes: tuple[int, int]) -> None:
    top = 120 - head_axes[1]
    cv2.ellipse(img, (110, top + 18), (16, 7), -20, 0, 360, _rgb(skin, factor=1.12), -1, AA)


def _draw_wrinkles(img: np.ndarray, line: tuple, age: str, layout: _Layout) -> None:
    """Middle-aged: two forehead lines. Old: four, plus crow's feet, eye bags and cheek folds."""
    if age == "young":
        return
    jitter = layout.wrinkle_offsets
    brow_y = layout.eye_y - 18
    forehead = (
        (brow_y - 12, brow_y - 21)
        if age == "middle-aged"
        else (brow_y - 10, brow_y - 17, brow_y - 24, brow_y - 31)
    )
    for k, y in enumerate(forehead):  # shallow arcs whose apex sits at y
        center = (128, y + 14 + int(jitter[k]))
        cv2.ellipse(img, center, (30 - 2 * k, 14), 0, 215, 325, line, 5, AA)
    if age != "old":
        return
    for side in (-1, 1):
        eye_x = 128 + side * layout.eye_gap
        corner_x = eye_x + side * 22
        for k, dy in enumerate((-7, 0, 7)):  # crow's feet fanning out from the eye corner
            end = (corner_x + side * 10, layout.eye_y + dy * 2 + int(jitter[4 + k]))
            cv2.line(img, (corner_x, layout.eye_y + dy // 2), end, line, 3, AA)
        cv2.ellipse(img, (eye_x, layout.eye_y + 12), (11, 5), 0, 20, 160, line, 3, AA)
        fold_x = 128 + side * (layout.mouth_half_width + 8)
        fold_top, fold_bottom = (
            (fold_x - side * 2, layout.mouth_y - 26),
            (fold_x + side * 6, layout.mouth_y + 4),
        )
        cv2.line(img, fold_top, fold_bottom, line, 4, AA)


def _draw_beard(img: np.ndarray, hair: tuple, skin: tuple, layout: _Layout) -> None:
    """Solid hair-coloured jaw and chin, with a moustache and a skin patch around the lips."""
    width, height = layout.head_axes
    jaw = cv2.ellipse2Poly((128, 120), (width, height), 0, 8, 172, 6)
    moustache_y = layout.mouth_y - 14
    upper = np.array(
        [
            [128 - width + 4, 128],
            [128 - 20, moustache_y],
            [128 + 20, moustache_y],
            [128 + width - 4, 128],
        ],
        dtype=np.int32,
    )
    beard = np.concatenate([jaw, upper[::-1]])
    cv2.fillPoly(img, [beard], hair, AA)
    cv2.polylines(img, [beard], True, _rgb(hair, factor=0.6), 2, AA)
    cv2.ellipse(
        img, (128, layout.mouth_y + 2), (layout.mouth_half_width + 4, 11), 0, 0, 360, skin, -1, AA
    )


def _draw_mouth(img: np.ndarray, expression: str, layout: _Layout) -> None:
    """Drawn bold enough to read at 64x64: an open smile with teeth, a flat line, or an O."""
    y, half = layout.mouth_y, layout.mouth_half_width
    if expression == "smiling":
        cv2.ellipse(img, (128, y - 6), (half, 16), 0, 0, 180, MOUTH_INSIDE_RGB, -1, AA)
        cv2.ellipse(img, (128, y - 6), (half - 4, 7), 0, 0, 180, TEETH_RGB, -1, AA)
        cv2.ellipse(img, (128, y - 6), (half, 16), 0, 0, 180, MOUTH_RGB, 5, AA)
        cv2.line(img, (128 - half, y - 6), (128 + half, y - 6), MOUTH_RGB, 5, AA)
    elif expression == "neutral":
        cv2.line(img, (128 - half, y), (128 + half, y), MOUTH_RGB, 7, AA)
    else:
        cv2.ellipse(img, (128, y), (12, 17), 0, 0, 360, MOUTH_INSIDE_RGB, -1, AA)
        cv2.ellipse(img, (128, y), (12, 17), 0, 0, 360, MOUTH_RGB, 5, AA)


def _draw_eyes(img: np.ndarray, brows: tuple, expression: str, layout: _Layout) -> None:
    """Big white eyes with dark irises; surprise widens them and lifts and arches the brows."""
    surprised = expression == "surprised"
    eye_axes = (14, 12) if surprised else (14, 9)
    brow_lift, brow_arch = (10, 9) if surprised else (0, 4)
    for side in (-1, 1):
        center = (128 + side * layout.eye_gap, layout.eye_y)
        cv2.ellipse(img, center, eye_axes, 0, 0, 360, (250, 250, 250), -1, AA)
        cv2.ellipse(img, center, eye_axes, 0, 0, 360, (40, 30, 30), 2, AA)
        cv2.circle(img, center, 7, layout.iris_rgb, -1, AA)
        cv2.circle(img, center, 3, (10, 10, 10), -1, AA)
        brow_center = (center[0], layout.eye_y - 14 - brow_lift + brow_arch)
        cv2.ellipse(img, brow_center, (16, brow_arch + 2), 0, 200, 340, brows, 8, AA)


def _draw_eyewear(img: np.ndarray, eyewear: str, layout: _Layout) -> None:
    """Glasses: thick outlined round lenses, eyes visible. Sunglasses: near-black filled lenses."""
    if eyewear == "none":
        return
    frame = layout.frame_rgb if eyewear == "glasses" else LENS_RGB
    y = layout.eye_y
    lens_radius = 18
    for side in (-1, 1):
        center = (128 + side * layout.eye_gap, y)
        if eyewear == "sunglasses":
            cv2.circle(img, center, lens_radius, LENS_RGB, -1, AA)
            cv2.ellipse(img, (center[0] - 6, y - 7), (5, 3), -30, 0, 360, (90, 90, 100), -1, AA)
        cv2.circle(img, center, lens_radius, frame, 6, AA)
        temple_x = 128 + side * layout.head_axes[0]
        cv2.line(img, (center[0] + side * lens_radius, y - 4), (temple_x, y - 6), frame, 4, AA)
    bridge_half = layout.eye_gap - lens_radius
    cv2.line(img, (128 - bridge_half, y - 4), (128 + bridge_half, y - 4), frame, 4, AA)


def draw_face(attributes: dict[str, str], rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Draw one RGB uint8 face showing exactly `attributes`, jittered in pose, scale and colour.

    Any combination of values is drawn as given (the grey-iff-old rule lives in
    `sample_attributes`). Faces are drawn at 256x256 and resized, so sizes above 256 are soft.
    """
    for name, values in ATTRIBUTES.items():
        if attributes.get(name) not in values:
            raise ValueError(
                f"attribute {name!r} must be one of {values}, got {attributes.get(name)!r}"
            )
    layout = _sample_layout(rng)
    skin = _rgb(SKIN_RGB[attributes["skin tone"]], layout.skin_jitter)
    skin_line = _rgb(skin, factor=0.62)
    hair = _rgb(HAIR_RGB[attributes["hair color"]], layout.hair_jitter)
    hair_length = attributes["hair length"]
    head_axes = layout.head_axes

    img = np.empty((CANVAS, CANVAS, 3), np.uint8)
    img[:] = _rgb(BACKGROUND_RGB[attributes["background"]], layout.background_jitter)
    if hair_length == "long":
        _draw_hair_back(img, hair, head_axes)
    cv2.ellipse(img, (128, 292), (112, 80), 0, 0, 360, layout.shirt_rgb, -1, AA)
    cv2.rectangle(img, (108, 170), (148, 222), skin, -1, AA)
    cv2.ellipse(img, (128, 222), (20, 10), 0, 0, 180, skin, -1, AA)
    if hair_length != "long":
        for side in (-1, 1):
            ear = (128 + side * head_axes[0], layout.eye_y + 6)
            cv2.ellipse(img, ear, (9, 15), 0, 0, 360, skin, -1, AA)
            cv2.ellipse(img, ear, (9, 15), 0, 0, 360, skin_line, 2, AA)
    cv2.ellipse(img, (128, 120), head_axes, 0, 0, 360, skin, -1, AA)
    cv2.ellipse(img, (128, 120), head_axes, 0, 0, 360, skin_line, 2, AA)
    _draw_wrinkles(img, skin_line, attributes["age"], layout)
    if attributes["beard"] == "yes":
        _draw_beard(img, hair, skin, layout)
    _draw_mouth(img, attributes["expression"], layout)
    nose_top, nose_bottom = layout.eye_y + 8, layout.mouth_y - 20
    cv2.line(img, (128, nose_top), (124, nose_bottom), skin_line, 3, AA)
    cv2.line(img, (124, nose_bottom), (134, nose_bottom), skin_line, 3, AA)
    _draw_eyes(img, hair, attributes["expression"], layout)
    _draw_eyewear(img, attributes["eyewear"], layout)
    if hair_length == "bald":
        _draw_bald_shine(img, skin, head_axes)
    else:
        _draw_hair_cap(img, hair, head_axes, long=hair_length == "long")

    pose = cv2.getRotationMatrix2D((128.0, 120.0), layout.angle, layout.scale)
    pose[:, 2] += layout.shift
    img = cv2.warpAffine(img, pose, (CANVAS, CANVAS), borderMode=cv2.BORDER_REPLICATE)
    if size != CANVAS:  # area-averaging keeps thin strokes from aliasing away when shrinking
        interpolation = cv2.INTER_AREA if size < CANVAS else cv2.INTER_LINEAR
        img = cv2.resize(img, (size, size), interpolation=interpolation)
    noise = rng.integers(-3, 4, img.shape, dtype=np.int8)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def make_face(seed: int, index: int, size: int = 256) -> Face:
    """Face number `index` of dataset `seed`; the same pair always gives the same face."""
    rng = np.random.default_rng([seed, index])
    attributes = sample_attributes(rng)
    return Face(image=draw_face(attributes, rng, size), attributes=attributes)


# Caption phrases per attribute value. Each role fits a different slot of a sentence:
#   "adjective" goes before the noun ("a smiling person"), "with" after it ("a person with a
#   beard"), "sentence" stands alone after "they" ("They are smiling."). Negative values are
#   phrased without the positive word so a caption never names what is not drawn.
_PHRASES: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "expression": {
        "smiling": {
            "adjective": ("smiling", "cheerful"),
            "with": ("a smile", "a big smile", "a friendly smile"),
            "sentence": ("are smiling", "smile at the camera", "look happy, smiling"),
        },
        "neutral": {
            "adjective": ("serious", "straight-faced", "expressionless"),
            "with": ("a neutral expression", "a straight, closed mouth", "a serious look"),
            "sentence": ("keep a neutral expression", "have a straight face", "look serious"),
        },
        "surprised": {
            "adjective": ("surprised", "astonished"),
            "with": ("a surprised look", "an open mouth and raised eyebrows", "a look of surprise"),
            "sentence": (
                "look surprised",
                "seem astonished",
                "have an open mouth and raised eyebrows",
            ),
        },
    },
    "age": {
        "young": {
            "adjective": ("young", "youthful"),
            "with": ("smooth, youthful skin", "a youthful look"),
            "sentence": ("look young", "are young", "have a youthful, smooth face"),
        },
        "middle-aged": {
            "adjective": ("middle-aged",),
            "with": ("the look of middle age", "a few forehead lines of middle age"),
            "sentence": ("look middle-aged", "are middle-aged", "seem to be middle-aged"),
        },
        "old": {
            "adjective": ("old", "elderly", "wrinkled old"),
            "with": ("the wrinkles of old age", "a wrinkled, elderly look"),
            "sentence": ("look old", "are elderly", "are old and wrinkled"),
        },
    },
    "skin tone": {
        "light": {
            "adjective": ("light-skinned", "pale-skinned"),
            "with": ("light skin", "pale skin"),
            "sentence": ("have light skin", "are light-skinned"),
        },
        "medium": {
            "adjective": ("medium-skinned", "olive-skinned"),
            "with": ("medium skin", "olive skin", "tan skin"),
            "sentence": ("have medium skin", "have a medium skin tone", "have olive skin"),
        },
        "dark": {
            "adjective": ("dark-skinned",),
            "with": ("dark skin", "a dark skin tone"),
            "sentence": ("have dark skin", "are dark-skinned"),
        },
    },
    "eyewear": {
        "none": {
            "adjective": (),
            "with": ("no eyewear", "bare eyes"),
            "sentence": ("wear no eyewear", "do not wear any eyewear"),
        },
        "glasses": {
            "adjective": ("bespectacled",),
            "with": ("glasses", "spectacles", "eyeglasses", "clear glasses"),
            "sentence": ("wear glasses", "wear spectacles", "have eyeglasses on"),
        },
        "sunglasses": {
            "adjective": (),
            "with": ("sunglasses", "dark sunglasses", "shades"),
            "sentence": ("wear sunglasses", "have sunglasses on", "wear shades"),
        },
    },
    "beard": {
        "no": {
            "adjective": ("clean-shaven",),
            "with": ("no facial hair", "a clean-shaven chin"),
            "sentence": ("are clean-shaven", "have no facial hair"),
        },
        "yes": {
            "adjective": ("bearded",),
            "with": ("a beard", "a full beard", "a thick beard"),
            "sentence": ("have a beard", "are bearded", "wear a full beard"),
        },
    },
}
_HAIR_COLOR_WORDS = {
    "black": ("black",),
    "brown": ("brown",),
    "blond": ("blond", "blonde"),
    "red": ("red", "ginger"),
    "grey": ("grey", "gray", "silver"),
}
_BACKGROUND_PHRASES = (
    "on a {} background",
    "against a {} backdrop",
    "in front of a plain {} background",
)
_BACKGROUND_SENTENCES = ("The background is {}.", "The backdrop is plain {}.")
_NOUNS = ("person", "individual", "character", "adult")
_OPENINGS = ("", "a photo of ", "a portrait of ", "a drawing of ", "a close-up of ", "headshot of ")


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _hair_phrases(
    attributes: dict[str, str], rng: np.random.Generator, said: set[str]
) -> tuple[str, str] | None:
    """A "with" phrase and a standalone sentence for the hair attributes in `said` (None when
    neither is); bald faces show their colour in the brows."""
    color = _pick(rng, _HAIR_COLOR_WORDS[attributes["hair color"]])
    length = attributes["hair length"]
    if "hair length" not in said:
        if "hair color" not in said:
            return None
        if length == "bald":
            return f"{color} eyebrows", f"Their eyebrows are {color}."
        return f"{color} hair", f"Their hair is {color}."
    if "hair color" not in said:
        with_phrase, sentence = {
            "bald": (("a bald head", "no hair"), ("They are bald.", "The head is bald.")),
            "short": (("short hair", "a short haircut"), ("Their hair is short.",)),
            "long": (("long hair", "long, flowing hair"), ("They have long hair.",)),
        }[length]
        return _pick(rng, with_phrase), _pick(rng, sentence)
    if length == "bald":
        with_phrase = _pick(
            rng, (f"a bald head and {color} eyebrows", f"no hair and {color} brows")
        )
        sentence = _pick(
            rng,
            (
                f"They are bald, with {color} eyebrows.",
                f"The head is bald and the eyebrows are {color}.",
            ),
        )
    elif length == "short":
        with_phrase = _pick(
            rng, (f"short {color} hair", f"{color} hair cut short", f"a short {color} haircut")
        )
        sentence = _pick(
            rng, (f"Their hair is short and {color}.", f"They have short {color} hair.")
        )
    else:
        with_phrase = _pick(
            rng,
            (
                f"long {color} hair",
                f"{color} hair down to the shoulders",
                f"long, flowing {color} hair",
            ),
        )
        sentence = _pick(
            rng,
            (
                f"Their {color} hair is long and reaches the shoulders.",
                f"They have long {color} hair.",
            ),
        )
    return with_phrase, sentence


def _sentence_case(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text[0].upper() + text[1:]


def _third_person(verb_phrase: str) -> str:
    """Turn "they" verb phrases into singular ones: "are old" -> "is old", "have" -> "has"."""
    verb, _, rest = verb_phrase.partition(" ")
    verb = {"are": "is", "have": "has", "do": "does"}.get(verb, verb + "s")
    return f"{verb} {rest}"


def caption(
    attributes: dict[str, str], rng: np.random.Generator, mentioned: Collection[str] = ()
) -> str:
    """A varied English description that names nothing that is not drawn: every attribute, or
    only those in `mentioned` (the rest left unsaid, as a person describing a face would).

    Styles: one noun phrase with adjectives and "with" clauses, free sentences about "they",
    a mix of both, or a comma-separated tag list; clause order and synonyms are random.
    """
    said = set(mentioned or ATTRIBUTES)
    if unknown := said - set(ATTRIBUTES):
        raise ValueError(f"unknown attributes {sorted(unknown)}")
    hair = _hair_phrases(attributes, rng, said)
    background = attributes["background"] if "background" in said else None
    background_with = _pick(rng, _BACKGROUND_PHRASES).format(background)  # drawn even if unsaid
    names = [name for name in _PHRASES if name in said]
    style = rng.integers(4)
    if style == 1 and not names:
        style = 0  # the subject's sentence needs a verb phrase

    if style == 3:  # tag list
        tags = [_pick(rng, _PHRASES[name][attributes[name]]["with"]) for name in names]
        tags += [hair[0]] if hair else []
        tags += [f"{background} background"] if background else []
        order = rng.permutation(len(tags))
        return _sentence_case(", ".join(tags[i] for i in order) + ".")

    order = [names[i] for i in rng.permutation(len(names))]
    if style == 1:  # free sentences only, the first one naming the subject
        verb_phrases = [_pick(rng, _PHRASES[name][attributes[name]]["sentence"]) for name in order]
        subject = _pick(rng, ("This person", "The person shown", "The face in the picture"))
        rest = [f"They {phrase}." for phrase in verb_phrases[1:]]
        rest += [hair[1]] if hair else []
        rest += [_pick(rng, _BACKGROUND_SENTENCES).format(background)] if background else []
        rest = [rest[i] for i in rng.permutation(len(rest))]
        return " ".join([f"{subject} {_third_person(verb_phrases[0])}.", *rest])

    adjectives: list[str] = []
    withs: list[str] = []
    sentences: list[str] = []
    for name in order:
        phrases = _PHRASES[name][attributes[name]]
        slot = rng.integers(3 if style == 2 else 2)
        if slot == 0 and phrases["adjective"] and len(adjectives) < 3:
            adjectives.append(_pick(rng, phrases["adjective"]))
        elif slot == 2:
            sentences.append(f"They {_pick(rng, phrases['sentence'])}.")
        else:
            withs.append(_pick(rng, phrases["with"]))
    if hair:
        withs.insert(int(rng.integers(len(withs) + 1)), hair[0])
    subject = _article(" ".join(adjectives + [_pick(rng, _NOUNS)]))
    text = f"{_pick(rng, _OPENINGS)}{subject}"
    text += f" with {_join(withs)}" if withs else ""
    text += f" {background_with}." if background else "."
    sentences = [sentences[i] for i in rng.permutation(len(sentences))]
    return _sentence_case(" ".join([text, *sentences]))


def attribute_answer(name: str, value: str) -> str:
    """The answer text the model learns after the prompt "<name>:"; it is the value itself."""
    if value not in ATTRIBUTES.get(name, ()):
        raise ValueError(f"unknown attribute {name!r} or value {value!r}")
    return value
