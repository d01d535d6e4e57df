"""The dataset layout: `seed_*/photo_view_*.png` folders, one per identity (the POC's layout)."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError

PHOTO_GLOB = "photo_view_*.png"
CAPTION_FILE = "caption.txt"


def natural_key(name: str):
    """Sort photo_view_2 before photo_view_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class SeedDir:
    """One identity: its folder, its photos (sorted), and its caption file if present."""

    path: Path
    photos: tuple[Path, ...]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def caption_path(self) -> Path | None:
        p = self.path / CAPTION_FILE
        return p if p.is_file() else None


def list_photos(directory: str | os.PathLike) -> list[Path]:
    d = Path(directory)
    return sorted((p for p in d.glob(PHOTO_GLOB) if p.is_file()), key=lambda p: natural_key(p.name))


def parse_seed_dir_args(seed_dirs: str | None = None, seed_dirs_file: str | None = None) -> list[Path]:
    """Comma-separated paths (each may be a glob such as `/data/seed_*`) and/or a file with one path a line."""
    raw: list[str] = []
    if seed_dirs:
        raw += [s.strip() for s in seed_dirs.split(",") if s.strip()]
    if seed_dirs_file:
        f = Path(seed_dirs_file)
        if not f.is_file():
            raise UserInputError(f"--seed-dirs-file {f} does not exist or is not a file.")
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserInputError(f"cannot read --seed-dirs-file {f} ({e}): it must be a UTF-8 text file with one "
                                 "folder per line.") from None
        raw += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    paths: list[Path] = []
    for item in raw:
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item), key=natural_key)
            if not matches:
                raise UserInputError(f"the pattern {item!r} matches no folder.")
            paths += [Path(m) for m in matches]
        else:
            paths.append(Path(item))
    if not paths:
        raise UserInputError("no seed directories given: pass --seed-dirs DIR[,DIR...] (or --seed-dirs-file).")
    seen, unique = set(), []
    for p in paths:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def load_seed_dir(path: str | os.PathLike, single_view: bool = False) -> SeedDir:
    """A seed directory with its photos, or UserInputError naming the folder and what is missing."""
    p = Path(path)
    if not p.exists():
        raise UserInputError(f"seed directory not found: {p}. Check the path.")
    if not p.is_dir():
        raise UserInputError(f"seed directory {p} is a file, not a folder.")
    photos = list_photos(p)
    if not photos:
        raise UserInputError(f"seed directory {p} has no {PHOTO_GLOB} files. Put the identity's photos there "
                             f"as photo_view_0.png, photo_view_1.png, ...")
    if single_view:
        photos = photos[:1]
    return SeedDir(p, tuple(photos))


def load_seed_dirs(paths: list[Path], single_view: bool = False) -> list[SeedDir]:
    return [load_seed_dir(p, single_view) for p in paths]
