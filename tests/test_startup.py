"""Quick start: every weight file is read at most once, and only the files a task needs.

A fresh process counts, with an audit hook, every open of a weight file while it loads the
bundled model and captions a face, then draws one: the default CPU path reads lm.safetensors
(hashed and kept for the fused kernel), vqgan.safetensors (hashed only) and the encoder's
weights once each at load, never the LM graphs' weights, and the decoder's only when it first
draws.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from facert.runtime.config import LM_FILE, load_weights, read_model

CHILD = """
import json, os, sys
opened = []
def count(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        name = os.path.basename(os.fsdecode(args[0]))
        if name.endswith((".safetensors", "_weights.bin")):
            opened.append(name)
sys.addaudithook(count)
import numpy as np
import facert
m = facert.load(progress=False)
after_load = list(opened)
m.caption(np.full((256, 256, 3), 128, np.uint8))
after_caption = list(opened)
m.generate_faces("a smiling woman", n=1, seed=0)
print(json.dumps([after_load, after_caption, opened]))
"""


def test_each_weight_file_is_read_at_most_once_and_only_when_needed():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    after_load, after_caption, after_drawing = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(after_load) == [
        "lm.safetensors", "vqgan.safetensors", "vqgan_encoder_weights.bin"
    ]  # fmt: skip
    assert after_caption == after_load  # a caption reads nothing more
    assert sorted(after_drawing) == sorted([*after_load, "vqgan_decoder_weights.bin"])


def test_weights_from_the_hashing_pass_equal_the_file(tiny_model_dir):
    """The bytes kept while hashing parse to the same tensors safetensors' own reader gives."""
    from safetensors.numpy import load_file

    files = read_model(tiny_model_dir, keep=(LM_FILE,))
    ours, theirs = files.weights(LM_FILE), load_file(str(tiny_model_dir / LM_FILE))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k].astype(np.float32))
    assert files.hash == read_model(tiny_model_dir).hash


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:4],  # shorter than the header length
        lambda b: (2**40).to_bytes(8, "little") + b[8:],  # header longer than the file
        lambda b: b[: len(b) // 2],  # tensors run past the end
        lambda b: b[:8] + b"[" + b[9:],  # header not a JSON object
    ],
)
def test_damaged_safetensors_bytes_are_a_clear_error(tiny_model_dir, damage):
    from facert.runtime.errors import ModelFileError

    data = bytearray(damage(bytes((tiny_model_dir / LM_FILE).read_bytes())))
    with pytest.raises(ModelFileError, match="corrupt or not a float32/float16 safetensors"):
        load_weights(data, "lm.safetensors")
