"""nodes/example_photos.py and example_photos/: the photos the workflows open with ship with the pack,
with their source and licence, and reach ComfyUI's input folder without overwriting anything."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

from PIL import Image

from comfyui_harness import build_workflows as bw
from qwen_identity.nodes.example_photos import EXAMPLE_PHOTOS, install_example_photos

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_photos_are_small_and_sourced():
    shipped = sorted(p.name for p in EXAMPLE_PHOTOS.glob("*.jpg"))
    assert shipped == sorted(bw.SHIPPED_PHOTOS)
    sources = (EXAMPLE_PHOTOS / "SOURCES.md").read_text(encoding="utf-8")
    assert "public domain" in sources.lower() and "https://flic.kr/p/r9qvLn" in sources
    assert 'get_sample_data("grace_hopper.jpg")' in sources and "17 U.S.C. § 105" in sources
    for name in shipped:
        assert f"`{name}`" in sources, name
        path = EXAMPLE_PHOTOS / name
        assert path.stat().st_size < 100_000
        with Image.open(path) as im:
            assert im.mode == "RGB" and min(im.size) >= 256


def _load_image_names(wf: Path) -> set[str]:
    data = json.loads(wf.read_text(encoding="utf-8"))
    if "nodes" in data:   # UI format
        return {n["widgets_values"][0] for n in data["nodes"] if n["type"] == "LoadImage"}
    return {n["inputs"]["image"] for n in data.values() if n.get("class_type") == "LoadImage"}


def test_every_image_a_shipped_workflow_names_ships_in_example_photos():
    """A first load of any workflow (UI file or API twin) shows no missing input, and no photo ships unused."""
    shipped = {p.name for p in EXAMPLE_PHOTOS.glob("*.jpg")}
    files = sorted((ROOT / "workflows").glob("*.json")) + sorted((ROOT / "workflows" / "api").glob("*.json"))
    assert len(files) == 2 * len(bw.WORKFLOW_FILES)
    named = set()
    for wf in files:
        names = _load_image_names(wf)
        assert names <= shipped, (wf.name, names - shipped)
        named |= names
    assert named == shipped


def test_the_two_people_workflow_opens_with_two_different_people():
    ui = _load_image_names(ROOT / "workflows" / "qwen_identity_two_people.json")
    api = _load_image_names(ROOT / "workflows" / "api" / "qwen_identity_two_people_api.json")
    assert ui == api == set(bw.PEOPLE_PHOTOS) and len(bw.PEOPLE_PHOTOS) == 2
    assert bw.PEOPLE_PHOTOS[0] in bw.PHOTOS and bw.PEOPLE_PHOTOS[1] not in bw.PHOTOS


def test_person_b_is_the_documented_crop_of_matplotlibs_grace_hopper():
    """SOURCES.md's recipe, run on matplotlib's file, gives the shipped photo (up to JPEG coding differences)."""
    import numpy as np
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        made = im.convert("RGB").crop((0, 0, 512, 512)).resize((448, 448), Image.Resampling.LANCZOS)
    with Image.open(EXAMPLE_PHOTOS / bw.PERSON_B_PHOTO) as im:
        shipped = im.convert("RGB")
    assert shipped.size == made.size
    diff = np.abs(np.asarray(shipped, dtype=np.int16) - np.asarray(made, dtype=np.int16))
    assert diff.mean() < 6, diff.mean()   # 2.5 here (JPEG quality 88); a crop 24 pixels lower: 41


def test_copies_missing_photos_into_the_input_folder_and_never_overwrites(tmp_path, monkeypatch):
    mine = tmp_path / "input" / bw.SHIPPED_PHOTOS[0]
    mine.parent.mkdir()
    mine.write_bytes(b"the user's own file")
    copied = install_example_photos(tmp_path / "input")
    assert sorted(p.name for p in copied) == sorted(bw.SHIPPED_PHOTOS[1:])
    assert mine.read_bytes() == b"the user's own file"
    for p in copied:
        assert p.read_bytes() == (EXAMPLE_PHOTOS / p.name).read_bytes()
    assert install_example_photos(tmp_path / "input") == []

    # inside ComfyUI the folder is folder_paths' input directory; outside, nothing happens
    fp = types.SimpleNamespace(get_input_directory=lambda: str(tmp_path / "comfy_input"))
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    assert len(install_example_photos()) == len(bw.SHIPPED_PHOTOS)
    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace())
    assert install_example_photos() == []


def test_an_unwritable_input_folder_only_warns(tmp_path, caplog):
    blocker = tmp_path / "input"
    blocker.write_text("a file where the folder should be")
    assert install_example_photos(blocker) == []
    assert "could not copy the example photo" in caplog.text


def test_the_face_crop_the_workflows_use_finds_one_face_in_each_photo():
    from qwen_identity.core.identity.face_crop import crop_region

    for name in bw.SHIPPED_PHOTOS:
        with Image.open(EXAMPLE_PHOTOS / name) as im:
            _, info = crop_region(im.convert("RGB"), "face")
        assert info.faces_found == 1, (name, info)


def test_no_folder_shadows_the_workflow_templates():
    """ComfyUI's template browser serves the FIRST of example_workflows, example, examples, workflow, workflows
    that a pack has (0.3.64's order); a folder of photos named `examples` hid every workflow once."""
    shadowing = [name for name in ("example_workflows", "example", "examples", "workflow") if (ROOT / name).exists()]
    assert not shadowing, f"{shadowing} would be served instead of workflows/: rename it"
