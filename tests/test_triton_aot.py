"""Ahead-of-time compilation of the Triton kernels (facert.kernels.triton.aot) with no GPU: every
kernel compiles for sm_87 (Jetson Orin) and sm_90 (H100/H200), and the PTX shipped in
kernels/triton/ptx/ is what a fresh compile writes, each file declaring its target and PTX ISA 8.2
(what JetPack 6's CUDA 12.2 driver accepts).

The compile runs in a subprocess with its own Triton cache (so it really compiles) and without
TRITON_INTERPRET, which the interpreter tests set in this process: a kernel defined under the
interpreter cannot be compiled."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:  # not imported here: see the module docstring
    pytest.skip("triton is not installed (the test extra installs it)", allow_module_level=True)

PTX = Path(__file__).resolve().parents[1] / "kernels" / "triton" / "ptx"
KERNELS = {"attention", "norm", "activation", "sampling", "codes", "frames"}
TARGETS = {"sm_87", "sm_90a"}


def run_aot(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    cmd = [sys.executable, "-m", "facert.kernels.triton.aot", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_every_kernel_compiles_for_both_targets_as_shipped(tmp_path):
    """Compiles all (kernel, target) pairs into an empty cache and compares with ptx/: the same
    files, byte for byte, when this Triton wrote them; else the same entries and targets."""
    done = run_aot(["--check"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "shipped PTX up to date" in done.stdout


def test_shipped_ptx_declares_its_target_and_version():
    manifest = json.loads((PTX / "manifest.json").read_text())
    assert {(e["kernel"], e["target"]) for e in manifest} == {
        (k, t) for k in KERNELS for t in TARGETS
    }
    for e in manifest:
        text = (PTX / e["file"]).read_text()
        lines = text.splitlines()
        assert e["ptx_version"] == "8.2" and ".version 8.2" in lines, e["file"]
        assert f".target {e['target']}" in lines, e["file"]
        assert f".visible .entry {e['entry']}(" in text, e["file"]
        assert hashlib.sha256(text.encode()).hexdigest() == e["sha256"], e["file"]
        assert ".file" not in text  # no line info: the files do not depend on source paths
