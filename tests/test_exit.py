"""A process that ends while its models are busy exits cleanly.

The engine thread is a daemon thread that calls into ONNX Runtime (the VQGAN encoder, the
lm_decode graph), whose Python binding lets go of the GIL during a call. CPython ends a daemon
thread that wants the GIL back after finalization has begun with pthread_exit, and that unwind
through the binding's C++ frames aborts the process ("terminate called without an active
exception", status 134). So every model's engine thread must have stopped before then: the
model's exit hook closes it (finishing what was admitted) while the interpreter still runs.
"""

from __future__ import annotations

import subprocess
import sys

BUSY_AT_EXIT = """
import time
import facert
from facert.export.synthetic import make_face

fused, graph = facert.load(), facert.load(decode="graph")
faces = [make_face(5, i, 64).image for i in range(6)]
futures = [graph.submit("generate_faces", "a smiling woman", n=2, seed=0, candidates=1)]
futures += [m.submit("attributes", f, "age,expression") for f in faces for m in (fused, graph)]
time.sleep(0.5)
assert not all(f.done() for f in futures), "the engines finished before the exit"
print("exiting with requests in flight", flush=True)
"""


def test_exit_while_engine_threads_are_inside_onnxruntime_calls(tmp_path):
    done = subprocess.run([sys.executable, "-c", BUSY_AT_EXIT], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert "terminate called" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exiting with requests in flight" in done.stdout
