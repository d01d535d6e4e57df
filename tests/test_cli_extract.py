"""`qwen-identity extract`: one entry per seed dir, equal to the core's features; bad input exits 2."""

import hashlib
import subprocess
import sys

import pytest
import torch

from qwen_identity.cli import main
from qwen_identity.core.identity.features import FeatureSettings, extract_features, load_feature_cache
from qwen_identity.core.files.images import load_image

FAST = ["--device", "cpu", "--resolution", "pixel_budget", "--max-pixels", "4096", "--crop", "full"]


def hashes(dirs):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


def test_extract_writes_one_entry_per_seed_dir(make_dataset, tiny_qwen3vl_dir, tmp_path, capsys):
    from qwen_identity.core.identity.qwen3vl import load_qwen3vl

    dirs = make_dataset(identities=2, views=3)
    before = hashes(dirs + [tiny_qwen3vl_dir])
    out = tmp_path / "out" / "features.safetensors"
    rc = main(["extract", "--seed-dirs", ",".join(map(str, dirs)), "--qwen3-vl-model", str(tiny_qwen3vl_dir),
               "--out", str(out), "--batch-size", "2", *FAST])
    assert rc == 0, capsys.readouterr().err
    assert hashes(dirs + [tiny_qwen3vl_dir]) == before  # inputs untouched
    cache = load_feature_cache(out)
    by_dir = {item.meta["seed_dir"]: item for item in cache.values()}
    assert list(by_dir) == [str(d) for d in dirs]
    bundle = load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu")
    for d in dirs:
        item = by_dir[str(d)]
        assert item.meta["photos"] == ["photo_view_0.png", "photo_view_1.png", "photo_view_2.png"]
        assert item.meta["resolution"] == "pixel_budget" and item.meta["max_pixels"] == 4096
        direct = extract_features(bundle, [load_image(d / f"photo_view_{i}.png") for i in range(3)],
                                  FeatureSettings(resolution="pixel_budget", crop="full", max_pixels=4096), batch_size=2)
        assert torch.equal(item.per_image, direct.per_image) and torch.equal(item.combined, direct.combined)
    assert "wrote" in capsys.readouterr().out


def test_unreadable_photo_is_skipped_with_a_warning_in_a_subprocess(make_dataset, tiny_qwen3vl_dir, tmp_path, cli_env):
    dirs = make_dataset(identities=1, views=2)
    bad = dirs[0] / "photo_view_10.png"
    bad.write_bytes(b"this is not a png")
    listing = tmp_path / "dirs.txt"
    listing.write_text(f"# one identity\n{dirs[0]}\n")
    out = tmp_path / "f.safetensors"
    r = subprocess.run([sys.executable, "-m", "qwen_identity.cli", "extract", "--seed-dirs-file", str(listing),
                        "--qwen3-vl-model", str(tiny_qwen3vl_dir), "--out", str(out), *FAST],
                       env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"skipping unreadable photo {bad}" in r.stderr and "Traceback" not in r.stderr
    (item,) = load_feature_cache(out).values()
    assert item.meta["photos"] == ["photo_view_0.png", "photo_view_1.png"]
    assert item.meta["skipped"] == ["photo_view_10.png"] and item.n_images == 2
    assert bad.read_bytes() == b"this is not a png"


def run_bad(args, capsys):
    rc = main(["extract", *args])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    return err


def test_identity_without_readable_photo_names_the_directory(make_dataset, tiny_qwen3vl_dir, tmp_path, capsys):
    dirs = make_dataset(identities=2, views=1)
    (dirs[1] / "photo_view_0.png").write_bytes(b"")
    out = tmp_path / "f.safetensors"
    err = run_bad(["--seed-dirs", f"{dirs[0]},{dirs[1]}", "--qwen3-vl-model", str(tiny_qwen3vl_dir), "--out",
                   str(out), *FAST], capsys)
    assert f"seed directory {dirs[1]} has no readable photo" in err
    assert not out.exists()


def test_seed_dir_without_photos(tmp_path, tiny_qwen3vl_dir, capsys):
    (tmp_path / "seed_1").mkdir()
    err = run_bad(["--seed-dirs", str(tmp_path / "seed_1"), "--qwen3-vl-model", str(tiny_qwen3vl_dir),
                   "--out", str(tmp_path / "f.safetensors")], capsys)
    assert "has no photo_view_*.png" in err


@pytest.mark.parametrize("which, match", [("text_encoder", "model_type 'qwen2_5_vl'"),
                                          ("missing_shard", "missing 1 of its 2 weight shards")])
def test_bad_models(which, match, make_dataset, tiny_qwenimage_dir, tiny_qwen3vl_dir, tmp_path, capsys):
    import json
    import shutil

    if which == "text_encoder":
        model = tiny_qwenimage_dir / "text_encoder"
    else:
        model = tmp_path / "broken"
        shutil.copytree(tiny_qwen3vl_dir, model)
        (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    dirs = make_dataset(identities=1, views=1)
    err = run_bad(["--seed-dirs", str(dirs[0]), "--qwen3-vl-model", str(model), "--out",
                   str(tmp_path / "f.safetensors"), *FAST], capsys)
    assert match in err


def test_bad_arguments(make_dataset, tiny_qwen3vl_dir, tmp_path, capsys):
    dirs = make_dataset(identities=1, views=1)
    common = ["--seed-dirs", str(dirs[0]), "--qwen3-vl-model", str(tiny_qwen3vl_dir)]
    assert "must end in .safetensors" in run_bad([*common, "--out", str(dirs[0] / "photo_view_0.png")], capsys)
    assert "batch-size" in run_bad([*common, "--out", str(tmp_path / "f.safetensors"), "--batch-size", "0"], capsys)
    assert "max_pixels" in run_bad([*common, "--out", str(tmp_path / "f.safetensors"), "--resolution",
                                    "pixel_budget", "--max-pixels", "10"], capsys)
    assert "no seed directories" in run_bad(["--qwen3-vl-model", "x", "--out", str(tmp_path / "f.safetensors")],
                                            capsys)


def test_extract_keys_entries_by_content_model_settings_and_dtype(make_dataset, tiny_qwen3vl_dir, tmp_path):
    """One key scheme for every feature cache: `extract` writes the key `train`/`sweep` look up (photos'
    sha256, model, settings, dtype), so moving the photos keeps it and another dtype never reuses it."""
    from qwen_identity.core.pipeline.cache_keys import feature_key, photo_hashes
    from qwen_identity.core.identity.seed_dirs import load_seed_dir

    d = make_dataset(identities=1, views=2)[0]
    out = tmp_path / "f.safetensors"
    assert main(["extract", "--seed-dirs", str(d), "--qwen3-vl-model", str(tiny_qwen3vl_dir), "--out", str(out),
                 "--dtype", "fp32", *FAST]) == 0
    settings = FeatureSettings(resolution="pixel_budget", crop="full", max_pixels=4096)
    hashes_ = photo_hashes(load_seed_dir(d).photos)
    key = feature_key(str(tiny_qwen3vl_dir), settings, hashes_, torch.float32)
    assert list(load_feature_cache(out)) == [key]
    assert feature_key(str(tiny_qwen3vl_dir), settings, hashes_, torch.bfloat16) != key
    moved = tmp_path / "elsewhere" / d.name
    moved.parent.mkdir()
    d.rename(moved)
    assert feature_key(str(tiny_qwen3vl_dir), settings, photo_hashes(load_seed_dir(moved).photos), "float32") == key
