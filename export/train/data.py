"""The synthetic data every training script and the quality evaluation agree on. torch-free.

Faces come from `facert.export.synthetic` by (dataset seed, index). Training uses TRAIN_SEED
only; EVAL_SEED and VALID_SEED are never drawn during training, so their faces are unseen (the
nuisance draws differ even when the attributes repeat). Captions are drawn afresh every time a
face is used: one face, many phrasings.
"""

from __future__ import annotations

import numpy as np

from facert.export.synthetic import ATTRIBUTES, attribute_answer, caption, make_face

TRAIN_SEED = 0
EVAL_SEED = 1
# Monitoring during training, and confirming on faces nobody tuned on the settings chosen on
# EVAL_SEED's (reading views, drawings per face): neither training nor evaluation draws it.
VALID_SEED = 2
CAPTION_SEED = 7  # captions of training faces: rng([CAPTION_SEED, epoch, index])

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PROMPTS = {"to_image": "to image", "to_caption": "to caption", "to_attributes": "to attributes"}
VOCAB_CAPTIONS = 20000  # captions scanned for words; every word of the generator shows up


def faces(seed: int, indices: range, size: int) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Faces `indices` of dataset `seed` -> (uint8 [N, size, size, 3], their attributes)."""
    drawn = [make_face(seed, i, size) for i in indices]
    return np.stack([f.image for f in drawn]), [f.attributes for f in drawn]


def caption_of(
    attributes: dict[str, str], epoch: int, index: int, mentioned: tuple[str, ...] = ()
) -> str:
    """A training caption of face `index`, different in every epoch; of every attribute, or of
    those `mentioned` only."""
    return caption(attributes, np.random.default_rng([CAPTION_SEED, epoch, index]), mentioned)


def attribute_values() -> dict[str, list[str]]:
    """Attribute name -> answers as the model writes them (ModelConfig.attributes)."""
    return {name: [attribute_answer(name, v) for v in vals] for name, vals in ATTRIBUTES.items()}


def vocabulary() -> list[str]:
    """A small BERT-style vocabulary: the special tokens, then every word (after BERT basic
    tokenization) of the prompts, attribute questions and answers and generated captions."""
    from facert.export.synthetic import sample_attributes
    from facert.runtime.tokenizer import basic_tokenize

    words: set[str] = set()
    texts = [*PROMPTS.values()]
    texts += [f"{name}: {value}" for name, values in attribute_values().items() for value in values]
    rng = np.random.default_rng(0)
    texts += [caption(sample_attributes(rng), rng) for _ in range(VOCAB_CAPTIONS)]
    for text in texts:
        words.update(basic_tokenize(text))
    return [*SPECIAL_TOKENS, *sorted(words)]
