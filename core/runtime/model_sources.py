"""Where model files come from: a local folder, a name inside a models folder, or a hub repo id.

One resolver serves every loader (Qwen3-VL, the diffusers Qwen-Image pipeline), so the rules and
the error messages are the same everywhere:
- an existing folder is used as it is (nothing is written into it);
- a bare name is looked up in the given models folders (ComfyUI's `models/<kind>/`);
- `org/name` is a hub repo id: downloaded into `download_dir/<name>` when the network allows,
  with a token from the argument, `HUGGINGFACE_TOKEN` or `HF_TOKEN`, and `HF_HUB_CACHE` as cache;
  offline, the error says exactly which folder to create and what to put in it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

from ..errors import UserInputError
from .security import check_download

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_token(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("HUGGINGFACE_TOKEN") or os.environ.get("HF_TOKEN") or None


def hub_cache_dir(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("HF_HUB_CACHE") or None


def read_config(folder: Path) -> dict:
    """config.json of a transformers model folder (or model_index.json of a diffusers pipeline)."""
    for name in ("config.json", "model_index.json"):
        f = folder / name
        if f.is_file():
            try:
                return json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise UserInputError(f"{f} is not valid JSON ({e}): the model folder is damaged; download it again.") from None
    raise UserInputError(f"{folder} has no config.json or model_index.json: it is not a model folder. "
                         "Point at the folder that holds the model's config.json.")


def _download(repo_id: str, target: Path, token: str | None, cache_dir: str | None, what: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=repo_id, local_dir=str(target), token=hub_token(token),
                          cache_dir=hub_cache_dir(cache_dir))
        return target
    except Exception as e:  # offline mode, no network, 401/404: all end in the same advice
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise UserInputError(
            f"cannot download {what} {repo_id!r} ({reason}). Without network access, download the repository "
            f"elsewhere (e.g. `huggingface-cli download {repo_id} --local-dir {target}`) and copy the folder to "
            f"{target}, so that {target / 'config.json'} exists; then select it by name or path. "
            "A gated or private repo needs a token (--hf-token, HUGGINGFACE_TOKEN or HF_TOKEN).") from None


def resolve_model_dir(source: str, *, search_dirs: Iterable[str | os.PathLike] = (),
                      download_dir: str | os.PathLike | None = None, token: str | None = None,
                      cache_dir: str | None = None, what: str = "model") -> Path:
    """Turn a folder path, a models-folder entry name or a hub id into a local folder."""
    if not source or not str(source).strip():
        raise UserInputError(f"no {what} given: choose a folder from the list, a path, or a hub id such as org/name.")
    source = str(source).strip()
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserInputError(f"{what} {source!r} is a file; point at the model's folder (the one with config.json).")
    search_dirs = [Path(d) for d in search_dirs]
    for d in search_dirs:
        candidate = d / source
        if candidate.is_dir():
            return candidate
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1 or "\\" in source:
        raise UserInputError(f"{what} folder not found: {source}. Check the path"
                             + (f", or put the folder in one of: {', '.join(map(str, search_dirs))}" if search_dirs else "")
                             + ".")
    if HUB_ID.match(source):
        base = Path(download_dir) if download_dir else (search_dirs[0] if search_dirs else None)
        if base is None:
            base = Path(hub_cache_dir(cache_dir) or Path.home() / ".cache" / "qwen_identity")
        target = base / source.split("/", 1)[1]
        if target.is_dir() and any(target.iterdir()):
            return target
        check_download(what)
        return _download(source, target, token, cache_dir, what)
    where = f" Put it in one of: {', '.join(map(str, search_dirs))}." if search_dirs else ""
    raise UserInputError(f"{what} {source!r} is neither a folder nor a hub id (org/name).{where}")
