"""WordPieceTokenizer must match TencentPretrain's BertTokenizer on any text.

The oracle below is a deliberately plain, independent re-statement of the original algorithm
(Google BERT BasicTokenizer + WordpieceTokenizer as used by TencentPretrain). Note that the
original's control-character rule is category Cc or Cf only, not every "C*" category.
"""

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facert.runtime.tokenizer import WordPieceTokenizer

from .conftest import T2F, VOCAB

VOCAB_PATH = VOCAB
META_PATH = T2F / "meta.json"


# ---------------------------------------------------------------- reference oracle


def ref_load_vocab(path):
    vocab = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f):
            fields = line.split()
            vocab[fields[0] if fields else line.rstrip("\r\n")] = line_number
    return vocab


def ref_is_whitespace(ch):
    return ch == " " or ch == "\t" or ch == "\n" or ch == "\r" or unicodedata.category(ch) == "Zs"


def ref_is_control(ch):
    if ch == "\t" or ch == "\n" or ch == "\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def ref_is_punctuation(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch)[0] == "P"


def ref_is_cjk(cp):
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def ref_basic_tokens(text):
    cleaned = ""
    for ch in text:
        if ord(ch) in (0, 0xFFFD) or ref_is_control(ch):
            continue
        cleaned += " " if ref_is_whitespace(ch) else ch
    spaced = ""
    for ch in cleaned:
        spaced += " " + ch + " " if ref_is_cjk(ord(ch)) else ch
    split_tokens = []
    for token in spaced.strip().split():
        token = token.lower()
        token = "".join(
            ch for ch in unicodedata.normalize("NFD", token) if unicodedata.category(ch) != "Mn"
        )
        groups = []
        new_group = True
        for ch in token:
            if ref_is_punctuation(ch):
                groups.append([ch])
                new_group = True
            else:
                if new_group:
                    groups.append([])
                new_group = False
                groups[-1].append(ch)
        split_tokens.extend("".join(g) for g in groups)
    return " ".join(split_tokens).strip().split()


def ref_wordpiece(word, vocab):
    if len(word) > 200:
        return ["[UNK]"]
    pieces = []
    start = 0
    while start < len(word):
        end = len(word)
        found = None
        while end > start:
            candidate = word[start:end] if start == 0 else "##" + word[start:end]
            if candidate in vocab:
                found = candidate
                break
            end -= 1
        if found is None:
            return ["[UNK]"]
        pieces.append(found)
        start = end
    return pieces


def ref_tokens(text, vocab):
    return [piece for word in ref_basic_tokens(text) for piece in ref_wordpiece(word, vocab)]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    return WordPieceTokenizer(VOCAB_PATH)


@pytest.fixture(scope="module")
def ref_vocab():
    return ref_load_vocab(VOCAB_PATH)


def assert_matches_reference(tokenizer, ref_vocab, text):
    expected = ref_tokens(text, ref_vocab)
    assert tokenizer.tokens(text) == expected
    assert tokenizer.encode(text) == [ref_vocab[t] for t in expected]


# ---------------------------------------------------------------- known examples


def test_vocab_layout(tokenizer):
    assert tokenizer.vocab_size == 30522
    ids = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "the": 1996}
    for token, i in ids.items():
        assert tokenizer.token_to_id(token) == i
        assert tokenizer.id_to_token(i) == token
    assert tokenizer.id_to_token(30521) == "##～"
    assert tokenizer.token_to_id("not-a-vocab-entry") == 100
    with pytest.raises(KeyError):
        tokenizer.id_to_token(30522)


