"""The public Python API on the converted fixture model (random weights: outputs are noise,
so these tests check contracts, reproducibility and task constraints, not quality)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import facert
from facert.runtime.errors import FacertError
from facert.runtime.images import load_rgb, model_input, to_uint8
from facert.runtime.sequence import GREEDY, SamplingParams

TEXT = (
    "This guy doesn't have any beard and has no fringe. He is in his middle age and has no smile."
)


def test_tokenizer_contract(any_model):
    assert any_model.tokenizer.encode("gender:") == [5907, 1024]


def test_generate_faces_shapes_and_seed_reproducibility(any_model):
    a = any_model.generate_faces(TEXT, n=2, seed=7)
    b = any_model.generate_faces(TEXT, n=1, seed=7)
    c = any_model.generate_faces(TEXT, n=1, seed=8)
    assert len(a) == 2 and all(f.shape == (256, 256, 3) and f.dtype == np.uint8 for f in a)
    assert np.array_equal(a[0], b[0])  # face i of a seed does not depend on n
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(b[0], c[0])


def _text_log_likelihood(m, codes: np.ndarray, words: list[int]) -> float:
    """log p(words | face) by one full forward without a cache: the caption template's prefix
    in segment 1, the words in segment 2, each scored by the logits before it."""
    t = m.templates
    prefix = [*t._head("to_caption"), *t._image_part(codes)]
    words = words[: m.config.lm.seq_length - len(prefix)]
    ids = prefix + words[:-1]
    segs = [1] * len(prefix) + [2] * (len(words) - 1)
    lo, hi = t.text_window
    logits = m.forward_logits(ids, segs)[len(prefix) - 1 :, lo:hi]  # (len(words), text vocab)
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return float(logp[np.arange(len(words)), np.array(words) - lo].sum())


def test_candidates_keep_the_drawing_that_explains_the_text_best(any_model):
    """Face i with K candidates: of the drawings of streams i*K..i*K+K-1 (each as plain
    sampling draws it), the one whose codes give the prompt's words the highest likelihood."""
    m, K, seed = any_model, 3, 11
    t = m.templates
    faces = m.generate_faces(TEXT, n=2, seed=seed, candidates=K)
    params = SamplingParams(seed=seed)
    for i, face in enumerate(faces):
        drawings = [t.to_image(TEXT, params, stream=i * K + k) for k in range(K)]
        m.engine.run(drawings)
        words = t.described_words(drawings[0])
        scores = [_text_log_likelihood(m, t.codes_of(d), words) for d in drawings]
        assert len(set(np.round(scores, 3))) == K  # distinct, so the pick is not a tie
        best = t.codes_of(drawings[int(np.argmax(scores))])
        assert np.array_equal(face, to_uint8(m.image_tokenizer.decode(best[None]))[0])
    one = m.generate_faces(TEXT, n=1, seed=seed, candidates=K)
    assert np.array_equal(one[0], faces[0])  # face i does not depend on n


def test_generation_steps_is_what_on_step_reports(any_model):
    for candidates in (1, 2):
        steps = []
        any_model.generate_faces(TEXT, n=2, seed=0, candidates=candidates, on_step=steps.append)
        assert sum(steps) == any_model.generation_steps(TEXT, 2, candidates)


def test_to_image_samples_only_image_codes_and_respects_top_k(any_model):
    m = any_model
    seq = m.templates.to_image(TEXT, SamplingParams(top_k=1, seed=0), 0)
    m.engine.run([seq])
    lm = m.config.lm
    assert len(seq.generated) == m.config.vqgan.num_codes_per_image
    assert all(lm.text_vocab_size <= t < lm.vocab_size for t in seq.generated)
    # top_k = 1 is greedy over the image window: check each step against a full forward.
    ids = np.concatenate([seq.prompt_ids, seq.generated])
    segs = np.concatenate([seq.prompt_segs, np.full(len(seq.generated), 2)])
    full = m.forward_logits(ids, segs)[len(seq.prompt_ids) - 1 : -1, lm.text_vocab_size :]
    np.testing.assert_array_equal(np.argmax(full, axis=1) + lm.text_vocab_size, seq.generated)


