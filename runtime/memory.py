"""Memory: what a loaded model holds (its weights, one step's temporaries, the KV-cache pool)
and how many cache slots a budget affords: `facert.load(..., memory_budget="2GiB")`.

Weights are counted as the backend holds them; temporaries are modelled from the shapes (the
largest prefill the scheduler starts in one step, and the VQGAN decoder's full-resolution
feature maps); the pool is allocated once and never grows, so the plan is the model's ceiling
apart from the Python and runtime libraries themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ModelConfig
from .errors import InvalidArgument

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30,
          "t": 2**40, "tib": 2**40}  # fmt: skip


def parse_bytes(value: str | int) -> int:
    """ "2GiB", "512 MiB", "1.5GB", "300M" (binary), or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", value)):
        unit = _UNITS.get(m[2].lower())
        try:
            number = float(m[1])
        except ValueError:
            unit = None
        if unit is None:
            raise InvalidArgument(f"memory_budget {value!r}: use bytes or a size like '2GiB'")
        size = int(number * unit)
    else:
        raise InvalidArgument(f"memory_budget must be a size like '2GiB' or bytes, not {value!r}")
    if size <= 0:
        raise InvalidArgument(f"memory_budget must be positive, not {value!r}")
    return size


def activation_bytes(config: ModelConfig, prefill_tokens: int, max_len: int) -> int:
    """Modelled peak temporaries of one step, in float32: the largest prefill (prompts of
    `prefill_tokens` ids in all, full-length ones at worst) through one layer (hidden states,
    q/k/v, MLP, attention scores), or one face through the VQGAN decoder at full resolution
    (three feature maps live), whichever is larger."""
    lm, vq = config.lm, config.vqgan
    tokens = max(prefill_tokens, max_len)
    layer = tokens * (6 * lm.n_embd + lm.n_ffn) + tokens * lm.n_head * max_len
    decoder = 3 * vq.ch * vq.ch_mult[0] * vq.resolution**2
    return 4 * max(layer, decoder)


# More rows than this per step only lengthen every step; a budget beyond it is left unused.
MAX_SLOTS = 256


@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    activations: int
    kv_per_slot: int
    slots: int

    @property
    def cache(self) -> int:
        return self.slots * self.kv_per_slot

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.cache

    def describe(self) -> str:
        return (
            f"weights {_mib(self.weights)} + activations {_mib(self.activations)} (modelled) + "
            f"KV cache {self.slots} slot(s) x {_mib(self.kv_per_slot)} = {_mib(self.total)}"
        )


def plan(
    weights: int, activations: int, kv_per_slot: int, budget: int | None, slots: int | None
) -> MemoryPlan:
    """Without a budget: `slots` slots. With one: as many as fit, at most `slots` if given,
    else at most MAX_SLOTS; a budget that cannot hold one slot is refused with the minimum it
    needs."""
    if budget is None:
        return MemoryPlan(weights, activations, kv_per_slot, slots)
    fit = (budget - weights - activations) // kv_per_slot
    if fit < 1:
        least = MemoryPlan(weights, activations, kv_per_slot, 1)
        raise InvalidArgument(
            f"memory_budget {_mib(budget)} is below this model's minimum of {_mib(least.total)} "
            f"({least.describe()})"
        )
    return MemoryPlan(weights, activations, kv_per_slot, min(fit, slots or MAX_SLOTS))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
