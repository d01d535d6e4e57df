"""Reading and writing the pack's safetensors files (heads, feature caches, training states).

Every file a user hands the pack is read here: never a pickle, and any failure to parse it (truncated,
garbage header, a pickle renamed .safetensors) becomes a UserInputError naming the file. Writing
produces byte-identical files for equal contents.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import torch

from ..errors import UserInputError


def read_safetensors(path: str | os.PathLike, explain: Callable[[Exception], str],
                     keys: Iterable[str] | None = None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file on the CPU; only `keys` when given (those present).
    Any parse failure raises UserInputError(explain(error))."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            wanted = set(f.keys()) if keys is None else set(f.keys()) & set(keys)
            tensors = {k: f.get_tensor(k) for k in wanted}
    except Exception as e:  # SafetensorError, OSError, header garbage, a pickle renamed .safetensors
        raise UserInputError(explain(e)) from None
    return metadata, tensors


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file's bytes with its JSON header in sorted key order.

    safetensors keeps metadata in a hash map whose order changes from call to call, so two saves of the
    same tensors can differ byte-wise. Re-serialising the header with sorted keys (and the format's
    8-byte padding) makes equal heads byte-identical files; the tensor data and offsets are unchanged,
    so any safetensors reader loads it as before.
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]
