"""`qwen-identity train` with a Qwen-Image 2.1 `--qwen-image-model` (the tiny 2.1 pipeline): the caption and
denoise objectives train heads at the 2.1 text width that record family qwen-image-2.1, the denoise head
moves, the held-out gain is measured, and `eval --denoise-gain` refuses a 1.x head on the 2.1 model; two processes
train the one-process head; `prepare`'s seed folders train a 2.1 head. (--fp8-storage, --compile and --resume on 2.1:
tests/test_denoise_cli.py, parametrized over both families; tune --fp8-storage: tests/test_cli_tune.py.)"""

import json

import pytest

from qwen_identity.cli import main
from qwen_identity.core.residual.model_card import head_path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def train(tiny_models, tiny_qwenimage21_dir, run_cli):
    def run(*args, out, epochs=2):
        argv = ["train", "--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model",
                str(tiny_qwenimage21_dir), "--epochs", str(epochs), "--device", "cpu", "--out-dir", str(out),
                "--crop", "center", *args]   # the synthetic photos have no face
        return run_cli(argv)

    return run


def test_denoise_objective_on_21(train, make_dataset, tmp_path, tiny_qwenimage21_dir, tiny_models, capsys):
    from qwen_identity.core.residual.head import load_head

    people = ",".join(str(d) for d in make_dataset(identities=3, views=2, size=(40, 36)))
    code, _, err = train("--seed-dirs", people, "--objective", "denoise", "--train-resolution", "32x32",
                         "--batch-size", "2", "--lr", "1e-2", "--val-fraction", "0.34", "--gain-pairs", "2",
                         out=tmp_path / "d")
    assert code == 0, err
    head = load_head(head_path(tmp_path / "d"))
    h = json.loads((tiny_qwenimage21_dir / "transformer" / "config.json").read_text())["context_in_dim"]
    assert head.meta.family == "qwen-image-2.1" and head.meta.hidden_size == h == 48
    assert head.meta.target == "denoise" and float(head.proj.weight.detach().abs().sum()) > 0
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert len(metrics["history"]["train_loss"]) == 2 and all(v > 0 for v in metrics["history"]["train_loss"])
    assert metrics["held_out_gain"] is not None and metrics["held_out_gain"]["photos"] == 2
    # a 32x32 training photo is 2x2 latent tokens at 1/16: the cached latents have the 2.1 VAE's channels
    from safetensors.torch import load_file

    cache = next((tmp_path / "d" / "cache").glob("latents-*.safetensors"))
    lat = next(iter(load_file(cache).values()))
    assert tuple(lat.shape) == (8, 2, 2)

    # eval --denoise-gain: the 2.1 head on the 2.1 model is measured; on the 1.x model it is refused naming both
    head_file = head_path(tmp_path / "d")
    others = ",".join(str(d) for d in make_dataset(identities=2, views=2, size=(40, 36), first_seed=300))

    def evaluate(model, out):
        code = main(["eval", "--head", str(head_file), "--seed-dirs", others, "--denoise-gain-only",
                     "--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model", str(model),
                     "--device", "cpu", "--gain-pairs", "2", "--out-dir", str(out)])
        return code, capsys.readouterr()

    code, captured = evaluate(tiny_qwenimage21_dir, tmp_path / "ev")
    assert code == 0, captured.err
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["denoise_gain"]["overall"]["photos"] == 4
    code, captured = evaluate(tiny_models.qwen_image, tmp_path / "ev1")
    assert code == 2
    assert "family 'qwen-image-2.1'" in captured.err and "family 'qwen-image')" in captured.err


def test_caption_objective_on_21(train, make_dataset, tmp_path):
    from qwen_identity.core.residual.head import load_head

    dirs = make_dataset(identities=3, views=2, size=(64, 64), captions={i: "a man with a hat" for i in range(3)})
    code, _, err = train("--seed-dirs", ",".join(map(str, dirs)), "--target", "caption", "--tokens", "2",
                         out=tmp_path / "c")
    assert code == 0, err
    head = load_head(head_path(tmp_path / "c"))
    assert head.meta.family == "qwen-image-2.1" and head.meta.hidden_size == 48 and head.meta.tokens == 2
    assert head.meta.text_encoder_model.endswith("/text_encoder")


