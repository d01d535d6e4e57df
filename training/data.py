"""The training data: identities from seed directories, unreadable photos skipped, split by identity."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from ..core.files.dataset_fingerprint import dataset_fingerprint, file_sha256
from ..core.errors import UserInputError
from ..core.files.images import load_image
from ..core.identity.seed_dirs import load_seed_dir


@dataclass
class Identity:
    """One person: a seed directory's readable photos, their content hashes, its caption file text.

    Photos are decoded once when the identity is loaded (to skip unreadable ones) but not kept: a large
    dataset with warm caches never holds its pixels in memory. `load_images()` decodes them on demand."""

    name: str
    path: Path
    photos: list[Path]
    photo_hashes: list[str]
    caption_file_text: str | None

    def load_images(self, limit: int | None = None) -> list[Image.Image]:
        return [load_image(p) for p in self.photos[:limit]]


def readable_photos(paths: Sequence[Path], warn: Callable[[str], None],
                    first_only: bool = False) -> tuple[list[Path], list[str]]:
    """The photos among `paths` that decode (each one that does not is skipped with a warning naming it) and
    their sha256; `first_only`: stop at the first readable one."""
    photos, hashes = [], []
    for photo in paths:
        try:
            load_image(photo)
        except UserInputError as e:
            warn(f"skipping unreadable photo {photo}: {e}")
            continue
        photos.append(photo)
        hashes.append(file_sha256(photo))
        if first_only:
            break
    return photos, hashes


def load_identities(paths: Sequence[Path], single_view: bool = False,
                    warn: Callable[[str], None] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> list[Identity]:
    """Every `photo_view_*.png` of every seed dir (natural order). Missing folders or folders without photos
    are errors; an unreadable photo is skipped with a warning naming it; an identity left without photos is
    skipped with a warning; no usable identity at all is an error."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    seed_dirs = [load_seed_dir(p, single_view=False) for p in paths]  # errors for missing/empty dirs first
    identities: list[Identity] = []
    for i, sd in enumerate(seed_dirs):
        photos, hashes = readable_photos(sd.photos, warn, first_only=single_view)
        if progress:
            progress(i + 1, len(seed_dirs))
        if not photos:
            warn(f"skipping identity {sd.path}: none of its photos could be read.")
            continue
        caption = None
        if sd.caption_path is not None:
            try:
                caption = sd.caption_path.read_text(encoding="utf-8").strip() or None
            except (OSError, UnicodeDecodeError) as e:
                warn(f"ignoring unreadable caption file {sd.caption_path}: {e}")
            if caption is None:
                warn(f"ignoring empty caption file {sd.caption_path}.")
        identities.append(Identity(sd.name, sd.path, photos, hashes, caption))
    if not identities:
        raise UserInputError("no usable identities: none of the seed directories has a readable photo_view_*.png. "
                             "Check the folders and re-save the photos as PNG.")
    names = [ident.name for ident in identities]
    for ident in identities:
        if names.count(ident.name) > 1:  # same folder name under different parents: keep names unique
            ident.name = f"{ident.path.parent.name}_{ident.path.name}"
    return identities


def split_identities(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val) split by identity, deterministic from the seed. With val_fraction > 0 and at least
    two identities, validation gets round(n * fraction) identities, at least one, and training keeps at least one."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserInputError(f"--val-fraction must be in [0, 1) (got {val_fraction}).")
    if val_fraction == 0 or n < 2:
        return list(range(n)), []
    n_val = min(n - 1, max(1, int(math.floor(n * val_fraction + 0.5))))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


def identities_fingerprint(identities: Sequence[Identity], captions: Sequence[str | None] | None = None) -> str:
    captions = captions if captions is not None else [i.caption_file_text for i in identities]
    return dataset_fingerprint((i.name, i.photo_hashes, c) for i, c in zip(identities, captions))
