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


def test_the_workflows_name_the_shipped_photos_which_are_small_and_sourced():
    shipped = sorted(p.name for p in EXAMPLE_PHOTOS.glob("*.jpg"))
    assert shipped == sorted(bw.PHOTOS)
    sources = (EXAMPLE_PHOTOS / "SOURCES.md").read_text(encoding="utf-8")
    assert "public domain" in sources.lower() and "https://flic.kr/p/r9qvLn" in sources
    for name in shipped:
        assert f"`{name}`" in sources, name
        path = EXAMPLE_PHOTOS / name
        assert path.stat().st_size < 100_000
        with Image.open(path) as im:
            assert im.mode == "RGB" and min(im.size) >= 256
    named = set()
    for wf in sorted((ROOT / "workflows").glob("*.json")):
        for node in json.loads(wf.read_text())["nodes"]:
            if node["type"] == "LoadImage":
                named.add(node["widgets_values"][0])
    # every LoadImage opens with a shipped photo, except the two-people workflow's second person
    assert named - set(shipped) == {"person_b.png"}, named


def test_copies_missing_photos_into_the_input_folder_and_never_overwrites(tmp_path, monkeypatch):
    mine = tmp_path / "input" / bw.PHOTOS[0]
    mine.parent.mkdir()
    mine.write_bytes(b"the user's own file")
    copied = install_example_photos(tmp_path / "input")
    assert sorted(p.name for p in copied) == sorted(bw.PHOTOS[1:])
    assert mine.read_bytes() == b"the user's own file"
    for p in copied:
        assert p.read_bytes() == (EXAMPLE_PHOTOS / p.name).read_bytes()
    assert install_example_photos(tmp_path / "input") == []

    # inside ComfyUI the folder is folder_paths' input directory; outside, nothing happens
    fp = types.SimpleNamespace(get_input_directory=lambda: str(tmp_path / "comfy_input"))
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    assert len(install_example_photos()) == len(bw.PHOTOS)
    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace())
    assert install_example_photos() == []


def test_an_unwritable_input_folder_only_warns(tmp_path, caplog):
    blocker = tmp_path / "input"
    blocker.write_text("a file where the folder should be")
    assert install_example_photos(blocker) == []
    assert "could not copy the example photo" in caplog.text


def test_the_face_crop_the_workflows_use_finds_one_face_in_each_photo():
    from qwen_identity.core.identity.face_crop import crop_region

    for name in bw.PHOTOS:
        with Image.open(EXAMPLE_PHOTOS / name) as im:
            _, info = crop_region(im.convert("RGB"), "face")
        assert info.faces_found == 1, (name, info)


def test_no_folder_shadows_the_workflow_templates():
    """ComfyUI's template browser serves the FIRST of example_workflows, example, examples, workflow, workflows
    that a pack has (0.3.64's order); a folder of photos named `examples` hid every workflow once."""
    shadowing = [name for name in ("example_workflows", "example", "examples", "workflow") if (ROOT / name).exists()]
    assert not shadowing, f"{shadowing} would be served instead of workflows/: rename it"