def test_sweep_compares_references_head_and_both(tiny_models, tiny_qwenimage21_dir, make_dataset, tmp_path, capsys):
    """sweep --references compare on 2.1: one grid per identity with a references-only row, a head row per α
    and a both row per α, for the same seeds; on 1.x the option is refused naming the family."""
    from PIL import Image

    dirs = make_dataset(identities=1, views=2, size=(64, 64), captions={0: "a man with a hat"})
    base = ["sweep", "--seed-dirs", str(dirs[0]), "--train", "--epochs", "1", "--alphas", "0.5,1.5",
            "--gen-seeds", "1,2", "--steps", "2", "--width", "32", "--height", "32", "--device", "cpu",
            "--qwen3-vl-model", str(tiny_models.qwen3vl), "--references", "compare", "--crop", "center"]
    code = main([*base, "--qwen-image-model", str(tiny_qwenimage21_dir), "--out-dir", str(tmp_path / "s")])
    assert code == 0, capsys.readouterr().err[-2000:]
    meta = json.loads(next((tmp_path / "s" / "generations").glob("*_meta.json")).read_text())
    assert meta["references"] == "compare"
    labels = sorted({c["label"].split(",")[0] for c in meta["grid"]["cells"]})
    assert labels == ["both α=0.5", "both α=1.5", "head α=0.5", "head α=1.5", "references only"]
    grid = Image.open(next((tmp_path / "s" / "generations").glob("*_alpha_grid.png")))
    assert grid.size == tuple(meta["grid"]["grid_size"])
    code = main([*base, "--qwen-image-model", str(tiny_models.qwen_image), "--out-dir", str(tmp_path / "s1")])
    assert code == 2 and "takes no reference images" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_train_the_one_process_head_on_21(train, make_dataset, tmp_path, tiny_models, tiny_qwenimage21_dir,
                                                         cli_env):
    """`qwen-identity train --objective denoise` with the 2.1 model in two CPU processes started as torchrun /
    `accelerate launch` start them (RANK, WORLD_SIZE, MASTER_* in the environment; Accelerate joins a gloo group):
    latents, prompts and features sharded, each step's photos shared out, the head's gradients summed. The head
    equals the one-process run's up to float summation order (tests/test_denoise_identity.py's `same_head`)."""
    import socket
    import subprocess
    import sys

    import torch

    from qwen_identity.core.residual.head import load_head

    people = ",".join(str(d) for d in make_dataset(identities=3, views=2, size=(40, 36)))
    args = ["--seed-dirs", people, "--objective", "denoise", "--train-resolution", "32x32", "--batch-size", "2",
            "--lr", "1e-2", "--val-fraction", "0.34", "--gain-pairs", "2"]
    code, _, err = train(*args, out=tmp_path / "one")
    assert code == 0, err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    argv = [sys.executable, "-m", "qwen_identity.cli", "train", "--qwen3-vl-model", str(tiny_models.qwen3vl),
            "--qwen-image-model", str(tiny_qwenimage21_dir), "--epochs", "2", "--device", "cpu", "--crop", "center",
            "--out-dir", str(tmp_path / "two"), *args]
    procs = [subprocess.Popen(argv, env={**cli_env, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                         "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": port, "TORCHELASTIC_RUN_ID": "p21"},
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for rank in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for _, e, rc in results:
        assert rc == 0, e[-4000:]
    assert "head:" in results[0][0] and results[1][0] == ""   # one voice: rank 1 only computes (a group of two)
    one, two = load_head(head_path(tmp_path / "one")), load_head(head_path(tmp_path / "two"))
    assert two.meta.family == "qwen-image-2.1" and two.meta.hidden_size == 48
    a, b = one.proj.weight.detach(), two.proj.weight.detach()
    assert float(a.abs().sum()) > 0
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max()), float((a - b).abs().max() / a.abs().max())
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["held_out_gain"]["photos"] == m1["held_out_gain"]["photos"] == 2
    assert torch.allclose(torch.tensor(m1["history"]["train_loss"]), torch.tensor(m2["history"]["train_loss"]),
                          rtol=1e-4)


def test_prepare_then_train_on_21(train, tmp_path):
    """`qwen-identity prepare` takes no model: the seed folders it writes (photos of other aspects, scaled by
    --max-side) train a 2.1 head through --seed-dirs-file, each aspect in a bucket whose sides are multiples of
    2.1's 32 pixels."""
    from qwen_identity.core.residual.head import load_head
    from qwen_identity.tiny_models.dataset import identity_photo

    people = tmp_path / "people"
    for person in range(3):
        (people / f"p{person}").mkdir(parents=True)
        for view, size in enumerate([(160, 128), (128, 192)]):
            identity_photo(person, view, size).save(people / f"p{person}" / f"img_{view}.png")
    assert main(["prepare", "--photos", str(people), "--out-dir", str(tmp_path / "data"), "--face-detector", "none",
                 "--max-side", "160", "--caption", "a photo of a person"]) == 0
    listing = tmp_path / "data" / "prepared_seed_dirs.txt"
    assert len(listing.read_text().split()) == 3
    code, _, err = train("--seed-dirs-file", str(listing), "--objective", "denoise", "--train-resolution", "96x96",
                         "--batch-size", "2", "--lr", "1e-2", "--val-fraction", "0.34", "--gain-pairs", "2",
                         out=tmp_path / "d", epochs=1)
    assert code == 0, err
    head = load_head(head_path(tmp_path / "d"))
    assert head.meta.family == "qwen-image-2.1" and float(head.proj.weight.detach().abs().sum()) > 0
    per_bucket = head.meta.training_args["photos_per_bucket"]
    assert per_bucket == {"96x96": 3, "64x128": 3}, per_bucket   # 160x128 and 107x160 (--max-side 160)