def test_meta_examples(tokenizer, ref_vocab):
    examples = json.loads(META_PATH.read_text(encoding="utf-8"))["tokenized"]
    assert examples
    for text, ids in examples.items():
        assert tokenizer.encode(text) == ids, text
        assert [ref_vocab[t] for t in ref_tokens(text, ref_vocab)] == ids, text


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("to image", [2000, 3746]),
        ("to caption", [2000, 14408, 3258]),
        ("to attributes", [2000, 12332]),
        ("gender: ", [5907, 1024]),
        ("", []),
        (" \t\r\n ", []),
    ],
)
def test_spec_examples(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids


def test_special_tokens_are_not_protected(tokenizer):
    assert tokenizer.tokens("[SEP] [cls]") == ["[", "sep", "]", "[", "cl", "##s", "]"]


@pytest.mark.parametrize(
    "text",
    [
        "ΟΔΟΣ ΟΔΟΣ.",  # Python lowercases a final capital sigma to "ς"
        "a\ue000b \U000f0000",  # private-use characters are kept (-> [UNK]), not dropped
        "x\u0378y",  # unassigned code point is kept
        "a\u2028b\u2029c\x85d\x0be",  # line/paragraph separators split, C0/C1 controls vanish
        "İstanbul ǅ ß ﬁ Å",  # lowercase expansion, titlecase, ligature, angstrom
        "a\u200bb\ufeffc\u00adD\ufffde\x00f",  # Cf characters, U+FFFD and NUL are removed
        "e\u0301 \u0301 \u0301\u0301",  # lone combining marks disappear
        "naïve—“quoted”…¿qué? ¡sí! ﹏ ＄",  # Unicode punctuation categories
        "中文abc漢字 㐀 𠀀 가나다 ひらがな",  # CJK isolated; Hangul and kana are not
        "a" * 200 + " " + "a" * 201 + " " + "ß" * 150,  # the 200-char limit counts chars
        "2023-04-01 12:30 $5^2 `x` ~y|z",  # ASCII symbols outside Unicode P* are punctuation
        "🙂👍🏽 x🙂y",
        "a\ud800b c \udfff \ud83d\ude42",  # lone surrogates are kept (-> [UNK])
    ],
)
def test_tricky_inputs(tokenizer, ref_vocab, text):
    assert_matches_reference(tokenizer, ref_vocab, text)


# ---------------------------------------------------------------- property tests

ASCII_WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
PUNCTUATION = st.sampled_from(list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + list("¡¿–—‘’“”…·«»、。"))
ACCENTED = st.sampled_from(list("áàâäãåçéèêëíìîïñóòôöõúùûüýÿÁÉÍÓÚÑÇÜØæœßİıǅﬁΣσς") + ["e\u0301"])
CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF) | st.characters(
    min_codepoint=0x20000, max_codepoint=0x2A6DF
)
# Controls, format characters, U+FFFD, private use, unassigned and lone surrogates.
CONTROL = st.sampled_from(
    list("\x00\x07\x0b\x0c\x1f\x7f\x85\u200b\u200d\ufeff\ufffd\ue000\u0378\ud800\udfff")
)
EMOJI = st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)
WHITESPACE = st.sampled_from(list(" \t\n\r\u00a0\u2003\u3000\u2028\u2029\u1680"))
MIXED_TEXT = st.lists(
    st.one_of(ASCII_WORDS, PUNCTUATION, ACCENTED, CJK, CONTROL, EMOJI, WHITESPACE), max_size=40
).map("".join)

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(text=st.text())
def test_arbitrary_unicode_matches_reference(tokenizer, ref_vocab, text):
    assert_matches_reference(tokenizer, ref_vocab, text)


@PROPERTY_SETTINGS
@given(text=MIXED_TEXT)
def test_mixed_text_matches_reference(tokenizer, ref_vocab, text):
    assert_matches_reference(tokenizer, ref_vocab, text)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        ("to caption", "to caption"),
        ("A smiling woman with wavy blond hair", "a smiling woman with wavy blond hair"),
        ("doesn't", "doesn ' t"),
        ("earrings!", "earrings !"),
    ],
)
def test_decode_merges_continuation_pieces(tokenizer, text, decoded):
    assert tokenizer.decode(tokenizer.encode(text)) == decoded


def test_decode_keeps_leading_continuation_piece(tokenizer):
    ids = [tokenizer.token_to_id("##ion"), tokenizer.token_to_id("to")]
    assert tokenizer.decode(ids) == "##ion to"


def test_every_code_point_matches_reference(tokenizer, ref_vocab):
    """Each Unicode code point (surrogates included) between two letters, where whitespace,
    punctuation, control, CJK, accent and case rules all show, in blocks: the claim 'verified
    on every code point' is this test."""
    block = 8192
    for start in range(0, 0x110000, block):
        chars = [chr(cp) for cp in range(start, min(start + block, 0x110000))]
        text = " ".join(f"a{c}b" for c in chars)
        assert tokenizer.encode(text) == [ref_vocab[t] for t in ref_tokens(text, ref_vocab)], (
            f"code points {start:#x}..{start + block - 1:#x}"
        )