def test_to_image_prompt_is_cut_to_64_ids(any_model):
    seq = any_model.templates.to_image("word " * 100, SamplingParams(), 0)
    assert len(seq.prompt_ids) == 64 and seq.prompt_ids[0] == 101
    assert list(seq.prompt_ids[1:4]) == [2000, 3746, 102]  # "to image [SEP]"


def test_caption_is_greedy_text_until_sep(any_model, vq_golden):
    m = any_model
    image = to_uint8(vq_golden["images"][:1] / 2)[0]  # any RGB picture
    text = m.caption(image)
    assert text == m.caption(image)  # greedy is deterministic
    codes = m.image_tokenizer.encode([image])[0]
    seq = m.templates.to_caption(codes, GREEDY)
    m.engine.run([seq])
    assert all(0 <= t < m.config.lm.text_vocab_size for t in seq.generated)
    assert seq.generated[-1] == m.config.sep_id or len(seq.generated) == seq.max_new_tokens
    assert text == m.tokenizer.decode([t for t in seq.generated if t != m.config.sep_id])
    sampled = {m.caption(image, greedy=False, seed=s) for s in range(3)}
    assert m.caption(image, greedy=False, seed=1) == m.caption(image, greedy=False, seed=1)
    assert len(sampled) > 1


def test_caption_prompt_matches_reference_template(any_model, lm_golden):
    """The golden to_caption sequence (index 4) starts with our template for its image codes."""
    src = lm_golden["src4"]
    codes = src[5:261] - 30522
    seq = any_model.templates.to_caption(codes, GREEDY)
    np.testing.assert_array_equal(seq.prompt_ids, src[:262])


def test_attribute_prompt_matches_reference_template(any_model, lm_golden):
    src, seg = lm_golden["src5"], lm_golden["seg5"]
    codes = src[4:260] - 30522
    seq = any_model.templates.to_attribute(codes, "gender")
    n = len(seq.prompt_ids)
    np.testing.assert_array_equal(seq.prompt_ids, src[:n])
    np.testing.assert_array_equal(seq.prompt_segs, seg[:n])


def test_attribute_score_mode_probabilities(any_model, vq_golden):
    m = any_model
    image = to_uint8(vq_golden["images"][1:2] / 2)[0]
    result = m.attributes(image, "gender")
    g = result["gender"]
    assert g["value"] in ("male", "female")
    assert abs(sum(g["candidates"].values()) - 1) < 1e-9
    assert g["prob"] == max(g["candidates"].values())
    # Independent check with the full forward: log P(value [SEP] | prompt) per candidate.
    codes = m.image_tokenizer.encode([image])[0]
    logp = {}
    for value in ("male", "female"):
        cont = m.templates.candidate_ids(value)
        seq = m.templates.to_attribute(codes, "gender")
        ids = np.concatenate([seq.prompt_ids, cont])
        segs = np.concatenate([seq.prompt_segs, np.full(len(cont), 2)])
        logits = m.forward_logits(ids, segs)[len(seq.prompt_ids) - 1 : -1, :30522].astype(
            np.float64
        )
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        logp[value] = float(sum(logits[i, t] - lse[i] for i, t in enumerate(cont)))
    z = np.exp(np.array(list(logp.values())) - max(logp.values()))
    expected = dict(zip(logp, z / z.sum()))
    for v in expected:
        assert abs(g["candidates"][v] - expected[v]) < 1e-6


def test_score_mode_views_multiply_the_probabilities_of_each_view(any_model, vq_golden):
    # An independent implementation: each view drawn with OpenCV and read alone.
    import cv2

    m = any_model
    size = m.config.vqgan.resolution
    image = to_uint8(vq_golden["images"][1:2] / 2)[0]  # (H, W, 3)
    assert image.shape[:2] == (size, size)
    shift = size // m.config.vqgan.latent_size // 4

    def moved(dx: int) -> np.ndarray:
        right = np.float32([[1, 0, dx], [0, 1, 0]])
        return cv2.warpAffine(image, right, (size, size), borderMode=cv2.BORDER_REPLICATE)

    view_images = [image, np.ascontiguousarray(image[:, ::-1]), moved(shift), moved(-shift)]
    alone = [m.attributes(v, "gender", views=1)["gender"]["candidates"] for v in view_images]
    assert m.config.reading_views == 1  # converted checkpoints read the face alone by default
    assert m.attributes(image, "gender")["gender"]["candidates"] == alone[0]
    for n in (2, 4):
        got = m.attributes(image, "gender", views=n)["gender"]
        logp = np.array([sum(np.log(a[v]) for a in alone[:n]) for v in ("male", "female")])
        expected = np.exp(logp - logp.max()) / np.exp(logp - logp.max()).sum()
        np.testing.assert_allclose(list(got["candidates"].values()), expected, atol=1e-6)
        assert got["value"] == ("male", "female")[int(np.argmax(expected))]


