"""The three Talk2Face tasks: their templates, vocabulary windows and how to read results.

This is the only place that knows what "to caption" means. Templates (TencentPretrain's
generate_talk2face script):
  to_image       [CLS] to image [SEP] text [SEP]            all segment 1, cut to 64 ids
  to_caption     [CLS] to caption [SEP] image codes [SEP]   all segment 1
  to_attributes  [CLS] to attributes [SEP] image codes [SEP] + "name :" in segment 2
Unlike the reference, generation is restricted to the ids a task can use (image codes or text),
and text stops at the first [SEP] id rather than at the substring "102".
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import FacertError, InvalidArgument
from .sequence import GREEDY, SamplingParams, Sequence
from .tokenizer import WordPieceTokenizer


class Templates:
    def __init__(self, config: ModelConfig, tokenizer: WordPieceTokenizer):
        self.config, self.tokenizer = config, tokenizer
        lm = config.lm
        self.image_window = (lm.text_vocab_size, lm.vocab_size)
        self.text_window = (0, lm.text_vocab_size)
        self.prompt_ids = {task: tokenizer.encode(text) for task, text in config.prompts.items()}

    def _head(self, task: str) -> list[int]:
        c = self.config
        return [c.cls_id, *self.prompt_ids[task], c.sep_id]

    def _image_part(self, codes: np.ndarray) -> list[int]:
        return [int(c) + self.config.lm.text_vocab_size for c in codes] + [self.config.sep_id]

    def _room(self, prompt_len: int) -> int:
        """Tokens left before the reference's total length (seq_length)."""
        room = min(self.config.lm.seq_length, self.config.lm.max_positions) - prompt_len
        if room < 1:
            raise InvalidArgument(f"a prompt of {prompt_len} ids leaves no room to generate")
        return room

    def to_image(
        self,
        text: str,
        params: SamplingParams,
        stream: int,
        kept: np.ndarray | None = None,
    ) -> Sequence:
        """Draw a face's codes from a text. With `kept` codes (an edit: the first rows of an
        existing face), they follow the prompt in segment 2, exactly as if the model had drawn
        them itself, and only the rest of the face is drawn."""
        if not text or not text.strip():
            raise InvalidArgument("the text to draw a face from is empty")
        words = self.tokenizer.encode(text)
        if not words:
            raise InvalidArgument(f"the text {text!r} has no words the model knows")
        ids = ([*self._head("to_image"), *words, self.config.sep_id])[: self.config.max_text_ids]
        n_codes = self.config.vqgan.num_codes_per_image
        if self._room(len(ids)) < n_codes:
            raise FacertError(f"the model's sequence length cannot hold {n_codes} image codes")
        kept_ids = [] if kept is None else [int(c) + self.config.lm.text_vocab_size for c in kept]
        return Sequence(
            prompt_ids=np.array(ids + kept_ids, dtype=np.int64),
            prompt_segs=np.array([1] * len(ids) + [2] * len(kept_ids), dtype=np.int64),
            window=self.image_window,
            max_new_tokens=n_codes - len(kept_ids),
            params=params,
            stream=stream,
            image_span=(len(ids), len(ids) + len(kept_ids)),
        )

    def place_codes(self, seq: Sequence, codes: np.ndarray) -> None:
        """Write a face's codes (the first ones, as many as the prompt holds) into the prompt
        positions a template left for them."""
        start, stop = seq.image_span
        seq.prompt_ids[start:stop] = codes[: stop - start] + self.config.lm.text_vocab_size

    def image_codes(self, seq: Sequence) -> np.ndarray:
        """The codes a prompt holds at its image span (what place_codes wrote)."""
        start, stop = seq.image_span
        return seq.prompt_ids[start:stop] - self.config.lm.text_vocab_size

    def codes_of(self, seq: Sequence) -> np.ndarray:
        """A drawing's image codes: any kept in its prompt (segment 2), then those drawn."""
        kept = seq.prompt_ids[seq.prompt_segs == 2]
        return np.array([*kept, *seq.generated], dtype=np.int64) - self.config.lm.text_vocab_size

    def described_words(self, drawing: Sequence) -> list[int]:
        """The text ids a to_image sequence drew from, with its [SEP] unless the text was cut."""
        text = drawing.prompt_segs == 1
        return [int(i) for i in drawing.prompt_ids[text][len(self._head("to_image")) :]]

    def to_description_score(self, codes: np.ndarray, words: list[int]) -> Sequence:
        """How well a face matches a text: the caption template on the face's codes,
        teacher-forced with the text's ids (as many as the room allows); the sum of its
        logprobs is log p(text | face)."""
        ids = [*self._head("to_caption"), *self._image_part(codes)]
        forced = words[: self._room(len(ids))]
        return self._text_sequence(ids, np.ones(len(ids), dtype=np.int64), GREEDY, 0, forced)

    def to_caption(self, codes: np.ndarray, params: SamplingParams, stream: int = 0) -> Sequence:
        ids = [*self._head("to_caption"), *self._image_part(codes)]
        seq = self._text_sequence(ids, np.ones(len(ids), dtype=np.int64), params, stream)
        seq.image_span = self._image_span("to_caption", codes)
        return seq

    def _image_span(self, task: str, codes: np.ndarray) -> tuple[int, int]:
        start = len(self._head(task))
        return start, start + len(codes)

    def to_attribute(
        self,
        codes: np.ndarray,
        name: str,
        params: SamplingParams = GREEDY,
        forced: list[int] | None = None,
    ) -> Sequence:
        """The attribute template; with `forced`, a teacher-forced continuation to score."""
        question = self.tokenizer.encode(f"{name}:")
        if not question:
            raise InvalidArgument(f"attribute name {name!r} has no words the model knows")
        prefix = [*self._head("to_attributes"), *self._image_part(codes)]
        ids = prefix + question
        segs = np.array([1] * len(prefix) + [2] * len(question), dtype=np.int64)
        seq = self._text_sequence(ids, segs, params, 0, forced)
        seq.shared_prefix = len(prefix)  # every question about this face starts the same
        seq.image_span = self._image_span("to_attributes", codes)
        return seq

    def _text_sequence(
        self, ids: list[int], segs: np.ndarray, params: SamplingParams, stream: int, forced=None
    ) -> Sequence:
        room = self._room(len(ids))
        if forced is not None and len(forced) > room:
            raise InvalidArgument("candidate answer is longer than the room left in the sequence")
        return Sequence(
            prompt_ids=np.array(ids, dtype=np.int64),
            prompt_segs=segs,
            window=self.text_window,
            max_new_tokens=room,
            params=params,
            stop_id=self.config.sep_id,
            forced=forced,
            stream=stream,
        )

    def text_of(self, seq: Sequence) -> str:
        """Generated ids up to (not including) the first [SEP], as words."""
        ids = seq.generated
        if self.config.sep_id in ids:
            ids = ids[: ids.index(self.config.sep_id)]
        return self.tokenizer.decode(ids)

    def candidate_ids(self, value: str) -> list[int]:
        """An attribute answer as the model would write it: wordpieces then [SEP]."""
        return [*self.tokenizer.encode(value), self.config.sep_id]
