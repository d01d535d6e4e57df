"""Scores of a batch of images against one person's reference photos (what ScoreIdentity and AlphaGrid's
`reference` input report): dlib's face distance always, the Qwen3-VL feature cosine when a Qwen3-VL
bundle is given. Plain PIL in, a JSON-ready dict out; the node adapters only convert IMAGE tensors and
move the Qwen3-VL model on and off the GPU around the call (`on_device`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Sequence

from PIL import Image

from ..errors import UserInputError
from ..identity.qwen3vl import Qwen3VLBundle
from .evaluation import Progress, Scorers, notes_for, prepare_references, qwen3vl_embedder, score_images
from .face_similarity import THRESHOLD, FaceEmbedder


def score_identity(images: Sequence[Image.Image], references: Sequence[Image.Image], threshold: float = THRESHOLD,
                   detector: str = "hog", qwen3vl: Qwen3VLBundle | None = None, progress: Progress | None = None,
                   on_device: Callable[[Qwen3VLBundle], ContextManager] | None = None) -> dict:
    """Scores of `images` against `references` (JSON-ready dict with `references`, `face`, `summary`
    and `notes`, one note per image). `on_device(bundle)` is a context manager the caller may pass to
    hold the Qwen3-VL model on its device only while it scores."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise UserInputError(f"threshold must be a positive number (0.6 is the model's operating point), got {threshold}.")
    image_features = None
    if qwen3vl is not None:
        if not isinstance(qwen3vl, Qwen3VLBundle):
            raise UserInputError("the qwen3vl input must come from LoadQwen3VL.")
        image_features = qwen3vl_embedder(qwen3vl)
    scorers = Scorers(face=FaceEmbedder(detector=detector), image_features=image_features, threshold=float(threshold))
    guard = on_device(qwen3vl) if (qwen3vl is not None and on_device is not None) else contextlib.nullcontext()
    with guard:
        refs = prepare_references(list(references), scorers)
        row = score_images(list(images), refs, scorers, progress=progress)
    return {"references": refs.to_json(), **row, "notes": notes_for(row)}
