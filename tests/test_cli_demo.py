"""`qwen-identity demo` on a fresh machine (no models configured): tiny stand-ins end to end."""

import json
import subprocess
import sys

from PIL import Image
from qwen_identity.core.residual.model_card import head_path


def test_demo_runs_end_to_end_offline(cli_env, tmp_path):
    out = tmp_path / "demo"
    env = dict(cli_env)
    env.pop("QWEN_IDENTITY_MODELS_DIR", None)
    r = subprocess.run([sys.executable, "-m", "qwen_identity.cli", "demo", "--out-dir", str(out), "--identities", "1"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RANDOM-WEIGHT STAND-INS" in r.stdout and "--qwen-image-model" in r.stdout
    assert "noise" in r.stdout.lower()
    assert head_path(out).is_file()
    grids = sorted((out / "generations").glob("*_alpha_grid.png"))
    assert [g.name for g in grids] == ["seed_100_alpha_grid.png"]
    meta = json.loads((out / "generations" / "seed_100_meta.json").read_text())
    assert meta["stand_in_models"] is True and meta["demo"] is True
    assert (meta["width"], meta["height"], meta["steps"]) == (64, 64, 4)
    assert meta["alphas"] == [0.5, 1.0, 1.5] and meta["seeds"] == [1234, 5678, 9999]
    assert Image.open(grids[0]).size == tuple(meta["grid"]["grid_size"])


def test_demo_refuses_half_real_models(cli_env, tmp_path):
    from qwen_identity.cli import main

    assert main(["demo", "--out-dir", str(tmp_path / "d"), "--qwen-image-model", "Qwen/Qwen-Image"]) == 2


def test_demo_runs_on_tiny_qwen_image_21(tmp_path, monkeypatch, capsys):
    """--family qwen-image-2.1: the tiny 2.1 pipeline is written under the out-dir and the whole demo runs
    through it (the head records the family and the 2.1 text width)."""
    from qwen_identity.cli import main
    from qwen_identity.core.families import detect_family
    from qwen_identity.core.residual.head import load_head

    monkeypatch.delenv("QWEN_IDENTITY_MODELS_DIR", raising=False)
    out = tmp_path / "demo21"
    assert main(["demo", "--out-dir", str(out), "--identities", "1", "--family", "qwen-image-2.1",
                 "--device", "cpu"]) == 0, capsys.readouterr().err[-3000:]
    qi = out / "tiny_models" / "tiny-qwen-image-2.1"
    assert detect_family(qi).name == "qwen-image-2.1"
    head = load_head(head_path(out))
    assert head.meta.family == "qwen-image-2.1" and head.meta.hidden_size == 48
    meta = json.loads((out / "generations" / "seed_100_meta.json").read_text())
    assert meta["qwen_image_model"] == str(qi) and (meta["width"], meta["height"]) == (64, 64)
    grid = Image.open(out / "generations" / "seed_100_alpha_grid.png")
    assert grid.size == tuple(meta["grid"]["grid_size"])
