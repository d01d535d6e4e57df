"""Fan-out (core/fanout.py, cli/fanout.py): chunks of identities in separate processes merge into the
output a one-process run writes: the same grids byte for byte, the same meta and eval.json (timings aside)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_identity.cli import main
from qwen_identity.core import fanout
from qwen_identity.core.errors import UserInputError

SMALL = ["--device", "cpu", "--dtype", "fp32", "--steps", "2", "--width", "32", "--height", "32"]


def tree(root: Path, skip_timings: bool = True) -> dict[str, object]:
    """Every output file: bytes digest, or for JSON the parsed content without the wall-clock timings."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith(".qwen-identity.lock"):
            continue
        rel = p.relative_to(root).as_posix()
        if p.suffix == ".json" and skip_timings:
            data = json.loads(p.read_text())
            data.pop("timings", None)
            if isinstance(data.get("identities"), list):   # the sweep's run index: per-identity seconds
                data["identities"] = [{k: v for k, v in r.items() if k != "seconds"} for r in data["identities"]]
            out[rel] = data
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------ the generic part
@pytest.mark.parametrize("n, k", [(0, 1), (1, 3), (5, 2), (7, 3), (9, 9), (10, 4)])
def test_split_is_contiguous_balanced_and_complete(n, k):
    items = [f"seed_{i}" for i in range(n)]
    chunks = fanout.split(items, k)
    assert len(chunks) == k and sum(chunks, []) == items
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert fanout.split(items, k) == chunks   # deterministic


def test_parse_chunk_and_plans_from_flags_and_environment():
    assert fanout.parse_chunk("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(UserInputError, match="--chunk"):
            fanout.parse_chunk(bad)
    assert fanout.plan_from(None, None, {}) is None
    assert fanout.plan_from(None, None, {"WORLD_SIZE": "1", "RANK": "0"}) is None
    p = fanout.plan_from(None, None, {"WORLD_SIZE": "4", "RANK": "2", "MASTER_PORT": "29500"})
    assert (p.rank, p.world, p.merge, p.wait_for_others) == (2, 4, False, True)
    p0 = fanout.plan_from(None, None, {"WORLD_SIZE": "4", "RANK": "0", "MASTER_PORT": "29500"})
    assert p0.merge and p0.launch_id == p.launch_id
    assert fanout.plan_from("1/2", None, {"WORLD_SIZE": "4", "RANK": "3"}).rank == 1   # explicit wins
    m = fanout.plan_from(None, 3, {})
    assert (m.rank, m.world, m.merge, m.wait_for_others) == (-1, 3, True, False)
    with pytest.raises(UserInputError, match="two steps"):
        fanout.plan_from("0/2", 2, {})
    with pytest.raises(UserInputError, match="outside WORLD_SIZE"):
        fanout.plan_from(None, None, {"WORLD_SIZE": "2", "RANK": "5"})


def test_merge_copies_single_files_and_combines_shared_ones(tmp_path):
    stages = fanout.stage_dirs(tmp_path / "out", "x", 2)
    for i, s in enumerate(stages):
        (s / "generations").mkdir(parents=True)
        (s / "generations" / f"seed_{i}.png").write_bytes(b"img%d" % i)
        (s / "same.txt").write_text("identical")
        (s / "agg.json").write_text(json.dumps([i]))
    combined = lambda copies, tmp: tmp.write_text(json.dumps(sum((json.loads(c.read_text()) for c in copies), [])))
    written = fanout.merge_stages(stages, tmp_path / "out", {"agg.json": combined})
    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in written) == [
        "agg.json", "generations/seed_0.png", "generations/seed_1.png", "same.txt"]
    assert json.loads((out / "agg.json").read_text()) == [0, 1]
    # two different files under one name, with no combiner: refused, naming the file
    (stages[1] / "same.txt").write_text("different")
    (out / "same.txt").unlink()
    with pytest.raises(UserInputError, match="same.txt"):
        fanout.merge_stages(stages, out, {"agg.json": combined})
    assert not (out / "same.txt").exists()   # nothing written when a conflict is found
    fanout.remove_stages(stages)
    assert not (out / fanout.STAGE_ROOT).exists()


def test_chunk_markers_failures_and_stale_runs(tmp_path):
    stages = fanout.stage_dirs(tmp_path, "sweep", 2)
    fanout.run_chunk(stages[0], "k1", ["a"], lambda s: (s / "f").write_text("x"))
    assert fanout.read_marker(stages[0]) == {"key": "k1", "ok": True, "error": None, "identities": ["a"]}
    with pytest.raises(UserInputError, match="not finished.*chunk-1-of-2"):
        fanout.wait_for_chunks(stages, "k1", timeout_s=0)
    # a stage left by another run (other key) is not this run's: still missing
    fanout.run_chunk(stages[1], "old", ["b"], lambda s: None)
    with pytest.raises(UserInputError, match="not finished"):
        fanout.wait_for_chunks(stages, "k1", timeout_s=0)

    def boom(stage):
        raise UserInputError("no head at /x")

    with pytest.raises(UserInputError):
        fanout.run_chunk(stages[1], "k1", ["b"], boom)
    with pytest.raises(UserInputError, match="chunk chunk-1-of-2 failed: no head at /x"):
        fanout.wait_for_chunks(stages, "k1", timeout_s=0)
    # a rerun of the chunk starts from an empty stage
    fanout.run_chunk(stages[0], "k2", ["a"], lambda s: None)
    assert not (stages[0] / "f").exists()


