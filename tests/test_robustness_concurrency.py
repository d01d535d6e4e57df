"""Concurrency: loaded models shared by prompts back to back; one writer per output folder.

- One LoadQwen3VL bundle and one LoadQwenImageDiffusers bundle serve prompt A, then B, then A again
  (as ComfyUI does with cached loader outputs): A's features and images are bit-identical both times
  and no input (CONDITIONING, IMAGE) is modified.
- Every subcommand that writes (`train`, `sweep`, `sweep --train`, `extract`, `eval`, `demo`) takes the
  out-dir lock before writing anything: with another process holding it, the run exits 2 naming that
  pid, and the folder holds nothing new.
- Two real `extract` processes racing for one output: one writes a complete file, the other is
  refused or (if it came second) rewrites the same complete file; never a mix.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qwen_identity import cli
from qwen_identity.core.errors import UserInputError
from qwen_identity.core.residual.head import HeadMeta, ResidualHead, save_head
from qwen_identity.core.files.images import load_image, pil_to_comfy
from qwen_identity.core.files.out_dir_lock import OutDirLock
from robustness_helpers import LockHolder, ReachedModels, block_model_loading


@pytest.fixture(scope="module")
def bundles(tiny_qwen3vl_dir, tiny_qwenimage_dir):
    from qwen_identity.nodes.qwen3vl_nodes import NO_FOLDER, LoadQwen3VL
    from qwen_identity.nodes.sampling_nodes import LoadQwenImageDiffusers

    (vl,) = LoadQwen3VL().load(NO_FOLDER, str(tiny_qwen3vl_dir), dtype="fp32", device="cpu")
    (pipe,) = LoadQwenImageDiffusers().load("", str(tiny_qwenimage_dir), dtype="fp32", device="cpu")
    return vl, pipe


def _photos(seed_dir):
    return pil_to_comfy([load_image(p) for p in sorted(seed_dir.glob("photo_view_*.png"))])


def test_one_loaded_bundle_serves_prompts_back_to_back(bundles, make_dataset):
    from qwen_identity.nodes.inject_nodes import InjectResidual, QwenImageTextEncodeDiffusers
    from qwen_identity.nodes.feature_cache import FEATURE_CACHE
    from qwen_identity.nodes.qwen3vl_nodes import ExtractIdentityFeatures
    from qwen_identity.nodes.sampling_nodes import QwenImageSampleFromEmbeds

    vl, pipe = bundles
    dirs = make_dataset(identities=2, views=2)
    photos_a, photos_b = _photos(dirs[0]), _photos(dirs[1])
    d = vl.feature_dim
    torch.manual_seed(0)
    head = ResidualHead(d, 1, 32, meta=HeadMeta(feature_dim=d, tokens=1, hidden_size=32))
    with torch.no_grad():
        head.proj.weight.normal_(0, 2.0)

    def prompt(photos, text, seed):
        snapshot = photos.clone()
        FEATURE_CACHE.clear()   # the model runs every time (a re-queue would reuse the features)
        feats, _ = ExtractIdentityFeatures().extract(vl, photos, crop="center")
        (pos,) = QwenImageTextEncodeDiffusers().encode(pipe, text)
        (neg,) = QwenImageTextEncodeDiffusers().encode(pipe, "blurry")
        pos_before = pos[0][0].clone()
        cond, _ = InjectResidual().inject(pos, head, feats, alphas="0,1.5")
        images, _ = QwenImageSampleFromEmbeds().sample(cond, neg, seeds=seed, steps=2, width=32, height=32,
                                                       pipeline=pipe)
        assert torch.equal(photos, snapshot) and torch.equal(pos[0][0], pos_before)   # inputs untouched
        return feats.combined.clone(), images

    fa1, ia1 = prompt(photos_a, "a portrait photo of a person", "7")
    fb, ib = prompt(photos_b, "a person on a beach, evening light", "8,9")
    fa2, ia2 = prompt(photos_a, "a portrait photo of a person", "7")
    assert torch.equal(fa1, fa2) and torch.equal(ia1, ia2)
    assert not torch.equal(fa1, fb) and ib.shape[0] == 4


# ------------------------------------------------------------------------- one writer per out-dir
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from qwen_identity.tiny_models.dataset import make_seed_dirs

    root = tmp_path_factory.mktemp("lock_inputs")
    make_seed_dirs(root / "data", identities=2, views=1)
    save_head(ResidualHead(8, 1, 16), root / "head.safetensors")
    return root


WRITERS = {
    "train": ["train", "--seed-dirs", "{data}/seed_*", "--out-dir", "{out}", "--qwen3-vl-model", "m",
              "--qwen-image-model", "m"],
    "sweep": ["sweep", "--seed-dirs", "{data}/seed_*", "--out-dir", "{out}", "--head", "{head}"],
    "sweep --train": ["sweep", "--seed-dirs", "{data}/seed_*", "--out-dir", "{out}", "--train"],
    "extract": ["extract", "--seed-dirs", "{data}/seed_*", "--qwen3-vl-model", "m", "--out", "{out}/f.safetensors"],
    "eval": ["eval", "--seed-dirs", "{data}/seed_*", "--head", "{head}", "--out-dir", "{out}"],
    "demo": ["demo", "--out-dir", "{out}"],
    "prepare": ["prepare", "--photos", "{data}", "--out-dir", "{out}"],
    # tune writes one named head (atomically, with its card, metrics and plot beside it) and holds its work folder
    "tune": ["tune", "{data}/seed_100", "--out", "{out}.head.safetensors", "--work-dir", "{out}", "--crop", "center",
             "--qwen3-vl-model", "m", "--qwen-image-model", "m"],
}


def test_every_writing_subcommand_is_listed():
    assert set(cli.SUBCOMMANDS) - {w.split()[0] for w in WRITERS} == {"similarity"}   # similarity prints only


@pytest.fixture(scope="module")
def held_out_dir(tmp_path_factory, cli_env):
    out = tmp_path_factory.mktemp("held") / "out"
    holder = LockHolder(out, cli_env)
    yield out, holder.pid
    holder.close()


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_writing_subcommands_refuse_an_out_dir_another_run_holds(name, inputs, held_out_dir, capsys, monkeypatch):
    block_model_loading(monkeypatch)   # if the lock were not taken first, the run would reach a model
    out, pid = held_out_dir
    argv = [a.format(data=inputs / "data", out=out, head=inputs / "head.safetensors") for a in WRITERS[name]]
    try:
        code = cli.main(argv)
    except ReachedModels:
        pytest.fail(f"{name} loaded a model while another run held {out}")
    err = capsys.readouterr().err
    assert code == 2 and f"another qwen-identity run (pid {pid}) is writing to {out}" in err, err
    assert os.listdir(out) == [".qwen-identity.lock"]   # nothing written


def test_nested_steps_of_one_run_share_the_lock_and_others_are_refused(tmp_path, held_out_dir):
    out = tmp_path / "out"
    with OutDirLock(out, allow_nested=True):
        with OutDirLock(out):          # a step of the same run (training inside `sweep --train`)
            pass
        with OutDirLock(out):          # the next step: the outer hold is still in place
            assert OutDirLock(out).acquire()._fd is None     # nested: no second OS lock
    with OutDirLock(out):              # released: a new run may take it
        pass
    held, pid = held_out_dir           # a folder another process holds: refused, nested or not
    with pytest.raises(UserInputError, match=str(pid)):
        OutDirLock(held, allow_nested=True).acquire()


def test_two_real_extract_runs_racing_for_one_output(tiny_qwen3vl_dir, inputs, tmp_path, cli_env):
    from qwen_identity.core.identity.features import load_feature_cache

    out = tmp_path / "race" / "features.safetensors"
    args = ["extract", "--seed-dirs", str(inputs / "data" / "seed_*"), "--qwen3-vl-model", str(tiny_qwen3vl_dir),
            "--out", str(out), "--device", "cpu", "--crop", "center"]
    procs = [subprocess.Popen([sys.executable, "-m", "qwen_identity.cli", *args], env=cli_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, err in results:
        assert "Traceback" not in err
        if code == 2:
            assert "another qwen-identity run" in err
    items = load_feature_cache(out)            # one complete, readable file
    assert len(items) == 2
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("name", ["extract", "eval", "train"])
def test_bad_input_is_refused_before_the_out_dir_is_made(name, inputs, tmp_path, capsys, monkeypatch):
    """The lock is taken after the inputs are checked: a run refused for bad input leaves no empty folder."""
    block_model_loading(monkeypatch)
    (tmp_path / "data" / "seed_nophotos").mkdir(parents=True)
    out = tmp_path / "never"
    argv = [a.format(data=tmp_path / "data", out=out, head=inputs / "head.safetensors") for a in WRITERS[name]]
    assert cli.main(argv) == 2 and "has no photo_view_*.png files" in capsys.readouterr().err
    assert not out.exists()
