"""AlphaGrid's core: geometry, cell placement (α-major), labels, notes and errors."""

import numpy as np
import pytest
from PIL import Image

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.generation.grid import GAP, alpha_label, make_grid, seed_label


def cells(n, size=(64, 48)):
    return [Image.new("RGB", size, (10 * i, 200 - 10 * i, 37)) for i in range(n)]


def test_geometry_and_placement():
    alphas, seeds = [0.5, 1.0, 1.5], [1234, 5678]
    g = make_grid(cells(6), alphas, seeds)
    m = g.meta
    left, top = m["origin"]
    gap = m["col_pitch"] - 64
    assert gap == m["row_pitch"] - 48 >= 0
    assert g.image.size == tuple(m["grid_size"]) == (left + 2 * 64 + gap, top + 3 * 48 + 2 * gap)
    assert left > 0 and top > 0  # room for the row and column labels
    arr = np.asarray(g.image)
    for cell in m["cells"]:
        k = cell["row"] * 2 + cell["col"]
        assert (cell["alpha"], cell["seed"]) == (alphas[cell["row"]], seeds[cell["col"]])
        patch = arr[cell["y"]:cell["y"] + 48, cell["x"]:cell["x"] + 64]
        assert (patch == np.array([10 * k, 200 - 10 * k, 37])).all()  # α-major: row r, column c is image r*cols+c
    assert m["cells"][3]["label"] == "alpha=1, seed 5678"


def test_labels_are_drawn():
    g = make_grid(cells(2), [0.0, 2.0], [7])
    arr = np.asarray(g.image).astype(int)
    left, top = g.meta["origin"]
    header = arr[:top, left:]
    margin = arr[top:, :left]
    assert (header < 128).any() and (margin < 128).any()  # dark text on the white bands
    again = make_grid(cells(2), [0.0, 2.0], [7])
    assert np.array_equal(np.asarray(again.image), arr)  # deterministic
    other = np.asarray(make_grid(cells(2), [0.0, 3.0], [7]).image).astype(int)
    assert other.shape == arr.shape and not np.array_equal(other, arr)  # the label text is what differs
    assert alpha_label(0.5) == "alpha=0.5" and seed_label(12) == "seed 12"


def test_cell_notes_add_a_band_under_each_cell():
    plain = make_grid(cells(4), [0, 1], [1, 2])
    noted = make_grid(cells(4), [0, 1], [1, 2], cell_notes=["sim 0.41", "sim 0.52", "sim 0.63", "sim 0.74"])
    assert noted.image.size[1] > plain.image.size[1]
    assert noted.meta["cells"][2]["note"] == "sim 0.63"
    c = noted.meta["cells"][0]
    band = np.asarray(noted.image)[c["y"] + 48:c["y"] + noted.meta["row_pitch"] - GAP, c["x"]:c["x"] + 64]
    assert (band < 128).any()


def test_errors():
    with pytest.raises(UserInputError, match="needs 2 α × 2 seeds = 4 images but got 3"):
        make_grid(cells(3), [0, 1], [1, 2])
    with pytest.raises(UserInputError, match="at least one"):
        make_grid([], [], [1])
    with pytest.raises(UserInputError, match="cell_notes"):
        make_grid(cells(1), [0], [1], cell_notes=["a", "b"])
    with pytest.raises(UserInputError, match="same size"):
        make_grid(cells(1) + cells(1, (32, 32)), [0, 1], [1])
