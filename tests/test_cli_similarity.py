"""`qwen-identity similarity IMG_A IMG_B` on real photographs shipped by PyPI packages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwen_identity.cli import main
from real_faces import astronaut, astronaut_variants, cat, grace_hopper


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    paths = {"astronaut": d / "astronaut.png", "flipped": d / "flipped.jpg", "hopper": d / "hopper.jpg",
             "cat": d / "cat.png", "broken": d / "broken.png"}
    astronaut().save(paths["astronaut"])
    astronaut_variants()["flipped"].save(paths["flipped"], quality=92)
    grace_hopper().save(paths["hopper"], quality=92)
    cat().save(paths["cat"])
    paths["broken"].write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return paths


def _run(capsys, *argv):
    rc = main(["similarity", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_same_person(capsys, photos):
    rc, out, _ = _run(capsys, photos["astronaut"], photos["flipped"])
    res = json.loads(out)
    assert rc == 0 and res["same_person"] is True and 0 < res["distance"] < 0.6 and res["threshold"] == 0.6
    assert all(im["faces_found"] >= 1 for im in res["images"])
    assert res["images"][0]["faces"][0]["used"] is True and len(res["images"][0]["faces"][0]["box"]) == 4
    assert res["images"][1]["path"] == str(photos["flipped"]) and res["note"] is None


def test_different_person_and_threshold_flag(capsys, photos):
    rc, out, _ = _run(capsys, photos["astronaut"], photos["hopper"])
    res = json.loads(out)
    assert rc == 0 and res["same_person"] is False and res["distance"] > 0.6
    rc, out, _ = _run(capsys, photos["astronaut"], photos["hopper"], "--threshold", "0.9")
    loose = json.loads(out)
    assert loose["distance"] == res["distance"] and loose["same_person"] is True and loose["threshold"] == 0.9


def test_no_face_is_json_with_null_distance(capsys, photos):
    rc, out, _ = _run(capsys, photos["cat"], photos["astronaut"])
    res = json.loads(out)
    assert rc == 0 and res["distance"] is None and res["same_person"] is None
    assert res["images"][0]["faces_found"] == 0 and res["images"][1]["faces_found"] == 1
    assert "no face found in" in res["note"] and str(photos["cat"]) in res["note"]


@pytest.mark.parametrize("which,msg", [("broken", "cannot decode photo"), ("missing", "photo not found")])
def test_unreadable_file_exits_2_with_one_line(capsys, photos, tmp_path, which, msg):
    bad = photos["broken"] if which == "broken" else tmp_path / "missing.png"
    rc, out, err = _run(capsys, photos["astronaut"], bad)
    assert rc == 2 and out == ""
    assert msg in err and str(bad) in err and len(err.strip().splitlines()) == 1


def test_bad_threshold_exits_2(capsys, photos):
    rc, _, err = _run(capsys, photos["astronaut"], photos["flipped"], "--threshold", "0")
    assert rc == 2 and "--threshold" in err


def test_subprocess_entry_point(photos, cli_env):
    p = subprocess.run([sys.executable, "-m", "qwen_identity.cli", "similarity", str(photos["astronaut"]),
                        str(photos["hopper"])], capture_output=True, text=True, env=cli_env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["same_person"] is False and "Traceback" not in p.stderr
