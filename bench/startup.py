"""`facert bench startup`: time from process start to the first answer, in fresh processes.

Each run starts a new Python process that imports facert, loads the model (its exported graphs
already present: the first run of a config, untimed, exports them if need be) and captions one
face; the clock runs from just before the process is started until its answer is back, so the
interpreter's own start-up counts. Inside, an audit hook counts how often each weight file
(`*.safetensors`, `*_weights.bin`) is opened: each must be read at most once. For the bundled
model the `facert caption` command itself is timed the same way.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .models import BenchModel, label
from .report import machine_line, model_table

TARGET_S = {"bundled": 1.5, "base-random": 4.0}  # process start -> first caption

CHILD = """
import json, os, resource, sys, time
opened = {}
def count(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        name = os.path.basename(os.fsdecode(args[0]))
        if name.endswith((".safetensors", "_weights.bin")):
            opened[name] = opened.get(name, 0) + 1
sys.addaudithook(count)
start = time.perf_counter()
import facert
imported = time.perf_counter()
model_dir, backend, precision, image = sys.argv[1:5]
m = facert.load(model_dir, backend=backend, precision=precision, progress=False)
loaded = time.perf_counter()
words = m.caption(image).split()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported,
                  "caption_s": time.perf_counter() - loaded, "words": len(words),
                  "opened": opened,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _face(directory: Path) -> Path:
    path = directory / "face.png"
    rgb = np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    # from the temporary directory: a checkout's top-level packages must not shadow installed ones
    done = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:3])} failed: {done.stderr.strip()[-2000:]}")
    return seconds, done.stdout


def run(
    model: BenchModel,
    configs: list[tuple[str, str]],
    runs: int = 5,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        face = _face(Path(tmp))
        for config in configs:
            cases = {"facert.load + caption": [sys.executable, "-c", CHILD, str(model.path),
                                               *config, str(face)]}  # fmt: skip
            if model.name == "bundled" and config[0] == "onnxruntime":
                cases["facert caption (CLI)"] = [sys.executable, "-m", "facert.cli", "caption",
                                                 "--precision", config[1], str(face)]  # fmt: skip
            for case, command in cases.items():
                _timed(command)  # untimed: exports graphs if need be, warms the page cache
                walls, details = [], []
                desc = f"startup {model.name} {':'.join(config)} {case}"
                for _ in tqdm(range(runs), desc=desc, disable=not progress):
                    seconds, stdout = _timed(command)
                    walls.append(seconds)
                    if case.startswith("facert.load"):
                        details.append(json.loads(stdout.strip().splitlines()[-1]))
                row = {"contestant": label(config), "config": ":".join(config), "case": case,
                       "runs": runs,
                       "wall_s_min": min(walls), "wall_s_median": statistics.median(walls),
                       "target_s": TARGET_S.get(model.name)}  # fmt: skip
                if details:
                    for k in ("import_s", "load_s", "caption_s", "max_rss_mib"):
                        row[k] = statistics.median(d[k] for d in details)
                    row["words"] = details[0]["words"]
                    row["max_opens"] = max(max(d["opened"].values(), default=0) for d in details)
                    row["opened"] = details[0]["opened"]
                out.append(row)
    return {"model": model.name, "path": str(model.path), "rows": out,
            "load_average": os.getloadavg()}  # fmt: skip


def markdown(result: dict) -> str:
    lines = [
        "### startup: process start to the first answer\n",
        machine_line(result["machine"]),
        "",
        "Fresh processes, graphs already exported; wall time from starting the process to its "
        "caption (the interpreter's start-up included), median and min of the runs; inside the "
        "load+caption process: import, load and caption time (medians), peak RSS, and how often "
        "the most-opened weight file was opened (target: at most once).",
    ]
    head = ["config", "case", "median s", "min s", "target s", "met", "import s", "load s",
            "caption s", "words", "peak RSS MiB", "max opens of a weight file"]  # fmt: skip
    for m in result["models"]:
        body = [[r["config"], r["case"], r["wall_s_median"], r["wall_s_min"], r["target_s"],
                 "—" if r["target_s"] is None else
                 "met" if r["wall_s_median"] < r["target_s"] else "not met",
                 r.get("import_s"), r.get("load_s"), r.get("caption_s"), r.get("words"),
                 r.get("max_rss_mib"), r.get("max_opens")]
                for r in m["rows"]]  # fmt: skip
        lines += model_table(m, head, body)
    return "\n".join(lines)


def plot(result: dict, fig) -> None:
    ax = fig.subplots()
    labels, values = [], []
    for m in result["models"]:
        for r in m["rows"]:
            labels.append(f"{m['model']}\n{r['config']}\n{r['case']}")
            values.append(r["wall_s_median"])
    ax.barh(labels, values)
    ax.set(xlabel="seconds, process start to first caption (median)", title="startup")
    ax.tick_params(axis="y", labelsize=7)
