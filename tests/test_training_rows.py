"""Training rows are what inference computes: a packed attribute row gives every question the
same log-probabilities as its own unpacked row under the runtime's prefix mask; a step's
reading rows are about the faces its drawing rows draw."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

import facert  # noqa: E402
from facert.export.lm import Talk2FaceLM, prefix_mask_bias  # noqa: E402
from facert.export.train.sequences import (  # noqa: E402
    IGNORE,
    attribute_row,
    caption_row,
    collate,
    group_mask_bias,
)
from facert.runtime.config import VOCAB_FILE, load_config  # noqa: E402
from facert.runtime.tasks import Templates  # noqa: E402
from facert.runtime.tokenizer import WordPieceTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def bundled():
    config = load_config(facert.BUNDLED_MODEL)
    lm = Talk2FaceLM(config.lm)
    lm.load_state_dict(load_file(str(facert.BUNDLED_MODEL / "lm.safetensors")))
    lm.eval()
    return lm, Templates(config, WordPieceTokenizer(facert.BUNDLED_MODEL / VOCAB_FILE))


def _target_logprobs(lm, rows, window, length, mask):
    """Log-probability of each target id, in row order: (N,)."""
    ids, segs, positions, groups, targets = collate(rows, window[0], length)
    with torch.no_grad():
        h = lm.hidden(ids, segs, positions, mask(segs, groups))  # (B, T, C)
        keep = targets != IGNORE
        logp = lm.logits(h[keep], window).log_softmax(-1)  # (N, W)
    return logp.gather(1, targets[keep][:, None])[:, 0]


def test_packed_attribute_questions_score_like_separate_rows(bundled):
    lm, t = bundled
    codes = np.random.default_rng(0).integers(0, t.config.vqgan.n_embed, 64)
    answers = {"age": "middle-aged", "beard": "yes", "hair color": "red", "expression": "smiling"}
    packed = attribute_row(t, codes, answers)
    singles = [attribute_row(t, codes, {name: value}) for name, value in answers.items()]
    assert len(packed.ids) < sum(len(r.ids) for r in singles)
    assert sum(r.targets.count(IGNORE) < len(r.targets) for r in singles) == len(answers)
    got = _target_logprobs(lm, [packed], t.text_window, 112, group_mask_bias)
    want = torch.cat(
        [
            _target_logprobs(lm, [r], t.text_window, len(r.ids), lambda s, g: prefix_mask_bias(s))
            for r in singles
        ]
    )
    assert got.shape == want.shape == (sum(len(t.candidate_ids(v)) for v in answers.values()),)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_group_mask_is_the_prefix_mask_for_unpacked_rows(bundled):
    _, t = bundled
    codes = np.random.default_rng(1).integers(0, t.config.vqgan.n_embed, 64)
    rows = [caption_row(t, codes, "A smiling person."), attribute_row(t, codes, {"beard": "no"})]
    _, segs, _, groups, _ = collate(rows, 0, 96)
    queries = segs > 0  # padding queries are never read
    assert torch.equal(
        group_mask_bias(segs, groups)[:, 0][queries], prefix_mask_bias(segs)[:, 0][queries]
    )


def test_reading_rows_read_the_faces_their_drawing_rows_draw(bundled):
    from facert.export.train.lm import make_rows

    _, t = bundled
    rng = np.random.default_rng(2)
    codes = rng.integers(0, t.config.vqgan.n_embed, (5, 64))
    attributes = [{k: str(rng.choice(v)) for k, v in t.config.attributes.items()} for _ in codes]
    indices = [3, 0, 4]
    image, text, answers = make_rows(t, codes, attributes, indices, step=7, text_faces=2)
    assert (len(image), len(text), len(answers)) == (3, 2, 2)
    image_ids = codes + t.config.lm.text_vocab_size  # (5, 64) as LM ids
    for k, i in enumerate(indices):
        assert image[k].ids[-64:] == image_ids[i].tolist()  # draws face i
    for k, i in enumerate(indices[:2]):
        assert _contains(text[k].ids, image_ids[i].tolist())  # captions face i
        assert _contains(answers[k].ids, image_ids[i].tolist())  # answers about face i


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[s : s + len(part)] == part for s in range(len(ids) - len(part) + 1))
