"""Loading a Qwen3-VL checkpoint (model + processor) with transformers' public APIs.

`load_qwen3vl` resolves the source (folder, models-folder name or hub id) with
`model_sources.resolve_model_dir`, then checks the folder BEFORE any weight is read:
- `config.json` must say `model_type` `qwen3_vl` (or `qwen3_vl_moe`); anything else (e.g. Qwen-Image's
  text encoder, `qwen2_5_vl`) is a UserInputError naming the type found and the one expected;
- every weight shard named by `model.safetensors.index.json` (or the single `model.safetensors`) must
  exist and have an intact safetensors header whose data fits in the file (a truncated download is
  caught here, not deep inside transformers);
- the processor files (`preprocessor_config.json`, or `processor_config.json` as transformers 5 saves it)
  must be there.

Model class: `Qwen3VLForConditionalGeneration` (or the MoE class) from transformers; where that name is
not exported (a renamed class in some version) the fallback is `AutoModelForImageTextToText`. Qwen3-VL
needs transformers >= 4.57; older versions get an error that says so. No `trust_remote_code` unless asked.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..runtime.devices import resolve_device, resolve_dtype
from ..errors import UserInputError
from ..runtime.model_sources import read_config, resolve_model_dir

QWEN3VL_MODEL_TYPES = {"qwen3_vl": "Qwen3VLForConditionalGeneration",
                       "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}
MIN_TRANSFORMERS = "4.57"
ATTENTION_CHOICES = ("sdpa", "eager", "flash_attention_2")
KNOWN_MODEL_TYPES = {
    "qwen2_5_vl": "Qwen2.5-VL (for example Qwen-Image's text_encoder folder)",
    "qwen2_vl": "Qwen2-VL",
    "qwen2": "a Qwen2 text-only LLM",
    "qwen3": "a Qwen3 text-only LLM",
}


@dataclass
class Qwen3VLBundle:
    """A loaded Qwen3-VL: what the QWEN3VL node output carries and extraction takes."""

    model: Any                 # Qwen3VLForConditionalGeneration (eval mode)
    processor: Any             # Qwen3VLProcessor
    model_id: str              # folder name of the checkpoint (same for a hub id and its downloaded folder)
    device: torch.device       # where extraction runs
    dtype: torch.dtype
    feature_dim: int           # D: merger output width == LLM width (2048 / 2560 / 4096 for 2B / 4B / 8B)
    path: Path | None = None   # the resolved folder
    keep_loaded: bool = True   # nodes: keep it on `device` between runs (False: on the CPU except while extracting)
    host_handle: Any = None    # a host application's memory-management handle for the model (ComfyUI: its
                               # ModelPatcher, set by the nodes); the core never reads it

    @property
    def patch_multiple(self) -> int:
        """Pixels per LLM image token along a side: patch_size * merge_size (32 for Qwen3-VL)."""
        return processor_patch_multiple(self.processor)


def processor_patch_multiple(processor) -> int:
    ip = getattr(processor, "image_processor", processor)
    patch = int(getattr(ip, "patch_size", 16) or 16)
    merge = int(getattr(ip, "merge_size", 2) or 2)
    return patch * merge


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def transformers_too_old_message(found: str) -> str:
    return (f"Qwen3-VL needs transformers >= {MIN_TRANSFORMERS}, but transformers {found} is installed: "
            f"run `pip install -U \"transformers>={MIN_TRANSFORMERS}\"` in the Python that runs this.")


def check_model_type(folder: Path, config: dict) -> str:
    """The Qwen3-VL model_type of `config`, or a UserInputError naming what was found and what is expected."""
    if "model_type" not in config:
        if "_class_name" in config or (folder / "model_index.json").is_file():
            raise UserInputError(
                f"{folder} is a diffusers pipeline ({config.get('_class_name', 'model_index.json')}), not a Qwen3-VL "
                "checkpoint: LoadQwen3VL expects a Qwen3-VL folder (model_type 'qwen3_vl'), such as "
                "Qwen/Qwen3-VL-2B-Instruct.")
        raise UserInputError(f"{folder}/config.json has no model_type: expected a Qwen3-VL checkpoint "
                             "(model_type 'qwen3_vl'). Download the whole hub folder again.")
    mt = config["model_type"]
    if mt not in QWEN3VL_MODEL_TYPES:
        what = KNOWN_MODEL_TYPES.get(mt, "not Qwen3-VL")
        raise UserInputError(
            f"{folder} holds model_type {mt!r} ({what}), but a Qwen3-VL checkpoint is expected (model_type "
            f"'qwen3_vl' or 'qwen3_vl_moe', e.g. Qwen/Qwen3-VL-2B-Instruct / -4B / -8B). Choose a Qwen3-VL folder.")
    return mt


def _check_safetensors_file(path: Path, folder: Path) -> None:
    """Header intact and all tensor data inside the file (catches truncated downloads cheaply)."""
    fix = f"download the checkpoint into {folder} again (all shards)."
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} does not fit the file size {size}")
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise UserInputError(f"weight file {path} is damaged ({e}): {fix}") from None
    if not isinstance(header, dict):
        raise UserInputError(f"weight file {path} is damaged (its header is not a JSON object): {fix}")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise UserInputError(f"weight file {path} is damaged (tensor {name!r} has no data offsets): {fix}")
        end = max(end, int(offsets[1]))
    if 8 + n + end > size:
        raise UserInputError(f"weight file {path} is truncated ({size} bytes, its header needs {8 + n + end}): {fix}")


def check_weight_files(folder: Path) -> list[Path]:
    """The safetensors shards of a transformers checkpoint, all present and intact; else UserInputError."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserInputError(f"{index} is damaged ({type(e).__name__}: {e}): download the checkpoint again.") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise UserInputError(
                f"{folder} is missing {len(missing)} of its {len(shards)} weight shards ({', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}): the download is incomplete. Download the whole repository "
                "into that folder again.")
        files = [folder / s for s in shards]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise UserInputError(f"{folder} holds only pickle weights (.bin/.pt); this pack loads safetensors only (no "
                             "pickles from files). Use the official Qwen3-VL repository, which ships safetensors.")
    else:
        raise UserInputError(f"{folder} has no weights (model.safetensors or model.safetensors.index.json + shards): "
                             "download the whole repository into that folder.")
    for f in files:
        _check_safetensors_file(f, folder)
    return files


