"""`qwen-identity prepare`: photos grouped per person -> seed dirs; faceless photos skipped and counted.

Real faces come from tests/real_faces.py (Eileen Collins, Grace Hopper, a cat = no face); the list-file
formats are checked on synthetic images with `--face-detector none` (no dlib, fast).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from qwen_identity.cli import main
from qwen_identity.core.errors import UserInputError
from qwen_identity.core.identity import prepare as prep
from qwen_identity.core.identity.seed_dirs import load_seed_dirs, parse_seed_dir_args
from qwen_identity.tiny_models.dataset import identity_photo
from real_faces import astronaut, astronaut_variants, cat, grace_hopper


def digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".qwen-identity")}


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def side_by_side(a: Image.Image, b: Image.Image) -> Image.Image:
    h = max(a.height, b.height)
    out = Image.new("RGB", (a.width + b.width, h), (128, 128, 128))
    out.paste(a, (0, 0))
    out.paste(b, (a.width, 0))
    return out


@pytest.fixture(scope="module")
def people_dir(tmp_path_factory):
    """alice: 3 photos of one face + a cat; bob: 2 of another face + a group photo; carol: a cat and junk."""
    root = tmp_path_factory.mktemp("prepare_in") / "people"
    v = astronaut_variants()
    files = {
        "alice/img_1.jpg": astronaut(), "alice/img_2.png": v["flipped"], "alice/img_10.png": v["cropped"],
        "alice/img_3.png": cat(),
        "bob/a.png": grace_hopper(), "bob/b.png": grace_hopper().transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "bob/group.png": side_by_side(astronaut(), grace_hopper()),
        "carol/c.png": cat(),
    }
    for rel, im in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / rel)
    (root / "carol" / "junk.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "alice" / "caption.txt").write_text("a photo of an astronaut\n", encoding="utf-8")
    (root / "alice" / "notes.md").write_text("not a photo")
    return root


@pytest.fixture(scope="module")
def prepared(people_dir, tmp_path_factory):
    before = digests(people_dir)
    out = tmp_path_factory.mktemp("prepare_out") / "seeds"
    code = main(["prepare", "--photos", str(people_dir), "--out-dir", str(out), "--caption", "a photo of a person"])
    assert digests(people_dir) == before, "prepare changed an input file"
    return code, out


def test_folder_layout_keeps_faces_and_counts_every_skip(prepared, people_dir, capsys):
    code, out = prepared
    assert code == 0
    report = json.loads((out / prep.REPORT_FILE).read_text())
    assert [p["person"] for p in report["people"]] == ["alice", "bob"]
    assert [p["person"] for p in report["skipped_people"]] == ["carol"]
    # alice: her three face photos in natural order (img_1, img_2, img_10); the cat is "no face"
    alice = report["people"][0]
    assert [p["source"] for p in alice["photos"]] == ["alice/img_1.jpg", "alice/img_2.png", "alice/img_10.png"]
    assert [(s["source"], s["reason"]) for s in alice["skipped"]] == [("alice/img_3.png", "no face")]
    bob = report["people"][1]
    assert [p["source"] for p in bob["photos"]] == ["bob/a.png", "bob/b.png"]
    assert [(s["source"], s["reason"], s["faces_found"]) for s in bob["skipped"]] == [("bob/group.png", "several faces", 2)]
    assert report["photos_skipped"] == {"no face": 2, "several faces": 1, "unreadable": 1}
    assert report["photos_in"] == 9 and report["photos_written"] == 5
    # the layout the other commands read, pixel-exact copies as PNG
    dirs = load_seed_dirs(parse_seed_dir_args(seed_dirs_file=str(out / prep.SEED_LIST_FILE)))
    assert [d.name for d in dirs] == ["seed_alice", "seed_bob"]
    assert [p.name for p in dirs[0].photos] == ["photo_view_0.png", "photo_view_1.png", "photo_view_2.png"]
    assert np.array_equal(pixels(dirs[0].photos[1]), np.asarray(astronaut_variants()["flipped"]))
    assert np.array_equal(pixels(dirs[1].photos[0]), np.asarray(grace_hopper()))
    # a known caption wins over --caption, which fills in for the rest
    assert dirs[0].caption_path.read_text() == "a photo of an astronaut\n"
    assert dirs[1].caption_path.read_text() == "a photo of a person\n"
    assert not (out / "seed_carol").exists()


def test_summary_says_how_many_and_why(people_dir, tmp_path, capsys):
    assert main(["prepare", "--photos", str(people_dir), "--out-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 people written, 5 of 9 photos." in out
    assert "skipped 2 photo(s): no face" in out and "skipped 1 photo(s): several faces" in out
    assert "skipped 1 photo(s): unreadable" in out and "skipped 1 people" in out and "carol" in out


def test_rerun_is_byte_identical_and_needs_overwrite(prepared, people_dir, tmp_path, capsys):
    _, first = prepared
    second = tmp_path / "again"
    assert main(["prepare", "--photos", str(people_dir), "--out-dir", str(second), "--caption", "a photo of a person"]) == 0
    a, b = digests(first), digests(second)
    a.pop(prep.SEED_LIST_FILE), b.pop(prep.SEED_LIST_FILE)   # absolute paths of the two folders
    assert a == b
    capsys.readouterr()
    assert main(["prepare", "--photos", str(people_dir), "--out-dir", str(second)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite with fewer photos: the earlier run's extra views and caption are removed
    assert main(["prepare", "--photos", str(people_dir), "--out-dir", str(second), "--overwrite",
                 "--max-photos", "2", "--allow-several-faces"]) == 0
    assert sorted(p.name for p in (second / "seed_alice").iterdir()) == ["caption.txt", "photo_view_0.png",
                                                                         "photo_view_1.png"]
    assert sorted(p.name for p in (second / "seed_bob").iterdir()) == ["photo_view_0.png", "photo_view_1.png"]
    report = json.loads((second / prep.REPORT_FILE).read_text())
    assert "seed_bob/caption.txt" in report["removed_from_earlier_run"]
    assert "seed_alice/photo_view_2.png" in report["removed_from_earlier_run"]


def test_allow_several_faces_keeps_the_group_photo_and_min_face_drops_small_faces(people_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["prepare", "--photos", str(people_dir), "--out-dir", str(out), "--allow-several-faces"]) == 0
    bob = json.loads((out / prep.REPORT_FILE).read_text())["people"][1]
    assert [p["source"] for p in bob["photos"]] == ["bob/a.png", "bob/b.png", "bob/group.png"]
    # every single face here is 100-300 px wide: a 400 px minimum drops them all -> nobody left
    out2 = tmp_path / "o2"
    assert main(["prepare", "--photos", str(people_dir), "--out-dir", str(out2), "--min-face", "400"]) == 2
    report = json.loads((out2 / prep.REPORT_FILE).read_text())
    assert report["photos_skipped"] == {"face too small": 5, "no face": 2, "several faces": 1, "unreadable": 1}
    assert report["people_written"] == 0 and not list(out2.glob("seed_*"))


def test_max_side_scales_written_photos(people_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["prepare", "--photos", str(people_dir), "--out-dir", str(out), "--max-side", "128",
                 "--min-photos", "1"]) == 0
    with Image.open(out / "seed_alice" / "photo_view_0.png") as im:
        assert im.size == (128, 128)   # astronaut is 512x512
    with Image.open(out / "seed_bob" / "photo_view_0.png") as im:
        assert max(im.size) == 128 and im.size[0] < 128   # Grace Hopper is portrait


# ------------------------------------------------------------------------- list files (no face check)
@pytest.fixture
def flat_photos(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    for i in range(6):
        identity_photo(i // 2, i % 2).save(root / f"{i:06d}.jpg", quality=95)
    return root


@pytest.mark.parametrize("fmt", ["csv", "csv_noheader", "tsv", "txt", "json_map", "json_groups", "json_records"])
def test_list_formats_give_the_same_seed_dirs(fmt, flat_photos, tmp_path):
    pairs = [(f"{i:06d}.jpg", f"id{i // 2}") for i in range(6)]
    name, text = {
        "csv": ("l.csv", "image,identity,caption\n" + "".join(f"{f},{p},cap {p}\n" for f, p in pairs)),
        "csv_noheader": ("l.csv", "".join(f"{f},{p},cap {p}\n" for f, p in pairs)),
        "tsv": ("l.tsv", "file\tperson\tcaption\n" + "".join(f"{f}\t{p}\tcap {p}\n" for f, p in pairs)),
        "txt": ("identity_CelebA.txt", "".join(f"{f} {p} cap {p}\n" for f, p in pairs)),
        "json_map": ("l.json", json.dumps(dict(pairs))),
        "json_groups": ("l.json", json.dumps({f"id{k}": [f for f, p in pairs if p == f"id{k}"] for k in (2, 0, 1)})),
        "json_records": ("l.json", json.dumps([{"file": f, "person": p, "caption": f"cap {p}"} for f, p in pairs])),
    }[fmt]
    lst = tmp_path / "lists" / name
    lst.parent.mkdir()
    lst.write_text(text)
    out = tmp_path / "out"
    assert main(["prepare", "--list", str(lst), "--photos", str(flat_photos), "--out-dir", str(out),
                 "--face-detector", "none"]) == 0
    dirs = load_seed_dirs(parse_seed_dir_args(seed_dirs=f"{out}/seed_*"))
    assert [d.name for d in dirs] == ["seed_id0", "seed_id1", "seed_id2"]
    for k, d in enumerate(dirs):
        assert len(d.photos) == 2
        for v, photo in enumerate(d.photos):
            with Image.open(flat_photos / f"{2 * k + v:06d}.jpg") as src:
                assert np.array_equal(pixels(photo), np.asarray(src.convert("RGB")))
        has_caption = fmt not in ("json_map", "json_groups")
        assert (d.caption_path is not None) == has_caption
        if has_caption:
            assert d.caption_path.read_text() == f"cap id{k}\n"


def test_list_missing_files_are_counted_and_a_wrong_root_is_an_error(flat_photos, tmp_path, capsys):
    lst = tmp_path / "l.csv"
    lst.write_text("file,person\n000000.jpg,a\n000001.jpg,a\ngone.jpg,a\n000002.jpg,b\n")
    out = tmp_path / "out"
    assert main(["prepare", "--list", str(lst), "--photos", str(flat_photos), "--out-dir", str(out),
                 "--face-detector", "none", "--min-photos", "1"]) == 0
    assert "skipped 1 photo(s): file not found" in capsys.readouterr().out
    # relative to the list's own folder (no --photos) nothing exists: the message names --photos
    assert main(["prepare", "--list", str(lst), "--out-dir", str(tmp_path / "o2"), "--face-detector", "none"]) == 2
    err = capsys.readouterr().err
    assert "none of the 4 photos" in err and "--photos" in err


@pytest.mark.parametrize("text, needle", [
    ("file,who\na.jpg,x\n", "needs a photo column"),
    ("a.jpg\n", "expected a photo and a person id"),
    ("000000.jpg,a\n000000.jpg,b\n", "listed for two people"),
])
def test_bad_list_files(text, needle, flat_photos, tmp_path, capsys):
    lst = tmp_path / "l.csv"
    lst.write_text(text)
    assert main(["prepare", "--list", str(lst), "--photos", str(flat_photos), "--out-dir", str(tmp_path / "o"),
                 "--face-detector", "none"]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_json_and_unknown_suffix(flat_photos, tmp_path):
    (tmp_path / "l.json").write_text('{"a.jpg": {"nested": 1}}')
    with pytest.raises(UserInputError, match="expected"):
        prep.read_person_list(tmp_path / "l.json", flat_photos)
    (tmp_path / "l.xml").write_text("<x/>")
    with pytest.raises(UserInputError, match="use a .csv"):
        prep.read_person_list(tmp_path / "l.xml", flat_photos)


# ------------------------------------------------------------------------- bad input
def test_out_dir_inside_the_inputs_is_refused(people_dir, capsys):
    before = digests(people_dir)
    for out in (people_dir / "seeds", people_dir, people_dir.parent):
        assert main(["prepare", "--photos", str(people_dir), "--out-dir", str(out)]) == 2
        assert "overlaps the input folder" in capsys.readouterr().err
    assert digests(people_dir) == before


def test_list_layout_may_write_next_to_the_list_but_not_over_a_photo(flat_photos, tmp_path, capsys):
    lst = flat_photos / "ids.csv"   # list and photos in one folder; output inside it, beside them
    lst.write_text("file,person\n000000.jpg,a\n000001.jpg,a\n")
    assert main(["prepare", "--list", str(lst), "--out-dir", str(flat_photos / "seeds"), "--face-detector", "none"]) == 0
    assert (flat_photos / "seeds" / "seed_a" / "photo_view_1.png").is_file()
    assert main(["prepare", "--list", str(lst), "--out-dir", str(tmp_path), "--face-detector", "none"]) == 2
    assert "holds the listed photo" in capsys.readouterr().err


def test_no_input_and_flat_folder(tmp_path, flat_photos, capsys):
    assert main(["prepare", "--out-dir", str(tmp_path / "o")]) == 2
    assert "--photos DIR" in capsys.readouterr().err
    assert main(["prepare", "--photos", str(flat_photos), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no sub-folder with photos" in err and "6 photos directly" in err and "--list" in err


def test_missing_dlib_names_the_install_and_the_way_around(monkeypatch, people_dir, tmp_path, capsys):
    from qwen_identity.core.measurement import face_similarity as fs

    def no_dlib():
        raise UserInputError(fs.INSTALL_HINT)

    monkeypatch.setattr(fs, "_import_dlib", no_dlib)
    assert main(["prepare", "--photos", str(people_dir), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "--face-detector none" in err


@pytest.mark.parametrize("argv, needle", [
    (["--min-photos", "0"], "--min-photos must be at least 1"),
    (["--max-side", "10"], "--max-side must be 0"),
    (["--max-photos", "1", "--min-photos", "2"], "below --min-photos"),
    (["--min-face", "-1"], "--min-face must be at least 0"),
])
def test_bad_numbers(argv, needle, people_dir, tmp_path, capsys):
    assert main(["prepare", "--photos", str(people_dir), "--out-dir", str(tmp_path / "o"), *argv]) == 2
    assert needle in capsys.readouterr().err


def test_seed_dir_names_are_safe_and_unique():
    names = prep.seed_dir_names(["Ann Lee", "Ann_Lee", "../etc", "n000001", "", "é"])
    assert names["n000001"] == "seed_n000001" and names["../etc"] == "seed_etc"
    assert names["Ann Lee"] != names["Ann_Lee"] and names["Ann Lee"].startswith("seed_Ann_Lee-")
    assert len(set(names.values())) == len(names)
    assert all("/" not in n and n.startswith("seed_") for n in names.values())
