"""The weight dtypes a user can name (`--dtype` of chat, serve, eval, convert, train init and bench), and the
one function that turns such a name into torch's dtype.

The names are plain strings so that command parsers can offer them without importing torch.
"""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """torch's dtype for one of `DTYPES`; a ValueError naming the choices for any other name."""
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    import torch

    return getattr(torch, name)
