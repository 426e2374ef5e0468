"""One memory measurement in a fresh process, so that peaks do not mix (`facert bench memory`).

python -m facert.bench.memory_probe KIND MODEL_DIR BATCH NEW_TOKENS THREADS
KIND is BACKEND:PRECISION, transformers, genai or reference. Prints one JSON line: resident
memory after the imports, after loading, the peak over the whole run (Linux: /proc and
getrusage), and the KV-cache bytes the contestant holds. The reference keeps no cache; its
peak comes from its longest forwards, so it runs the last steps of a full-length sequence.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(kind: str, model_dir: Path, batch: int, new_tokens: int, threads: int | None) -> dict:
    from .contestants import make

    if kind == "reference":
        from .reference import Reference, generate

        imports = _rss_mb()
        ref = Reference(model_dir)
        loaded = _rss_mb()
        steps = 2
        n = ref.config.lm.seq_length - steps
        ids = np.random.default_rng(0).integers(0, ref.config.lm.vocab_size, n)
        generate(ref.backend.lm, ids, np.ones(n, dtype=np.int64), steps)
        name, kv = ref.name, 0
    else:
        imports = _rss_mb()
        c = make(kind, model_dir, threads, slots=batch)
        if isinstance(c, str):
            return {"kind": kind, "skipped": c}
        loaded = _rss_mb()
        c.generate(batch, 0, new_tokens)
        name, kv = c.name, c.kv_bytes()
    return {"kind": kind, "contestant": name, "batch": batch, "imports_mb": imports,
            "loaded_mb": loaded, "peak_mb": _peak_mb(), "kv_mb": kv / 2**20}  # fmt: skip


if __name__ == "__main__":
    kind, model_dir, batch, new_tokens, threads = sys.argv[1:6]
    result = measure(kind, Path(model_dir), int(batch), int(new_tokens), int(threads) or None)
    print(json.dumps(result))
