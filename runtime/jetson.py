"""Jetson detection and the defaults an edge device wants.

A Jetson is recognised by /etc/nv_tegra_release (L4T writes it, e.g. "# R36 (release),
REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, ..."); its board name is in
/proc/device-tree/model. The GPU's compute capability comes from torch or cuda-python when
either can see the device, else from the board name (the table below), since JetPack images
often have neither. Memory is unified: the GPU's share is what /proc/meminfo calls
MemAvailable, so the defaults budget from that.

Every path is read under `root` (default "/") so tests can stand up a fake device tree.
Imports neither torch nor cuda-python unless asked for the SM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Board name fragment -> SM, longest first where fragments overlap. Thor is left out: its SM
# was renumbered between CUDA 12 and 13, so it is taken from the driver only.
BOARD_SM = (
    ("orin", (8, 7)),
    ("xavier", (7, 2)),
    ("tx2", (6, 2)),
    ("nano", (5, 3)),
    ("tx1", (5, 3)),
)
# L4T major release -> JetPack major: R32 JetPack 4, R35 JetPack 5, R36 JetPack 6, R38 JetPack 7.
JETPACK = {32: 4, 35: 5, 36: 6, 38: 7}
# TensorRT 10 came with JetPack 6.1 (L4T R36.4); JetPack 6.0 (R36.3) has TensorRT 8.6.
MIN_L4T_FOR_TENSORRT_10 = (36, 4)
BUDGET_FRACTION = 0.6  # of MemAvailable: the OS, the camera and the display keep the rest
RESERVE_BYTES = 512 << 20  # never budget the last 512 MiB, however much is free


@dataclass(frozen=True)
class Jetson:
    l4t: str  # "36.4.3"
    jetpack: int | None  # major version, None for an L4T release not in JETPACK
    board: str  # "NVIDIA Jetson AGX Orin Developer Kit", or "" when unknown
    sm: tuple[int, int] | None  # compute capability, None when unknown

    @property
    def supports_tensorrt_10(self) -> bool:
        """Whether its JetPack ships TensorRT 10 (what `facert build` needs)."""
        parts = re.findall(r"\d+", self.l4t)
        return len(parts) >= 2 and (int(parts[0]), int(parts[1])) >= MIN_L4T_FOR_TENSORRT_10


def detect_jetson(root: str | Path = "/", probe_gpu: bool = True) -> Jetson | None:
    """The Jetson this runs on, or None when /etc/nv_tegra_release is absent (not a Jetson)."""
    root = Path(root)
    try:
        release = (root / "etc" / "nv_tegra_release").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
    major, revision = (int(m[1]), m[2]) if m else (None, "")
    l4t = f"{major}.{revision}" if major is not None else "unknown"
    try:
        board = (root / "proc" / "device-tree" / "model").read_bytes().decode(errors="replace")
    except OSError:
        board = ""
    board = board.rstrip("\0").strip()
    sm = (device_sm() if probe_gpu else None) or board_sm(board)
    return Jetson(l4t, JETPACK.get(major) if major is not None else None, board, sm)


def board_sm(board: str) -> tuple[int, int] | None:
    """The SM of a Jetson board from its name, None when the name is not in BOARD_SM."""
    name = board.lower()
    return next((sm for fragment, sm in BOARD_SM if fragment in name), None)


def device_sm() -> tuple[int, int] | None:
    """Compute capability of CUDA device 0 from torch or cuda-python, None when neither sees
    one (or neither is installed)."""
    try:
        import torch

        if torch.cuda.is_available():
            return tuple(torch.cuda.get_device_capability(0))
    except ImportError:
        pass
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, props = cudart.cudaGetDeviceProperties(0)
        return (int(props.major), int(props.minor)) if int(err) == 0 else None
    except Exception:  # no cuda-python, no driver, no device: unknown, not an error
        return None


def available_memory(root: str | Path = "/") -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None when it cannot be read."""
    try:
        text = (Path(root) / "proc" / "meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m[1]) * 1024 if m else None


@dataclass(frozen=True)
class EdgeDefaults:
    precision: str
    memory_budget: int  # bytes, for facert.load(memory_budget=...)
    max_batch: int  # for `facert build --max-batch`


def edge_defaults(jetson: Jetson | None, available: int | None) -> EdgeDefaults | None:
    """Defaults for a Jetson: fp16 (every Jetson GPU since the TX1 runs it at twice the fp32
    rate, it halves the KV cache, and its accuracy is measured; the int8 graphs' speed on
    TensorRT is not yet), a memory budget of BUDGET_FRACTION of the free memory less
    RESERVE_BYTES, and a batch limit that grows with that budget. None when not on a Jetson."""
    if jetson is None:
        return None
    free = available if available is not None else 2 << 30
    budget = max(int((free - RESERVE_BYTES) * BUDGET_FRACTION), 256 << 20)
    max_batch = 4 if budget < (2 << 30) else 8 if budget < (8 << 30) else 16
    return EdgeDefaults("fp16", budget, max_batch)
