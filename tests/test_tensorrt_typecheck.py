"""mypy over the TensorRT code (pyproject's [tool.mypy]: the builder, the plugins, the backend)
against tensorrt-stubs, so a misspelt or misused TensorRT call fails here, where TensorRT itself
cannot be installed.

The stubs: the installed tensorrt-stubs if there is one, else its wheel alone, fetched from the
package index into pytest's cache (no extra can name it: it requires `tensorrt`, see
pyproject.toml). mypy reads them from a folder of their own (MYPYPATH), because installed they
lack the py.typed marker that mypy needs, and only after two repairs: the published stubs do not
parse (a parameter named `in`, a parameter without a default after defaulted ones).
cuda-python has no type information to check against (compiled modules, no .pyi), and
tensorrt-stubs does not cover `tensorrt.plugin`: both are typed as Any.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

STUBS = "tensorrt-stubs==10.13.0.35.1"
ROOT = Path(__file__).resolve().parents[1]
REPAIRS = (  # (pattern, replacement) applied to every stub line that defines a function
    (r"([(,] *)in: ", r"\1in_: "),  # `in` is a keyword
    (r"(power: Weights = None, channel_axis: int)\)", r"\1 = ...)"),  # add_scale_nd
)


def _published_stubs(cache: Path) -> dict[str, str]:
    """path inside the package -> text, of every .pyi of tensorrt-stubs."""
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        wheels = sorted(cache.glob("tensorrt_stubs-*.whl"))
        if not wheels:
            fetch = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", STUBS]
            try:
                subprocess.run([*fetch, "-d", str(cache)], check=True, timeout=180)
            except (subprocess.SubprocessError, OSError) as e:
                pytest.skip(f"cannot fetch {STUBS} ({e}): pip install --no-deps {STUBS}")
            wheels = sorted(cache.glob("tensorrt_stubs-*.whl"))
        with zipfile.ZipFile(wheels[-1]) as whl:
            return {n: whl.read(n).decode() for n in whl.namelist() if n.endswith(".pyi")}
    return {
        f.as_posix(): Path(dist.locate_file(f)).read_text()
        for f in dist.files or ()
        if f.suffix == ".pyi"
    }


@pytest.fixture(scope="module")
def mypy_run(request, tmp_path_factory):
    """Runs mypy with pyproject's settings on the stubs, sharing one cache: (stdout, status)."""
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (the test extra has it)")
    stubs = tmp_path_factory.mktemp("stubs")
    for name, text in _published_stubs(request.config.cache.mkdir("tensorrt-stubs")).items():
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if line.lstrip().startswith("def "):
                for pattern, replacement in REPAIRS:
                    lines[i] = re.sub(pattern, replacement, lines[i])
        text = "\n".join(lines)
        (stubs / name).parent.mkdir(parents=True, exist_ok=True)
        (stubs / name).write_text(text)
    cache = tmp_path_factory.mktemp("mypy-cache")

    def run(*files: str) -> tuple[str, int]:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(ROOT)  # the config's `files` are relative to the checkout
            mp.setenv("MYPYPATH", str(stubs))
            out, err, status = api.run(
                ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache), *files]
            )
        return out + err, status

    return run


def test_the_tensorrt_code_type_checks_against_the_stubs(mypy_run):
    out, status = mypy_run()
    assert status == 0, out
    assert "3 source files" in out  # the builder, the plugins and the backend


def test_a_wrong_tensorrt_call_fails_the_check(mypy_run, tmp_path):
    """The check bites: were the stubs not found, every TensorRT object would be Any and pass."""
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "import tensorrt as trt\n\n"
        "builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
        "network = builder.create_netwrk(0)\n"
        "config = builder.create_builder_config()\n"
        "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, '1GiB')\n"
    )
    out, status = mypy_run(str(wrong))
    assert status == 1
    assert '"Builder" has no attribute "create_netwrk"' in out
    assert 'incompatible type "str"; expected "int"' in out
