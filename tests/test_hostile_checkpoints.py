"""Hostile checkpoints: a pickle payload in any slot of any torch.save layout must never run.

Each payload, when unpickled by plain pickle, calls os.system, exec or open to create a marker
file (test_payloads_are_live proves it). Every case is read through `read_checkpoint` and through
`facert convert`, and the marker must not appear; pickle's and torch's unrestricted loaders are
made to fail loudly so that no code path can fall back on them.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import shlex
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from facert.cli import main
from facert.export.checkpoint import MAGIC_NUMBER, PROTOCOL_VERSION, Placeholder, read_checkpoint
from facert.runtime.errors import ModelFileError

from .conftest import VQ, convert_args

SYS_INFO = {"protocol_version": PROTOCOL_VERSION, "little_endian": True, "type_sizes": {}}


class Payload:
    """Pickles as a call to `func(*args)`; building the bytes runs nothing."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    return {
        "os.system": Payload(os.system, f"touch {shlex.quote(str(marker))}"),
        "exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "open": Payload(open, str(marker), "w"),
    }


def _legacy(slots: list) -> bytes:
    """The legacy torch.save stream for objects without tensors: five pickles, no storages."""
    return b"".join(pickle.dumps(slot, protocol=2) for slot in slots)


def _tar(evil: Payload) -> bytes:
    """torch < 0.4's tar layout, every member a payload."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            data = pickle.dumps(evil, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _torchscript_like(path: Path, evil: Payload) -> None:
    """A torch.save zip with a constants.pkl, which makes torch.load hand it to torch.jit.load."""
    torch.save({"w": torch.zeros(2), "evil": evil}, path)
    with zipfile.ZipFile(path, "a") as z:
        root = z.namelist()[0].split("/")[0]
        z.writestr(f"{root}/constants.pkl", pickle.dumps(evil, protocol=2))


def write_hostile(fmt: str, path: Path, evil: Payload) -> None:
    """`path` holding `evil` in the layout and slot `fmt` names."""
    obj = {"w": torch.zeros(2), "evil": evil}
    legacy = [MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO, {"x": 1}, []]
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "zip-torchscript":
        _torchscript_like(path, evil)
    elif fmt == "legacy-object":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif fmt.startswith("legacy-"):
        slot = ["magic", "protocol", "sys_info", "object", "storage_keys"].index(fmt[7:])
        legacy[slot] = evil
        path.write_bytes(_legacy(legacy))
    elif fmt == "tar":
        path.write_bytes(_tar(evil))
    elif fmt.startswith("pickle-"):
        path.write_bytes(pickle.dumps(evil, protocol=int(fmt[7:])))
    else:
        raise AssertionError(fmt)


FORMATS = [
    "zip",
    "zip-torchscript",
    "legacy-object",
    "legacy-magic",
    "legacy-protocol",
    "legacy-sys_info",
    "legacy-storage_keys",
    "tar",
    "pickle-0",
    "pickle-2",
    "pickle-5",
]
# the formats that are well-formed checkpoints apart from the payload, which comes back inert
READABLE = {"zip", "zip-torchscript", "legacy-object"}


@pytest.fixture(autouse=True)
def no_unrestricted_loads(monkeypatch):
    """Any call to an unrestricted loader fails the test (checked afterwards as well, since
    read_checkpoint turns whatever a decoder raises into a ModelFileError)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("an unrestricted unpickler was called")

    for name in ("load", "loads", "_load", "_loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.jit, "load", refuse)
    yield
    assert not calls


def opcode_payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that name os.system without GLOBAL: protocol 0's INST and OBJ, and EXT1, which
    looks the callable up in copyreg's extension registry (code 0xF0, see `extension`)."""
    command = f"touch {shlex.quote(str(marker))}".encode()
    return {
        "INST": b"(S'" + command + b"'\nios\nsystem\n.",
        "OBJ": b"(cos\nsystem\nS'" + command + b"'\no.",
        "EXT1": b"\x80\x02\x82\xf0X" + len(command).to_bytes(4, "little") + command + b"\x85R.",
    }


@pytest.fixture
def extension():
    copyreg.add_extension("os", "system", 0xF0)
    yield
    copyreg.remove_extension("os", "system", 0xF0)


def test_payloads_are_live(tmp_path, monkeypatch, extension):
    """The control: plain pickle does run each payload, so the suite tests something."""
    monkeypatch.undo()
    marker = tmp_path / "marker"
    pickles = {k: pickle.dumps(v, protocol=2) for k, v in payloads(marker).items()}
    for kind, data in {**pickles, **opcode_payloads(marker)}.items():
        pickle.loads(data)
        assert marker.exists(), kind
        marker.unlink()


@pytest.mark.parametrize("kind", ["os.system", "exec", "open"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_read_checkpoint_never_runs_payloads(tmp_path, fmt, kind):
    marker, path = tmp_path / "marker", tmp_path / "evil.ckpt"
    write_hostile(fmt, path, payloads(marker)[kind])
    if fmt in READABLE:
        loaded = read_checkpoint(path)
        assert isinstance(loaded["evil"], Placeholder)
        assert torch.equal(loaded["w"], torch.zeros(2))
    else:
        with pytest.raises(ModelFileError, match="not a readable PyTorch checkpoint"):
            read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("opcode", ["INST", "OBJ", "EXT1"])
def test_every_opcode_that_imports_goes_through_find_class(tmp_path, opcode, extension):
    marker, path = tmp_path / "marker", tmp_path / "evil.pkl"
    path.write_bytes(opcode_payloads(marker)[opcode])
    with pytest.raises(ModelFileError):
        read_checkpoint(path)
    assert not marker.exists()


def _convert_hostile(args: list[str], which: str, path: Path) -> list[str]:
    args = list(args)
    args[args.index(which) + 1] = str(path)
    return args


def _assert_one_error_line(stderr: str) -> None:
    assert stderr.startswith("facert: error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("which", ["--lm", "--vqgan"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_refuses_hostile_checkpoints(tmp_path, capsys, fmt, which):
    marker, path, out = tmp_path / "marker", tmp_path / "evil.ckpt", tmp_path / "model"
    write_hostile(fmt, path, payloads(marker)["os.system"])
    assert main(_convert_hostile(convert_args(out), which, path)) == 2
    _assert_one_error_line(capsys.readouterr().err)
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_payload_beside_valid_weights_converts_inertly(tmp_path, capsys, legacy):
    """A real Lightning checkpoint carries arbitrary objects next to its weights (callbacks,
    hyper-parameters); a payload there is ignored and the weights convert."""
    marker, path = tmp_path / "marker", tmp_path / "evil.ckpt"
    state = dict(read_checkpoint(VQ / "last.ckpt")["state_dict"])
    evil = payloads(marker)["exec"]
    ckpt = {"state_dict": state, "callbacks": {evil: evil}, "hparams": [evil]}
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    assert main(_convert_hostile(convert_args(tmp_path / "model"), "--vqgan", path)) == 0
    assert not marker.exists() and (tmp_path / "model" / "facert.json").is_file()


@pytest.mark.parametrize("fmt", ["legacy-sys_info", "pickle-0"])
def test_hostile_checkpoint_through_the_command_line(tmp_path, fmt):
    """The real entry point, in a fresh interpreter with nothing patched."""
    marker, path, out = tmp_path / "marker", tmp_path / "evil.bin", tmp_path / "model"
    write_hostile(fmt, path, payloads(marker)["os.system"])
    run = subprocess.run(
        [sys.executable, "-m", "facert.cli", *_convert_hostile(convert_args(out), "--lm", path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    _assert_one_error_line(run.stderr)
    assert not marker.exists() and not out.exists()


class OutOfBounds:
    """Pickles as a tensor that views 100 bytes of an 8-byte storage."""

    def __reduce__(self):
        storage = torch.zeros(2).untyped_storage()
        return torch._utils._rebuild_tensor_v2, (storage, 0, (100,), (1,), False, {})


@pytest.mark.parametrize("legacy", [False, True])
def test_a_tensor_outside_its_storage_is_refused(tmp_path, legacy):
    torch.save(
        {"w": OutOfBounds()}, tmp_path / "oob.bin", _use_new_zipfile_serialization=not legacy
    )
    with pytest.raises(ModelFileError, match="out of bounds"):
        read_checkpoint(tmp_path / "oob.bin")
