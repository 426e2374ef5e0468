"""One model, many threads: every call returns what it returns alone, no call fails because
another holds KV-cache slots, and the pool is entirely free afterwards, also after a call
that raised part-way."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import facert

TEXTS = ["a smiling woman", "an old man with a beard"]


def _work(model, faces):
    """A mixed list of calls (drawing best-of-N, captions, multi-view and generate-mode
    attributes), each a zero-argument function returning something comparable."""
    calls = []
    for i, text in enumerate(TEXTS):
        calls.append(lambda t=text, i=i: [f.tobytes() for f in model.generate_faces(
            t, n=2, seed=i, candidates=2)])  # fmt: skip
    for face in faces:
        calls.append(lambda f=face: model.caption(f))
        calls.append(lambda f=face: model.caption(f, greedy=False, seed=11))
        calls.append(lambda f=face: model.attributes(f, "gender", views=4))
        calls.append(lambda f=face: model.attributes(f, "age", mode="generate"))
    return calls


@pytest.fixture(scope="module", params=["onnxruntime", "onnxruntime-graph"])
def model(request, tiny_model_dir):
    """Both decode paths of the embedded backend (the lock is the engine's, whatever the
    backend; the torch backend is the slow reference and adds nothing here)."""
    backend, _, decode = request.param.partition("-")
    return facert.load(
        tiny_model_dir, backend=backend, decode=decode or "auto", progress=False, num_slots=4
    )


def test_eight_threads_get_the_single_threaded_results(model):
    faces = model.generate_faces("a face", n=2, seed=7, candidates=1)
    calls = _work(model, faces)
    alone = [call() for call in calls]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda call: call(), calls * 2))
    assert together == alone * 2
    assert model.engine.idle


def test_a_call_that_raises_mid_drawing_frees_its_slots(model):
    expected = model.generate_faces("a smiling woman", n=2, seed=1, candidates=2)

    def stop_after(k):
        count = [0]

        def on_step(n):
            count[0] += n
            if count[0] >= k:
                raise KeyboardInterrupt  # a user pressing Ctrl-C in the middle of a drawing

        return on_step

    for k in (1, 100, 300):
        with pytest.raises(KeyboardInterrupt):
            model.generate_faces(
                "a smiling woman", n=2, seed=1, candidates=2, on_step=stop_after(k)
            )
        assert model.engine.idle
    again = model.generate_faces("a smiling woman", n=2, seed=1, candidates=2)
    assert all(np.array_equal(a, b) for a, b in zip(again, expected))


def test_bundled_model_at_default_settings_under_two_callers():
    """The probe's case: two threads on the bundled model at its defaults (best of 32
    drawings, 4 views) leaked slots until every later call failed."""
    m = facert.load(progress=False)
    face = m.generate_faces("a smiling woman with glasses", n=1, seed=2)[0]

    def draw():
        return m.generate_faces("a bald man with a beard", n=1, seed=4)[0].tobytes()

    def read():
        return m.attributes(face, list(m.config.attributes))

    alone = [draw(), read()]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(draw), pool.submit(read), pool.submit(read), pool.submit(draw)]
        together = [f.result() for f in futures]
    assert together == [alone[0], alone[1], alone[1], alone[0]]
    assert m.engine.idle
