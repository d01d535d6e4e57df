"""Training state for `--resume`: one safetensors file beside the head (never a pickle).

`checkpoints/train_state.safetensors` holds the head's tensors, Adam's moments and step counts, the
shuffling generator's state and the completed epoch, plus JSON metadata (the run's identity and loss
history). It is self-contained, so resuming never depends on the head file, and both are written
atomically: a crash or a full disk while writing keeps the previous pair.
"""

from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from ..core.files.atomic import atomic_write
from ..core.errors import UserInputError
from ..core.files.safetensors_io import read_safetensors, safetensors_bytes

STATE_FORMAT = "qwen-identity-train-state"
STATE_VERSION = 1
STATE_FILE = "train_state.safetensors"


def write_failed(path: Path, e: OSError) -> UserInputError:
    why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return UserInputError(f"could not write {path}: {why}. The previous file there (if any) is intact; "
                          "free space or choose another --out-dir, then rerun with --resume.")


@contextlib.contextmanager
def reporting_write_errors(path: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` (a full disk, no permission) into a clear UserInputError."""
    try:
        yield
    except OSError as e:
        raise write_failed(path, e) from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    data = safetensors_bytes(tensors, metadata)
    with reporting_write_errors(path):
        return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def save_train_state(path: Path, head: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, epoch: int, info: dict[str, Any]) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    names = dict((id(p), n) for n, p in head.named_parameters())
    for n, p in head.named_parameters():
        tensors[f"param/{n}"] = p.detach().cpu().float().contiguous()
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for key, value in st.items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                tensors[f"adam/{names[id(p)]}/{key}"] = t.detach().cpu().contiguous()
    tensors["rng/shuffle"] = generator.get_state().clone()
    meta = {"format": STATE_FORMAT, "format_version": str(STATE_VERSION), "epoch": str(int(epoch)),
            "info": json.dumps(info, sort_keys=True, default=str)}
    return save_tensors(path, tensors, meta)


def load_train_state(path: Path) -> tuple[dict[str, torch.Tensor], int, dict[str, Any]]:
    if not path.is_file():
        raise UserInputError(f"--resume: no training state at {path}; run without --resume to start training.")
    meta, tensors = read_safetensors(
        path, lambda e: f"--resume: {path} is damaged ({type(e).__name__}: {e}); rerun without --resume "
                        "(and --overwrite) to start over.")
    if meta.get("format") != STATE_FORMAT or meta.get("format_version") != str(STATE_VERSION):
        raise UserInputError(f"--resume: {path} is not a training state this version can read.")
    return tensors, int(meta["epoch"]), json.loads(meta.get("info", "{}"))


def restore(head: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
            tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in head.named_parameters():
            if f"param/{n}" not in tensors or tensors[f"param/{n}"].shape != p.shape:
                raise UserInputError(f"--resume: the saved training state does not match this head ({n}).")
            p.copy_(tensors[f"param/{n}"])
    for n, p in head.named_parameters():
        st = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            t = tensors.get(f"adam/{n}/{key}")
            if t is not None:
                st[key] = t.clone().to(p.device) if key != "step" else t.clone()
        if st:
            optimizer.state[p] = st
    generator.set_state(tensors["rng/shuffle"].clone())

