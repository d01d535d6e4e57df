"""Loss curves as pictures: one chart of named loss series (training, held-out, validation) over steps or
epochs. The training runs write it as a PNG next to their metrics (matplotlib when it is installed,
otherwise a plain PIL chart: the pack does not depend on matplotlib); the ComfyUI tuning node shows the PIL
chart as an IMAGE. Non-finite losses (NaN, inf, missing) are left out of every chart."""

from __future__ import annotations

import io
import math
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))   # series in order

Series = dict[str, Sequence[tuple[float, float]]]   # name -> (x, loss) points


def finite_points(points: Iterable[tuple[float, float | None]]) -> list[tuple[float, float]]:
    """The (x, loss) points whose loss is a finite number."""
    return [(x, float(y)) for x, y in points if y is not None and math.isfinite(y)]


def per_index(values: Sequence[float | None]) -> list[tuple[int, float | None]]:
    """One loss per epoch or step (1-based) -> (x, loss) points."""
    return [(i + 1, v) for i, v in enumerate(values)]


def matplotlib_png(series: Series, title: str, xlabel: str = "epoch") -> bytes | None:
    """The chart drawn by matplotlib as PNG bytes, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, points in series.items():
        pts = finite_points(points)
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


def draw_loss_chart(series: Series, title: str, xlabel: str = "epoch", size=(640, 400)) -> Image.Image:
    """The chart drawn with PIL (RGB, `size` = (width, height)): axes with ticks, one line with dots and a
    legend entry per series; an empty frame when no series has a finite point."""
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    finite = {name: finite_points(points) for name, points in series.items()}
    pts_all = [p for pts in finite.values() for p in pts]
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
        for x in range(int(x0), int(x1) + 1, int(step)):  # x ticks
            px, _ = to_px(x, y0)
            d.line([px, h - bottom, px, h - bottom + 4], fill=(0, 0, 0))
            d.text((px - 3, h - bottom + 8), str(x), fill=(0, 0, 0), font=font)
        d.text(((w - left - right) // 2 + left - 15, h - 20), xlabel, fill=(0, 0, 0), font=font)
        for j, (name, pts) in enumerate(finite.items()):
            color = PALETTE[j % len(PALETTE)]
            xy = [to_px(x, y) for x, y in pts]
            if len(xy) > 1:
                d.line(xy, fill=color, width=2)
            for px, py in xy:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
            d.line([w - right - 130, top + 12 + 14 * j, w - right - 110, top + 12 + 14 * j], fill=color, width=2)
            d.text((w - right - 105, top + 6 + 14 * j), name, fill=(0, 0, 0), font=font)
    return img


def loss_curve_png(series: Series, title: str, xlabel: str = "epoch") -> bytes:
    """PNG bytes of the chart: matplotlib's when it is installed, else `draw_loss_chart`'s."""
    png = matplotlib_png(series, title, xlabel)
    if png is not None:
        return png
    buf = io.BytesIO()
    draw_loss_chart(series, title, xlabel).save(buf, format="PNG")
    return buf.getvalue()