def test_waiting_polls_until_the_last_chunk_is_done(tmp_path):
    stages = fanout.stage_dirs(tmp_path, "eval", 2)
    fanout.run_chunk(stages[0], "k", ["a"], lambda s: None)
    naps = []

    def sleep(s):   # the other process finishes while rank 0 waits
        naps.append(s)
        if len(naps) == 3:
            fanout.run_chunk(stages[1], "k", ["b"], lambda st: None)

    markers = fanout.wait_for_chunks(stages, "k", sleep=sleep)
    assert len(naps) == 3 and [m["identities"] for m in markers] == [["a"], ["b"]]


# ------------------------------------------------------------------------------ sweep and eval, tiny models
@pytest.fixture(scope="module")
def data(tiny_models, tmp_path_factory):
    from qwen_identity.core.residual.head import HeadMeta, ResidualHead, save_head
    from qwen_identity.tiny_models.dataset import make_seed_dirs
    import torch

    root = tmp_path_factory.mktemp("fanout")
    dirs = make_seed_dirs(root / "data", identities=3, views=1)
    torch.manual_seed(0)
    meta = HeadMeta(feature_dim=64, tokens=2, hidden_size=32, qwen3_vl_model="tiny",
                    feature_settings={"source": "merger_pooled", "resolution": "pixel_budget", "max_pixels": 64 * 64})
    head = ResidualHead(64, 2, 32, meta=meta)
    with torch.no_grad():
        head.proj.weight.normal_(0, 2.0)
    save_head(head, root / "head.safetensors")
    models = ["--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model", str(tiny_models.qwen_image)]
    return {"root": root, "seed_dirs": ",".join(map(str, dirs)), "head": str(root / "head.safetensors"),
            "models": models}


def sweep_argv(data, out):
    return ["sweep", "--seed-dirs", data["seed_dirs"], "--head", data["head"], "--out-dir", str(out),
            "--alphas", "0,1.5", "--gen-seeds", "3,4", *data["models"], *SMALL]


def eval_argv(data, out):
    return ["eval", "--seed-dirs", data["seed_dirs"], "--head", data["head"], "--out-dir", str(out),
            "--alphas", "1.5", "--gen-seeds", "3,4", "--no-prompt-proxy", "--plot-backend", "pil",
            *data["models"], *SMALL]


@pytest.fixture(scope="module")
def one_process_sweep(data):
    out = data["root"] / "sweep_one"
    assert main(sweep_argv(data, out)) == 0
    return out


def test_eval_chunks_then_merge_equal_one_process(data, capsys):
    """eval in two chunks (--chunk 0/2, --chunk 1/2) then --merge-chunks 2 == one eval: the same grids and
    plot byte for byte, the same eval.json (the sweep's explicit chunks run in tests/test_modal_runner.py,
    its launcher mode below)."""
    one = data["root"] / "eval_one"
    assert main(eval_argv(data, one)) == 0
    fanned = data["root"] / "eval_fanned"
    for i in range(2):   # 3 identities in 2 chunks: 2 + 1
        assert main(eval_argv(data, fanned) + ["--chunk", f"{i}/2"]) == 0
    staged = fanout.stage_dirs(fanned, "eval", 2)
    assert [fanout.read_marker(s)["identities"] for s in staged] == [["seed_100", "seed_101"], ["seed_102"]]
    assert main(eval_argv(data, fanned) + ["--merge-chunks", "2"]) == 0
    assert not (fanned / fanout.STAGE_ROOT).exists()
    expected = tree(one)
    assert len(expected) == 5   # eval.json, the plot, 3 grids
    # the report names its output folder; everything else is equal
    assert json.loads(json.dumps(tree(fanned)).replace(str(fanned), str(one))) == expected


def test_merge_refuses_missing_or_foreign_chunks(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(sweep_argv(data, out) + ["--merge-chunks", "2"]) == 2
    assert "not finished" in capsys.readouterr().err
    # a stage made by a run with other arguments (its marker's key differs) is not merged into this run
    fanout.run_chunk(fanout.stage_dir(out, "sweep", 0, 1), "another-run", ["seed_100"],
                     lambda s: (s / "generations").mkdir())
    assert main(sweep_argv(data, out) + ["--merge-chunks", "1"]) == 2
    assert "not finished" in capsys.readouterr().err
    assert not (out / "generations").exists()


def test_sweep_train_is_refused_in_a_chunk(data, tmp_path, capsys):
    argv = sweep_argv(data, tmp_path / "o")
    argv.remove("--head"), argv.remove(data["head"])
    assert main(argv + ["--train", "--chunk", "1/2"]) == 2
    assert "--train runs once, with --chunk 0/N" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_with_torchrun_environment_equal_one_process(data, one_process_sweep, cli_env):
    """Two CPU processes launched as torchrun/accelerate launch does (RANK, WORLD_SIZE, MASTER_*)."""
    out = data["root"] / "sweep_two_procs"
    procs = []
    for rank in range(2):
        env = dict(cli_env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", TORCHELASTIC_RUN_ID="test-run")
        procs.append(subprocess.Popen([sys.executable, "-m", "qwen_identity.cli", *sweep_argv(data, out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for o, e, rc in results:
        assert rc == 0, e
    assert "merged 2 chunk(s)" in results[0][0] and "chunk 2 of 2" in results[1][0]
    expected = tree(one_process_sweep)
    assert len(expected) == 7   # 3 grids, 3 metas, the run index generations/meta.json
    # the run index names its output folder; every grid is byte-identical, every meta equal
    assert json.loads(json.dumps(tree(out)).replace(str(out), str(one_process_sweep))) == expected
