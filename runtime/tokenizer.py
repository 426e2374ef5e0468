"""Talk2Face "text_image" text tokenizer: BERT uncased basic tokenization + WordPiece.

Reproduces TencentPretrain's BertTokenizer (the original Google BERT algorithm). The basic step is
pure Python because the `tokenizers` BertNormalizer/BertPreTokenizer differ from it on some inputs
(private-use characters dropped instead of kept, no final-sigma lowercasing, older Unicode tables);
only the WordPiece step, whose algorithm is identical, runs in the Rust `tokenizers` library.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence

from tokenizers import Encoding, Tokenizer, models

UNK_TOKEN = "[UNK]"
MAX_INPUT_CHARS_PER_WORD = 200
CONTINUATION_PREFIX = "##"
# Lone surrogates cannot be passed to Rust and match no vocab entry, so the original turns their
# word into [UNK]; a word over the length limit is [UNK] too and stands in for it.
_UNK_STAND_IN_WORD = "x" * (MAX_INPUT_CHARS_PER_WORD + 1)

# ASCII non-alphanumerics count as punctuation even where Unicode says otherwise (e.g. "$", "^").
_ASCII_PUNCTUATION_RANGES = ((33, 47), (58, 64), (91, 96), (123, 126))
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    # Only Cc/Cf, as in the original: unassigned (Cn) and private-use (Co) characters are kept.
    return char not in "\t\n\r" and unicodedata.category(char) in ("Cc", "Cf")


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    if any(lo <= cp <= hi for lo, hi in _ASCII_PUNCTUATION_RANGES):
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _strip_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def _split_on_punctuation(word: str) -> list[str]:
    pieces: list[str] = []
    run: list[str] = []
    for char in word:
        if _is_punctuation(char):
            if run:
                pieces.append("".join(run))
                run = []
            pieces.append(char)
        else:
            run.append(char)
    if run:
        pieces.append("".join(run))
    return pieces


def _is_utf8_encodable(word: str) -> bool:
    try:
        word.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def basic_tokenize(text: str) -> list[str]:
    """BERT BasicTokenizer with do_lower_case=True: clean, isolate CJK, lowercase, strip accents,
    split on whitespace and punctuation. Uses Python's unicodedata, like the original."""
    cleaned: list[str] = []
    for char in text:
        cp = ord(char)
        if cp == 0 or cp == 0xFFFD or _is_control(char):
            continue
        if _is_whitespace(char):
            cleaned.append(" ")
        elif _is_cjk(cp):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    pieces: list[str] = []
    # str.split() also splits on U+2028/U+2029, which cleaning keeps; the original does the same.
    # Lowercasing per word keeps Python's final-sigma rule in the same context as the original.
    for word in "".join(cleaned).split():
        pieces.extend(_split_on_punctuation(_strip_accents(word.lower())))
    return " ".join(pieces).split()


def load_vocab(vocab_path: str | os.PathLike) -> dict[str, int]:
    """TencentPretrain's loader: id = line number, token = first whitespace-separated field
    (a blank line keeps its raw text); a repeated token keeps its last line number."""
    token_to_id: dict[str, int] = {}
    with open(vocab_path, encoding="utf-8") as reader:
        for index, line in enumerate(reader):
            token = line.strip("\r\n").split()[0] if line.strip() else line.strip("\r\n")
            token_to_id[token] = index
    return token_to_id


class WordPieceTokenizer:
    """BERT uncased basic tokenization + WordPiece, identical to TencentPretrain's BertTokenizer
    (text_image tokenizer). No special tokens are added or protected: "[SEP]" -> "[", "sep", "]"."""

    def __init__(self, vocab_path: str | os.PathLike) -> None:
        self._token_to_id = load_vocab(vocab_path)
        if UNK_TOKEN not in self._token_to_id:
            raise ValueError(f"vocab {vocab_path} has no {UNK_TOKEN} entry")
        self._id_to_token = {i: tok for tok, i in self._token_to_id.items()}
        self._unk_id = self._token_to_id[UNK_TOKEN]
        self._wordpiece = Tokenizer(
            models.WordPiece(
                self._token_to_id,
                unk_token=UNK_TOKEN,
                continuing_subword_prefix=CONTINUATION_PREFIX,
                max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD,
            )
        )

    @property
    def vocab_size(self) -> int:
        """Number of text entries; image ids start right after (TencentPretrain's vocab_bias)."""
        return len(self._token_to_id)

    def _encode(self, text: str) -> Encoding:
        words = basic_tokenize(text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            words = [w if _is_utf8_encodable(w) else _UNK_STAND_IN_WORD for w in words]
        return self._wordpiece.encode(words, is_pretokenized=True, add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        """Wordpiece ids of `text`, without special tokens."""
        return self._encode(text).ids

    def tokens(self, text: str) -> list[str]:
        """Wordpiece strings of `text`."""
        return self._encode(text).tokens

    def id_to_token(self, i: int) -> str:
        """Raises KeyError for ids outside the text vocabulary (e.g. image ids)."""
        return self._id_to_token[i]

    def token_to_id(self, tok: str) -> int:
        """Unknown tokens map to the [UNK] id, as in TencentPretrain's convert_tokens_to_ids."""
        return self._token_to_id.get(tok, self._unk_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to words: "##" pieces glued onto the previous piece, pieces joined by spaces."""
        words: list[str] = []
        for i in ids:
            token = self.id_to_token(i)
            if token.startswith(CONTINUATION_PREFIX) and words:
                words[-1] += token[len(CONTINUATION_PREFIX) :]
            else:
                words.append(token)
        return " ".join(words)
