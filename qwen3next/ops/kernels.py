"""The op table the model calls. Every entry has the signature of its torch reference in this package; a GPU
backend may replace an entry with a kernel of the same signature (`use`), and the references stay the CPU path
and the test oracle."""
from __future__ import annotations

from .attention import causal_attention, paged_attention, write_kv  # noqa: F401
from .conv1d import causal_conv1d  # noqa: F401
from .gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule  # noqa: F401
from .moe import experts_forward, route  # noqa: F401

_REFERENCE = dict(globals())


def use(**ops) -> None:
    """Swap ops by name, e.g. use(chunk_gated_delta_rule=my_kernel)."""
    for name, fn in ops.items():
        if name not in _REFERENCE or name.startswith("_"):
            raise KeyError(f"unknown op {name!r}")
        globals()[name] = fn


def reset() -> None:
    """Back to the torch references."""
    globals().update({k: v for k, v in _REFERENCE.items() if not k.startswith("__")})
