"""core/measurement/loss_curve: the loss chart shared by the training runs' PNG and the tuning node's IMAGE."""

import io

import numpy as np
from PIL import Image

from qwen_identity.core.measurement import loss_curve as lc


def test_non_finite_losses_are_left_out():
    assert lc.finite_points(lc.per_index([1.0, None, float("nan"), 0.5, float("inf")])) == [(1, 1.0), (4, 0.5)]


def test_the_chart_draws_each_series_in_its_own_colour():
    series = {"train": lc.per_index([1.0, 0.8, 0.6]), "validation": [(1, 0.9), (3, float("nan"))]}
    img = np.asarray(lc.draw_loss_chart(series, "t", size=(320, 200)))
    blank = np.asarray(lc.draw_loss_chart({}, "t", size=(320, 200)))
    assert img.shape == (200, 320, 3)
    for color in lc.PALETTE[:2]:
        assert (img == color).all(-1).sum() > 10 and not (blank == color).all(-1).any()


def test_the_png_falls_back_to_pil_without_matplotlib(monkeypatch):
    monkeypatch.setattr(lc, "matplotlib_png", lambda *a, **k: None)
    png = lc.loss_curve_png({"train": lc.per_index([2.0, 1.0])}, "title", "step")
    assert Image.open(io.BytesIO(png)).size == (640, 400)
