"""Read PyTorch checkpoints without executing anything they contain.

`torch.load(weights_only=True)` refuses a 2021 Lightning checkpoint (its callback state is keyed
by Lightning classes) and `weights_only=False` would import and run whatever the pickle names.
Handing torch.load a restricted `pickle_module` is not enough either: its legacy path unpickles
the magic number, protocol version, sys_info and storage keys with `pickle_module.load`, it
passes zip archives that look like TorchScript to `torch.jit.load`, and it extracts tar members
to disk. So facert does not call torch.load. It parses the two layouts torch.save writes -- the
zip archive (torch >= 1.6) and the legacy stream (magic number, protocol version, sys_info, the
object, the storage keys, then raw storages) -- and every pickle in them goes through one
restricted unpickler. It admits tensors and plain containers and turns every other global into
an inert placeholder class, so the weights come out and no foreign code runs. The tar layout of
torch < 0.4 is refused.
"""

from __future__ import annotations

import builtins
import collections
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch

from facert.runtime.errors import InvalidArgument, ModelFileError

# torch.serialization's legacy-format constants.
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# The storage classes torch.save names, by the dtype of their elements.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _Storage(NamedTuple):
    """A storage's elements as a flat tensor. Only persistent ids make one (a pickle cannot name
    this class), and a tuple has no attributes a pickle's BUILD could overwrite."""

    flat: torch.Tensor


def _rebuild_tensor(
    storage: _Storage, offset: int, size: Any, stride: Any, *_unused: Any
) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 without what a weight does not need (requires_grad,
    backward hooks, metadata); as_strided bounds-checks the view against its storage."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not one of the file's storages")
    flat = storage.flat
    return flat.as_strided(tuple(size), tuple(stride), flat.storage_offset() + offset)


def _rebuild_parameter(data: torch.Tensor, *_unused: Any) -> torch.Tensor:
    """torch._utils._rebuild_parameter: a Parameter is only its data to a converter."""
    return data


class _OrderedDict(collections.OrderedDict):
    """OrderedDict whose pickled attributes (a state dict's `_metadata`) are dropped, so a
    pickle's BUILD cannot shadow its methods with attributes of its own."""

    def __setstate__(self, state: Any) -> None:
        pass


_ALLOWED = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    **{
        ("builtins", n): getattr(builtins, n) for n in ("dict", "list", "tuple", "set", "frozenset")
    },
    **{("torch", n): getattr(torch, n) for n in ("float32", "float16", "bfloat16", "int64")},
    # a storage class stands for its dtype; the persistent id that names it reads the data
    **{("torch", n): dtype for n, dtype in _STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): torch.uint8,
}


class Placeholder:
    """Stands in for a class the checkpoint names but we refuse to import; keeps its state."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


_placeholders: dict[str, type[Placeholder]] = {}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only _ALLOWED globals (every other one becomes a Placeholder subclass) and hands
    persistent ids, torch's references to storages, to `load_storage`; without one a persistent
    id is an error. Every global a pickle names, by any opcode, goes through find_class."""

    def __init__(self, file: IO[bytes], load_storage: Callable[[Any], Any] | None = None):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        qualified = f"{module}.{name}"
        if qualified not in _placeholders:
            _placeholders[qualified] = type(name, (Placeholder,), {"qualified_name": qualified})
        return _placeholders[qualified]

    def persistent_load(self, pid: Any) -> Any:
        if self._load_storage is None:
            raise pickle.UnpicklingError("a persistent id outside the checkpoint's object")
        return self._load_storage(pid)


