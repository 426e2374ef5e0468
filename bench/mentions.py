"""Which attribute values a caption mentions, synonyms allowed: caption recall in
`facert bench quality`. Torch-free.

The phrases are the synthetic generator's wording of each value (tests/test_bundled.py checks
that every generated caption reads back exactly its own attributes). Matching is on whole BERT
basic tokens, so "middle-aged" and the model's "middle - aged" match the same phrase and
"no hair" does not match inside "no facial hair".
"""

from __future__ import annotations

from facert.runtime.tokenizer import basic_tokenize

HAIR_COLORS = {
    "black": ["black"],
    "brown": ["brown"],
    "blond": ["blond", "blonde"],
    "red": ["red", "ginger"],
    "grey": ["grey", "gray", "silver"],
}
BACKGROUNDS = ["blue", "green", "purple", "pink", "white"]

PHRASES: dict[str, dict[str, list[str]]] = {
    "expression": {
        "smiling": ["smiling", "cheerful", "smile", "smiles", "happy"],
        "neutral": ["serious", "straight-faced", "expressionless", "neutral expression",
                    "straight, closed mouth", "straight face"],
        "surprised": ["surprised", "astonished", "surprise", "open mouth and raised eyebrows"],
    },
    "hair color": HAIR_COLORS,
    "hair length": {
        "short": ["short"],
        "long": ["long", "down to the shoulders"],
        "bald": ["bald", "no hair"],
    },
    "eyewear": {
        "none": ["no eyewear", "bare eyes", "not wear any eyewear"],
        "glasses": ["bespectacled", "glasses", "spectacles", "eyeglasses"],
        "sunglasses": ["sunglasses", "shades"],
    },
    "beard": {
        "no": ["clean-shaven", "no facial hair"],
        "yes": ["beard", "bearded"],
    },
    "age": {
        "young": ["young", "youthful"],
        "middle-aged": ["middle-aged", "middle age"],
        "old": ["old", "elderly", "wrinkled", "wrinkles"],
    },
    "skin tone": {
        "light": ["light-skinned", "pale-skinned", "light skin", "pale skin"],
        "medium": ["medium-skinned", "olive-skinned", "medium skin", "olive skin", "tan skin"],
        "dark": ["dark-skinned", "dark skin"],
    },
    "background": {c: [c] for c in BACKGROUNDS},
}  # fmt: skip


def _contains(tokens: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return any(tokens[i : i + n] == phrase for i in range(len(tokens) - n + 1))


def mentioned(text: str) -> dict[str, set[str]]:
    """Attribute -> the values a text mentions (empty set: the attribute is not mentioned)."""
    tokens = basic_tokenize(text)
    found: dict[str, set[str]] = {}
    for name, values in PHRASES.items():
        found[name] = {
            value
            for value, phrases in values.items()
            if any(_contains(tokens, basic_tokenize(p)) for p in phrases)
        }
    return found


def recall(text: str, attributes: dict[str, str]) -> dict[str, bool]:
    """Per attribute: does the text name the true value and no other value of it?"""
    found = mentioned(text)
    return {name: found[name] == {value} for name, value in attributes.items()}
