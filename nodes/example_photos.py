"""The pack's example photos in ComfyUI's input folder, so the shipped workflows open with no missing image.

LoadImage lists only ComfyUI's `input/` folder. When ComfyUI imports the pack, each photo in
example_photos/ is copied there unless a file of that name already exists (never overwritten; an
unwritable folder only logs a warning). Source and licence: example_photos/SOURCES.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..core.files.atomic import atomic_write_bytes

EXAMPLE_PHOTOS = Path(__file__).resolve().parents[1] / "example_photos"
_log = logging.getLogger(__name__)


def comfyui_input_dir() -> Path | None:
    try:
        import folder_paths  # type: ignore[import-not-found]

        return Path(folder_paths.get_input_directory())
    except Exception:   # not inside ComfyUI (or a stand-in without an input folder)
        return None


def install_example_photos(input_dir: Path | None = None) -> list[Path]:
    """Copy the example photos missing from `input_dir` (default: ComfyUI's input folder); the copies made."""
    target = comfyui_input_dir() if input_dir is None else Path(input_dir)
    if target is None:
        return []
    copied = []
    for src in sorted(EXAMPLE_PHOTOS.glob("*.jpg")):
        dst = target / src.name
        if dst.exists():
            continue
        try:
            target.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dst, src.read_bytes())
        except OSError as e:
            _log.warning("qwen_identity: could not copy the example photo %s to %s (%s); copy it by hand for the "
                         "example workflows", src.name, target, e)
            break
        copied.append(dst)
    if copied:
        _log.info("qwen_identity: copied %d example photo(s) into %s for the example workflows", len(copied), target)
    return copied
