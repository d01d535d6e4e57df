"""Aspect-ratio buckets: train each photo at the size nearest its own shape, at one pixel budget.

A single training resolution centre-crops every photo to one shape: a portrait loses its top and
bottom at 1:1, a landscape its sides at 2:3. Buckets keep (nearly) the whole photo instead: from the
pixel count of the training resolution, `bucket_list` derives sizes of about that many pixels for a
range of aspect ratios (sides multiples of 16, the VAE's 8x times the transformer's 2x2 packing), each
photo goes to the bucket whose aspect is nearest its own (`nearest_bucket`, compared in log space, so
2:1 and 1:2 are equally far from 1:1) and is scaled to cover it and centre-cropped (a sliver at most);
a batch only ever holds photos of one bucket (`bucket_batches`), since latents of one batch share a shape.

The list is deterministic (the same resolution gives the same list), so a run records it and a
resumed run finds the same buckets. Personal tuning uses the same functions for its photos.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import UserInputError

MULTIPLE = 16
MAX_ASPECT = 2.0            # the widest bucket is 2:1, the tallest 1:2
ASPECT_STEPS = 4            # buckets per side between 1:1 and MAX_ASPECT (9 buckets in all)


def bucket_list(width: int, height: int, max_aspect: float = MAX_ASPECT, steps: int = ASPECT_STEPS,
                multiple: int = MULTIPLE) -> list[tuple[int, int]]:
    """Sizes (w, h), multiples of `multiple`, of about width*height pixels (never more), for aspects
    from 1:max_aspect to max_aspect:1 evenly spaced in log space, tallest first; the training
    resolution's own size is always in the list."""
    if width < multiple or height < multiple or width % multiple or height % multiple:
        raise UserInputError(f"a bucket resolution needs sides that are multiples of {multiple}, got {width}x{height}.")
    if max_aspect < 1 or steps < 0:
        raise UserInputError(f"max_aspect must be at least 1 and steps not negative, got {max_aspect}, {steps}.")
    pixels = width * height
    sizes = {(width, height)}
    for i in range(-steps, steps + 1):
        aspect = max_aspect ** (i / steps) if steps else 1.0
        w = max(multiple, int(math.sqrt(pixels * aspect) // multiple) * multiple)
        h = max(multiple, int(pixels / w // multiple) * multiple)
        sizes.add((w, h))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect is nearest the photo's (log-aspect distance; ties: the larger bucket)."""
    if width < 1 or height < 1:
        raise UserInputError(f"a photo of {width}x{height} pixels has no aspect ratio.")
    if not buckets:
        raise UserInputError("no buckets to choose from.")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def bucket_batches(buckets_of_photos: Sequence[tuple[int, int]], batch_size: int, seed: int,
                   epoch: int) -> list[list[int]]:
    """One epoch's batches: the photos of each bucket shuffled and cut into batches of at most
    `batch_size`, then the batches shuffled (all from `seed` and `epoch`, so a resumed run draws the
    same plan). Every photo appears exactly once; a batch never mixes buckets."""
    if batch_size < 1:
        raise UserInputError(f"batch size must be at least 1, got {batch_size}.")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(buckets_of_photos):
        groups.setdefault(tuple(b), []).append(i)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    batches = []
    for b in sorted(groups):
        members = groups[b]
        order = torch.randperm(len(members), generator=g).tolist()
        shuffled = [members[j] for j in order]
        batches += [shuffled[k:k + batch_size] for k in range(0, len(shuffled), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


__all__ = ["bucket_list", "nearest_bucket", "bucket_batches", "MAX_ASPECT", "ASPECT_STEPS", "MULTIPLE"]
