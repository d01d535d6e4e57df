"""The loss-curve PNG a training run writes next to its metrics (the chart itself: core/measurement/loss_curve)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..core.files.atomic import atomic_write_bytes
from ..core.measurement.loss_curve import loss_curve_png, per_index


def write_loss_curve(path: Path, train_loss: Sequence[float | None], val_loss: Sequence[float | None],
                     title: str = "residual head training loss", xlabel: str = "epoch") -> Path:
    """The train and validation losses (one per epoch or step) as a PNG at `path`, written atomically."""
    series = {"train": per_index(train_loss), "validation": per_index(val_loss)}
    return atomic_write_bytes(path, loss_curve_png(series, title, xlabel))