def _storage_id(pid: Any) -> tuple[torch.dtype, str, int]:
    """(dtype, key, numel) of a ('storage', storage class, key, location, numel, ...) id."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
    _, dtype, key, _location, numel = pid[:5]
    if not isinstance(dtype, torch.dtype) or type(numel) is not int or numel < 0:
        raise pickle.UnpicklingError(f"malformed storage reference {pid!r:.80}")
    return dtype, str(key), numel


def _read_zip(path: Path, file_size: int) -> Any:
    """A torch.save zip archive: `<root>/data.pkl` refers to storages stored in `<root>/data/`."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError("a zip archive without exactly one data.pkl")
        root = pickles[0].removesuffix("data.pkl")
        if root + "byteorder" in archive.namelist():
            if archive.read(root + "byteorder") != b"little":
                raise ValueError("big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def record(name: str) -> zipfile.ZipInfo:
            info = archive.getinfo(name)
            if info.compress_type != zipfile.ZIP_STORED:  # torch.save never compresses
                raise ValueError(f"{name} is compressed")
            return info

        def load_storage(pid: Any) -> _Storage:
            dtype, key, numel = _storage_id(pid)
            if key not in storages:
                info, nbytes = record(f"{root}data/{key}"), numel * dtype.itemsize
                if not nbytes <= info.file_size <= file_size:
                    raise ValueError(f"storage {key} does not hold its {numel} elements")
                flat = torch.empty(numel, dtype=dtype)
                with archive.open(info) as f:
                    _read_into(f, flat)
                storages[key] = _Storage(flat)
            return storages[key]

        with archive.open(record(pickles[0])) as f:
            return RestrictedUnpickler(f, load_storage).load()


def _read_into(f: IO[bytes], flat: torch.Tensor) -> None:
    buffer = flat.view(torch.uint8).numpy()
    if f.readinto(buffer) != buffer.size:
        raise EOFError("the file ends inside a storage")


def _read_legacy(f: IO[bytes], file_size: int) -> Any:
    """torch.save(_use_new_zipfile_serialization=False): five pickles, then each storage as an
    int64 element count and its raw little-endian bytes, in the order of the storage keys."""

    def unpickle(load_storage: Callable[[Any], Any] | None = None) -> Any:
        return RestrictedUnpickler(f, load_storage).load()

    if unpickle() != MAGIC_NUMBER:
        raise ValueError("neither a zip archive nor a legacy torch.save file")
    if unpickle() != PROTOCOL_VERSION:
        raise ValueError("unknown legacy protocol version")
    sys_info = unpickle()
    if not isinstance(sys_info, dict):
        raise ValueError("malformed sys_info")
    if sys_info.get("little_endian") is False:
        raise ValueError("big-endian checkpoints are not supported")
    storages: dict[str, _Storage] = {}

    def load_storage(pid: Any) -> Any:
        if isinstance(pid, tuple) and pid[:1] == ("module",) and len(pid) == 4:
            return pid[1]  # an nn.Module class, already a Placeholder; its source is not checked
        dtype, key, numel = _storage_id(pid)
        if key not in storages:
            if numel * dtype.itemsize > file_size:
                raise ValueError(f"storage {key} is larger than the file")
            storages[key] = _Storage(torch.empty(numel, dtype=dtype))  # filled in below
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return storages[key]
        _view_key, offset, view_numel = view
        return _Storage(storages[key].flat[offset : offset + view_numel])

    result = unpickle(load_storage)
    keys = unpickle()
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise ValueError("the storage keys do not match the storages the object uses")
    for key in keys:
        flat = storages[str(key)].flat
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != flat.numel():
            raise ValueError(f"storage {key} holds {numel} elements, expected {flat.numel()}")
        _read_into(f, flat)
    return result


def read_checkpoint(path: str | Path) -> Any:
    """Load a torch.save file (zip or legacy format) with the restricted unpickler, on CPU.

    Anything wrong with the file, including a hostile one, is one ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                return _read_zip(path, path.stat().st_size)
            if tarfile.is_tarfile(path):
                raise ValueError("the tar format of PyTorch < 0.4 is not supported")
            f.seek(0)
            return _read_legacy(f, path.stat().st_size)
    except Exception as e:  # a corrupt or hostile file can make a decoder raise anything
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ModelFileError(f"{path} is not a readable PyTorch checkpoint: {reason}") from e
