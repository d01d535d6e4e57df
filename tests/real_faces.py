"""Real photographs that PyPI packages ship inside their wheels (no download, no network).

- `astronaut()`: scikit-image's `data.astronaut()`, Eileen Collins (NASA portrait, public domain).
- `grace_hopper()`: matplotlib's `mpl-data/sample_data/grace_hopper.jpg`, Grace Hopper (a different
  person: the different-person case).
- `cat()`: scikit-image's `data.chelsea()`, a cat: an image without a human face.
Both packages are in the `test` extra of pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(np.asarray(data.astronaut()))


def grace_hopper() -> Image.Image:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as im:
        return im.convert("RGB")


def cat() -> Image.Image:
    from skimage import data

    return Image.fromarray(np.asarray(data.chelsea()))


def astronaut_variants() -> dict[str, Image.Image]:
    """The same person flipped, cropped around the face and enlarged, and shrunk to half size."""
    a = astronaut()
    return {
        "flipped": a.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "cropped": a.crop((60, 0, 360, 300)).resize((450, 450), Image.Resampling.LANCZOS),
        "resized": a.resize((256, 256), Image.Resampling.LANCZOS),
    }
