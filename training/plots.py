"""The loss-curve PNG: matplotlib when it is installed, otherwise a plain chart drawn with PIL
(the pack does not depend on matplotlib)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..core.files.atomic import atomic_write_bytes

COLORS = {"train": (31, 119, 180), "validation": (255, 127, 14)}


def _finite(values: Sequence[float | None]) -> list[tuple[int, float]]:
    return [(i + 1, float(v)) for i, v in enumerate(values) if v is not None and math.isfinite(v)]


def _matplotlib_png(series: dict[str, Sequence[float | None]], title: str, xlabel: str = "epoch") -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, values in series.items():
        pts = _finite(values)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _pil_png(series: dict[str, Sequence[float | None]], title: str, size=(640, 400), xlabel: str = "epoch") -> bytes:
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pts_all = [p for values in series.values() for p in _finite(values)]
    d.text((left, 12), title, fill=(0, 0, 0), font=font)
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    if pts_all:
        xs = [p[0] for p in pts_all]
        ys = [p[1] for p in pts_all]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = min(ys), max(ys)
        if y1 - y0 < 1e-12:
            y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad

        def to_px(x, y):
            return (left + (x - x0) / (x1 - x0) * (w - left - right),
                    h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

        for i in range(5):  # y ticks
            y = y0 + (y1 - y0) * i / 4
            _, py = to_px(x0, y)
            d.line([left - 4, py, left, py], fill=(0, 0, 0))
            d.text((4, py - 6), f"{y:.3g}", fill=(0, 0, 0), font=font)
        step = max(1, (x1 - x0) // 10)
        for x in range(int(x0), int(x1) + 1, int(step)):  # x ticks (epochs)
            px, _ = to_px(x, y0)
            d.line([px, h - bottom, px, h - bottom + 4], fill=(0, 0, 0))
            d.text((px - 3, h - bottom + 8), str(x), fill=(0, 0, 0), font=font)
        d.text(((w - left - right) // 2 + left - 15, h - 20), xlabel, fill=(0, 0, 0), font=font)
        for j, (name, values) in enumerate(series.items()):
            color = COLORS.get(name, (80, 80, 80))
            pts = [to_px(x, y) for x, y in _finite(values)]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            for px, py in pts:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
            d.line([w - right - 110, top + 12 + 14 * j, w - right - 90, top + 12 + 14 * j], fill=color, width=2)
            d.text((w - right - 85, top + 6 + 14 * j), name, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_loss_curve(path: Path, train_loss: Sequence[float | None], val_loss: Sequence[float | None],
                     title: str = "residual head training loss", xlabel: str = "epoch") -> Path:
    series = {"train": train_loss, "validation": val_loss}
    png = _matplotlib_png(series, title, xlabel) or _pil_png(series, title, xlabel=xlabel)
    return atomic_write_bytes(path, png)
