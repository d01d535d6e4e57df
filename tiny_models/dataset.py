"""A synthetic identity dataset in the POC's layout: `seed_<n>/photo_view_<i>.png`.

Each identity has its own colour pattern; its views are shifted, rescaled and noised copies, so
views of one identity are closer to each other than to other identities (even for random models).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def identity_photo(identity: int, view: int, size: tuple[int, int] = (96, 128)) -> Image.Image:
    w, h = size
    rng = np.random.default_rng(1000 + identity)
    base = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    big = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.BILINEAR), dtype=np.float32)
    vrng = np.random.default_rng(identity * 97 + view)
    shift = vrng.integers(-6, 7, 2)
    big = np.roll(big, tuple(shift), axis=(0, 1))
    big = big * vrng.uniform(0.85, 1.15) + vrng.normal(0, 8, big.shape)
    return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8), "RGB")


def make_seed_dirs(root, identities: int = 3, views: int = 2, size: tuple[int, int] = (96, 128),
                   captions: dict[int, str] | None = None, first_seed: int = 100) -> list[Path]:
    """Write `identities` folders with `views` photos each; optional `caption.txt` per identity index."""
    root = Path(root)
    dirs = []
    for i in range(identities):
        d = root / f"seed_{first_seed + i}"
        d.mkdir(parents=True, exist_ok=True)
        for v in range(views):
            identity_photo(i, v, size).save(d / f"photo_view_{v}.png")
        if captions and i in captions:
            (d / "caption.txt").write_text(captions[i], encoding="utf-8")
        dirs.append(d)
    return dirs