def test_attribute_generate_mode_any_name(any_model, vq_golden):
    image = to_uint8(vq_golden["images"][:1] / 2)[0]
    out = any_model.attributes(image, ["age"], mode="generate")
    assert isinstance(out["age"]["value"], str) and 0 <= out["age"]["prob"] <= 1


def test_images_accepted_as_path_pil_and_array(any_model, tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "face.png")
    rgba = Image.fromarray(np.dstack([arr, np.full(arr.shape[:2], 9, np.uint8)]), "RGBA")
    codes = [
        any_model.image_tokenizer.encode(x)
        for x in ([tmp_path / "face.png"], Image.fromarray(arr), arr[None], [rgba])
    ]
    for c in codes[1:]:
        np.testing.assert_array_equal(c, codes[0])
    assert codes[0].shape == (1, 256) and codes[0].dtype == np.int64


def test_reference_scaling_is_double_2x_minus_1():
    px = np.array([[[[0, 128, 255]]]], dtype=np.uint8)  # (1, 1, 1, 3)
    x = model_input(px, 1, "reference")[:, :, 0, 0]
    np.testing.assert_allclose(x, 4 * px[0, 0].astype(float) / 255 - 3, atol=1e-6)
    x = model_input(px, 1, "taming")[:, :, 0, 0]
    np.testing.assert_allclose(x, 2 * px[0, 0].astype(float) / 255 - 1, atol=1e-6)


def test_decode_codes_roundtrip_range(any_model):
    imgs = any_model.image_tokenizer.decode(np.zeros((2, 256), dtype=np.int64))
    assert imgs.shape == (2, 3, 256, 256) and imgs.min() >= -1 and imgs.max() <= 1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.generate_faces("   "), "empty"),
        (lambda m: m.generate_faces("a face", n=0), "at least 1"),
        (lambda m: m.generate_faces("a face", top_p=2.0), "top_p"),
        (lambda m: m.generate_faces("a face", candidates=0), "candidates must be at least 1"),
        (lambda m: m.caption("/nonexistent/face.png"), "image not found"),
        (lambda m: m.caption(np.zeros((4, 4, 2), dtype=np.uint8)), "uint8 RGB"),
        (lambda m: m.caption(3.5), "unsupported image type"),
        (lambda m: m.attributes(np.zeros((8, 8, 3), np.uint8), "hair"), "unknown attribute"),
        (lambda m: m.attributes(np.zeros((8, 8, 3), np.uint8), ""), "no attribute names"),
        (lambda m: m.attributes(np.zeros((8, 8, 3), np.uint8), "gender", views=5), "views must be"),
        (lambda m: m.image_tokenizer.decode(np.zeros((1, 5), dtype=np.int64)), "codes must be"),
        (lambda m: m.image_tokenizer.decode(np.full((1, 256), 1024)), "codes must lie"),
        (lambda m: m.image_tokenizer.encode(np.zeros((1, 3, 8, 8), np.float32)), "already scaled"),
        (lambda m: m.forward_logits([1, 2], [1]), "equal-length"),
        (lambda m: m.forward_logits([99999], [1]), "ids must lie"),
    ],
)
def test_bad_input_raises_one_clear_error(any_model, call, message):
    with pytest.raises(FacertError, match=message):
        call(any_model)


def test_unreadable_image_file(any_model, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(FacertError, match="cannot read image"):
        any_model.caption(tmp_path / "x.png")


def test_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(FacertError, match="not a facert model directory"):
        facert.load(tmp_path)
    with pytest.raises(FacertError, match="unknown backend 'tensorflow'"):
        facert.load(tiny_model_dir, backend="tensorflow")


def test_load_rgb_resizes_bilinear():
    arr = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3) * 20
    out = load_rgb(arr, 4)
    ref = np.asarray(Image.fromarray(arr).resize((4, 4), Image.BILINEAR))
    np.testing.assert_array_equal(out, ref)
