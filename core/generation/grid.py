"""The α × seed grid (the POC's layout): rows = α values, columns = generation seeds.

A header row names each column ("seed 1234"), a left column names each row ("alpha=0.5"), both in
PIL's default font (scaled with the cell size; it has no Greek glyphs, hence "alpha"). Cells are
separated by a GAP-pixel white line. Cells are the images in α-major order (for each α,
for each seed), which is the order QwenImageSampleFromEmbeds returns. `cell_notes` (one string per
cell, e.g. a face-similarity score) are written in a band under each cell when given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..errors import UserInputError

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
GAP = 2


@dataclass
class Grid:
    image: Image.Image
    meta: dict


def alpha_label(alpha: float) -> str:
    return f"alpha={alpha:g}"


def seed_label(seed: int) -> str:
    return f"seed {seed}"


def _font(cell_w: int, cell_h: int):
    size = max(10, min(cell_w, cell_h) // 24)
    try:
        return ImageFont.load_default(size=size), size
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default(), 11


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1


def make_grid(images: Sequence[Image.Image], alphas: Sequence[float], seeds: Sequence[int],
              cell_notes: list[str] | None = None, extra_meta: dict | None = None,
              row_labels: list[str] | None = None) -> Grid:
    """One grid image and its metadata; images are α-major (len(alphas) × len(seeds)). `row_labels` replace
    the "α = ..." labels (rows that compare other settings than α)."""
    alphas, seeds, images = list(alphas), list(seeds), list(images)
    if not alphas or not seeds:
        raise UserInputError("the grid needs at least one α and one seed.")
    rows, cols = len(alphas), len(seeds)
    if len(images) != rows * cols:
        raise UserInputError(f"the grid needs {rows} α × {cols} seeds = {rows * cols} images but got {len(images)}: "
                             "give AlphaGrid the same α and seed lists the conditioning and sampler used.")
    if cell_notes is not None and len(cell_notes) != len(images):
        raise UserInputError(f"cell_notes has {len(cell_notes)} entries for {len(images)} cells.")
    cell_w, cell_h = images[0].size
    if any(im.size != (cell_w, cell_h) for im in images):
        raise UserInputError("all grid images must have the same size.")
    font, size = _font(cell_w, cell_h)
    pad = max(2, size // 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if row_labels is not None and len(row_labels) != rows:
        raise UserInputError(f"row_labels has {len(row_labels)} entries for {rows} rows.")
    row_labels = list(row_labels) if row_labels is not None else [alpha_label(a) for a in alphas]
    col_labels = [seed_label(s) for s in seeds]
    line_h = max(_text_size(probe, t, font)[1] for t in row_labels + col_labels + ["Ag"])
    left = max(_text_size(probe, t, font)[0] for t in row_labels) + 2 * pad
    top = line_h + 2 * pad
    note_h = line_h + 2 * pad if cell_notes is not None else 0
    col_pitch, row_pitch = cell_w + GAP, cell_h + note_h + GAP
    width, height = left + cols * col_pitch - GAP, top + rows * row_pitch - GAP
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    cells = []
    for c, label in enumerate(col_labels):
        tw, _ = _text_size(draw, label, font)
        draw.text((left + c * col_pitch + max(0, (cell_w - tw) // 2), pad), label, fill=INK, font=font)
    for r, label in enumerate(row_labels):
        y = top + r * row_pitch
        draw.text((pad, y + max(0, (cell_h - line_h) // 2)), label, fill=INK, font=font)
        for c in range(cols):
            k = r * cols + c
            x = left + c * col_pitch
            grid.paste(images[k].convert("RGB"), (x, y))
            cell = {"row": r, "col": c, "alpha": alphas[r], "seed": seeds[c], "x": x, "y": y,
                    "label": f"{row_labels[r]}, {col_labels[c]}"}
            if cell_notes is not None:
                draw.text((x + pad, y + cell_h + pad), str(cell_notes[k]), fill=INK, font=font)
                cell["note"] = str(cell_notes[k])
            cells.append(cell)
    meta = {"layout": "rows = alpha, columns = seed (alpha-major cell order)", "alphas": alphas, "seeds": seeds,
            "rows": rows, "cols": cols, "cell_size": [cell_w, cell_h], "grid_size": [width, height],
            "origin": [left, top], "col_pitch": col_pitch, "row_pitch": row_pitch, "cells": cells}
    if extra_meta:
        meta.update(extra_meta)
    return Grid(image=grid, meta=meta)