def _model_class(model_type: str):
    """The transformers class for `model_type`; fallback AutoModelForImageTextToText; else a version error."""
    import transformers

    name = QWEN3VL_MODEL_TYPES[model_type]
    cls = getattr(transformers, name, None)
    if cls is not None:
        return cls
    if _version_tuple(transformers.__version__) < _version_tuple(MIN_TRANSFORMERS):
        raise UserInputError(transformers_too_old_message(transformers.__version__))
    auto = getattr(transformers, "AutoModelForImageTextToText", None)
    if auto is None:
        raise UserInputError(transformers_too_old_message(transformers.__version__))
    return auto


def _load_error(folder: Path, e: Exception) -> UserInputError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return UserInputError(f"cannot load Qwen3-VL from {folder} ({type(e).__name__}: {first[:300]}). The folder is "
                          "damaged or incomplete: download the whole repository into it again.")


def load_qwen3vl(source: str, *, search_dirs: Iterable[str | os.PathLike] = (), download_dir=None,
                 token: str | None = None, cache_dir: str | None = None, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", attn_implementation: str = "sdpa",
                 trust_remote_code: bool = False) -> Qwen3VLBundle:
    """Load a Qwen3-VL checkpoint (model in eval mode on `device`, processor) after checking the folder."""
    folder = resolve_model_dir(source, search_dirs=search_dirs, download_dir=download_dir, token=token,
                               cache_dir=cache_dir, what="Qwen3-VL model")
    config = read_config(folder)
    model_type = check_model_type(folder, config)
    check_weight_files(folder)
    if not any((folder / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
        raise UserInputError(f"{folder} has no preprocessor_config.json: the processor files are missing. Download "
                             "the whole repository (config, weights, tokenizer and preprocessor files).")
    if attn_implementation not in ATTENTION_CHOICES:
        raise UserInputError(f"unknown attention implementation {attn_implementation!r}: use one of "
                             f"{', '.join(ATTENTION_CHOICES)}.")
    if attn_implementation == "flash_attention_2" and not flash_attention_available():
        raise UserInputError("attention 'flash_attention_2' needs the flash-attn package, which is not installed: "
                             "use 'sdpa' (the default) or install flash-attn.")
    if trust_remote_code:  # only ever on when the caller asks for it, for this one model
        import warnings

        warnings.warn(f"trust_remote_code=True for {folder}: Python code shipped inside that folder will run. "
                      "Turn it on only for a model you trust.", stacklevel=2)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cls = _model_class(model_type)
    from transformers import AutoProcessor

    try:
        model, info = cls.from_pretrained(folder, dtype=dt, attn_implementation=attn_implementation,
                                          trust_remote_code=trust_remote_code, output_loading_info=True)
    except UserInputError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise _load_error(folder, e) from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise UserInputError(f"{folder}: {len(missing)} weights are missing from the checkpoint (e.g. {missing[0]}): "
                             "the files are incomplete or from another architecture. Download the repository again.")
    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ImportError as e:
        raise UserInputError(f"the Qwen3-VL processor cannot be built: {e}. Qwen3VLProcessor needs torchvision "
                             "(its video processor); install the torchvision that matches your torch.") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _load_error(folder, e) from None
    model = model.to(dev).eval()
    model.requires_grad_(False)
    feature_dim = int(model.config.text_config.hidden_size)
    out_hidden = getattr(getattr(model.config, "vision_config", None), "out_hidden_size", feature_dim)
    if int(out_hidden) != feature_dim:
        raise UserInputError(f"{folder}: the vision merger width ({out_hidden}) differs from the LLM width "
                             f"({feature_dim}); this is not a standard Qwen3-VL checkpoint.")
    return Qwen3VLBundle(model=model, processor=processor, model_id=folder.name, device=dev, dtype=dt,
                         feature_dim=feature_dim, path=folder)


def flash_attention_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def attention_choices() -> list[str]:
    """Attention implementations usable here (flash_attention_2 only when flash-attn is installed)."""
    return [a for a in ATTENTION_CHOICES if a != "flash_attention_2" or flash_attention_available()]
