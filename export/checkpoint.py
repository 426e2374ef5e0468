"""Read PyTorch checkpoints without executing anything they contain.

`torch.load(weights_only=True)` refuses a 2021 Lightning checkpoint (its callback state is keyed
by Lightning classes) and `weights_only=False` would import and run whatever the pickle names.
This reader admits tensors and plain containers and turns every other global into an inert
placeholder class, so the weights come out and no foreign code runs.
"""

from __future__ import annotations

import builtins
import collections
import pickle
import types
from pathlib import Path
from typing import Any

import torch

from facert.runtime.errors import FacertError

_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    **{
        ("builtins", n): getattr(builtins, n) for n in ("dict", "list", "tuple", "set", "frozenset")
    },
    **{("torch", n): getattr(torch, n) for n in ("float32", "float16", "bfloat16", "int64")},
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


class _RestrictedUnpickler(pickle.Unpickler):
    _placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        qualified = f"{module}.{name}"
        if qualified not in self._placeholders:
            self._placeholders[qualified] = type(
                name, (Placeholder,), {"qualified_name": qualified}
            )
        return self._placeholders[qualified]


# torch.load takes a pickle *module*; this one only differs in its Unpickler.
restricted_pickle = types.ModuleType("facert_restricted_pickle")
restricted_pickle.Unpickler = _RestrictedUnpickler
restricted_pickle.load = pickle.load
restricted_pickle.__dict__["dumps"] = pickle.dumps


def read_checkpoint(path: str | Path) -> Any:
    """Load a torch.save file (zip or legacy format) with the restricted unpickler, on CPU."""
    path = Path(path)
    if not path.is_file():
        raise FacertError(f"checkpoint not found: {path}")
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False
        )
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise FacertError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
