"""The Modal runner, offline: the App and its functions are declared with the image, GPU, volumes and
secret; the plan fans sweep/eval out and merges; the container body runs the local CLI in-process on the
tiny models and gives the one-process output. Nothing here contacts Modal (the network tripwire is on:
the App is never run or deployed)."""

from __future__ import annotations

import sys

import pytest

from qwen_identity.cli import main as cli_main
from qwen_identity.cli import modal_runner as mr
from qwen_identity.core.errors import UserInputError

modal = pytest.importorskip("modal")
SMALL = ["--device", "cpu", "--dtype", "fp32", "--steps", "2", "--width", "32", "--height", "32"]


def dockerfile_commands(image) -> list[str]:
    """The Dockerfile lines of a (not yet built) Modal image, from its layers' local build functions."""
    out = []
    for dep in image._deps():
        out += dockerfile_commands(dep)
    for cell in image._load.__closure__ or ():
        f = cell.cell_contents
        if callable(f) and getattr(f, "__name__", "") == "build_dockerfile":
            out += f("2025.06").commands
    return out


def test_app_declares_gpu_volumes_secret_and_image():
    app, objs = mr.build_app(gpu="A100-80GB", gpus=2)
    assert app.name == mr.APP_NAME
    run_spec, merge_spec = objs["run"]._spec_, objs["merge"]._spec_
    assert run_spec.gpus == "A100-80GB:2" and merge_spec.gpus is None   # merging needs no GPU
    assert {k: v.name for k, v in run_spec.volumes.items()} == {"/cache": mr.HF_CACHE_VOLUME,
                                                                "/outputs": mr.OUTPUTS_VOLUME}
    assert {k: v.name for k, v in merge_spec.volumes.items()} == {"/outputs": mr.OUTPUTS_VOLUME}
    assert [s.name for s in run_spec.secrets] == [mr.HF_SECRET]
    assert "qwen_identity" in repr(run_spec.mounts)   # the package's source goes with the function
    docker = dockerfile_commands(run_spec.image)   # the image as Modal would build it (computed locally)
    pip = next(c for c in docker if "pip install" in c and "torch" in c)
    for name in ("torch", "transformers", "diffusers", "accelerate", "dlib-bin", "face_recognition_models"):
        assert name in pip and name in " ".join(mr.image_packages())
    assert docker[0].startswith(f"FROM python:{mr.PYTHON_VERSION}")
    assert "ENV HF_HOME=/cache/huggingface" in docker   # the hub cache lives on its volume
    _, one = mr.build_app(gpu="H100", gpus=1)
    assert one["run"]._spec_.gpus == "H100"


def test_module_level_app_for_modal_run():
    assert mr.app is not None and mr.app.name == mr.APP_NAME
    assert mr._DECLARED["run"]._spec_.gpus == "H100" and mr._DECLARED["merge"] is not None


@pytest.mark.parametrize("gpu, n, want", [("H100", 1, "H100"), ("L40S", 4, "L40S:4"), ("none", 1, None)])
def test_gpu_spec(gpu, n, want):
    assert mr.gpu_spec(gpu, n) == want


def test_gpu_spec_bad():
    with pytest.raises(UserInputError, match="--gpus"):
        mr.gpu_spec("H100", 0)
    with pytest.raises(UserInputError, match="type only"):
        mr.gpu_spec("H100:2", 1)


# ------------------------------------------------------------------------------ the plan
def recorder():
    calls = []
    return calls, dict(call=lambda a, p: calls.append(("call", a, p)) or 0,
                       map_calls=lambda many: [calls.append(("map", a)) or 0 for a in many],
                       merge_call=lambda a: calls.append(("merge", a)) or 0)


def test_plan_one_call_passes_processes_and_defaults_out_dir():
    calls, fns = recorder()
    assert mr.orchestrate("train", ["--seed-dirs", "/outputs/d/seed_*", "--objective", "denoise"], 1, 4, **fns) == 0
    assert calls == [("call", ["train", "--seed-dirs", "/outputs/d/seed_*", "--objective", "denoise",
                               "--out-dir", "/outputs"], 4)]


def test_plan_fans_out_and_trains_once_first():
    calls, fns = recorder()
    assert mr.orchestrate("sweep", ["--train", "--epochs", "5", "--out-dir", "/outputs/r"], 3, 1, **fns) == 0
    base = ["sweep", "--epochs", "5", "--out-dir", "/outputs/r"]
    assert calls == [("call", ["sweep", "--train", "--epochs", "5", "--out-dir", "/outputs/r", "--chunk", "0/3"], 1),
                     ("map", base + ["--chunk", "1/3"]), ("map", base + ["--chunk", "2/3"]),
                     ("merge", base + ["--merge-chunks", "3"])]
    calls.clear()
    mr.orchestrate("eval", ["--head", "/outputs/h.safetensors"], 2, 1, **fns)
    assert [c[0] for c in calls] == ["map", "map", "merge"]


def test_plan_stops_at_a_failed_chunk_and_refuses_bad_options():
    codes = iter([0, 2])
    merged = []
    code = mr.orchestrate("sweep", [], 2, 1, call=None, map_calls=lambda many: [next(codes) for _ in many],
                          merge_call=lambda a: merged.append(a) or 0)
    assert code == 2 and merged == []
    with pytest.raises(UserInputError, match="sweep and eval only"):
        mr.orchestrate("train", [], 2, 1, call=None, map_calls=None, merge_call=None)
    with pytest.raises(UserInputError, match="use one of"):
        mr.orchestrate("demo", [], 1, 1, call=None, map_calls=None, merge_call=None)


# ------------------------------------------------------------------------------ bad input
def test_modal_not_installed_names_pip_and_token(monkeypatch):
    monkeypatch.setitem(sys.modules, "modal", None)   # import modal -> ImportError
    with pytest.raises(UserInputError) as e:
        mr.build_app()
    assert "pip install modal" in str(e.value) and "modal token new" in str(e.value)


def test_not_logged_in_names_token_new(tmp_path):
    with pytest.raises(UserInputError, match="modal token new"):
        mr.check_logged_in(environ={}, home=tmp_path)
    (tmp_path / ".modal.toml").write_text('[default]\ntoken_id = "ak-x"\ntoken_secret = "as-y"\n')
    mr.check_logged_in(environ={}, home=tmp_path)
    mr.check_logged_in(environ={"MODAL_TOKEN_ID": "a", "MODAL_TOKEN_SECRET": "b"}, home=tmp_path / "none")


def test_volume_paths_must_exist_and_outputs_stay_on_the_volume():
    with pytest.raises(UserInputError, match=r"modal volume put qwen-identity-outputs LOCAL_PATH /data/seed_1"):
        mr.check_volume_paths(["sweep", "--seed-dirs", "/outputs/data/seed_1", "--out-dir", "/outputs"])
    with pytest.raises(UserInputError, match="not on the outputs volume"):
        mr.check_volume_paths(["sweep", "--out-dir", "/tmp/run"])
    mr.check_volume_paths(["sweep", "--seed-dirs", "/outputs/data/seed_*", "--out-dir", "/outputs/run"])  # globs later


def test_function_body_runs_locally_through_modal(tmp_path):
    """`.local()` calls the declared function's body in this process, offline: the volume check answers."""
    _, objs = mr.build_app()
    with pytest.warns(UserWarning), pytest.raises(UserInputError, match="does not exist on the Modal volume"):
        objs["run"].local(["sweep", "--seed-dirs", "/outputs/no/seed_0", "--out-dir", "/outputs/x"], 1)


# ------------------------------------------------------------------------------ end to end, in-process
def test_runner_path_in_process_equals_a_local_sweep_train(tiny_models, tmp_path):
    """sweep --train through the runner's plan (train in chunk 0, map, merge) on the tiny models ==
    one local `qwen-identity sweep --train`: the same head and the same grids byte for byte."""
    from qwen_identity.tiny_models.dataset import make_seed_dirs
    from test_fanout import tree

    dirs = make_seed_dirs(tmp_path / "data", identities=3, views=2, captions={0: "a red-haired woman"})
    args = ["--seed-dirs", ",".join(map(str, dirs)), "--train", "--crop", "center", "--epochs", "1", "--alphas", "0,1.5",
            "--gen-seeds", "5", "--qwen3-vl-model", str(tiny_models.qwen3vl),
            "--qwen-image-model", str(tiny_models.qwen_image), *SMALL]
    local = tmp_path / "local"
    assert cli_main(["sweep", *args, "--out-dir", str(local)]) == 0
    remote = tmp_path / "remote"
    body = lambda a, p=1: mr.container_run(a, p, check_paths=False)
    code = mr.orchestrate("sweep", [*args, "--out-dir", str(remote)], 2, 1, call=body,
                          map_calls=lambda many: [body(a) for a in many], merge_call=body)
    assert code == 0
    want, got = tree(local), tree(remote)
    assert got["checkpoints/remote_head.safetensors"] == want["checkpoints/local_head.safetensors"]
    for rel in tuple(f"generations/{d.name}_alpha_grid.png" for d in dirs):
        assert got[rel] == want[rel], rel
    for d in dirs:
        meta = f"generations/{d.name}_meta.json"
        assert {k: v for k, v in got[meta].items() if k != "head"} == {k: v for k, v in want[meta].items() if k != "head"}
    run_named = lambda files, run: sorted(f.replace(f"checkpoints/{run}_head.", "checkpoints/RUN_head.")  # noqa: E731
                                          for f in files)   # the head and its card carry the out-dir's name
    assert run_named(want, "local") == run_named(got, "remote")   # the same files: checkpoints/, generations/, ...


def test_several_gpus_in_a_container_go_through_accelerate_launch(monkeypatch):
    """--processes P > 1 (e.g. `train --objective denoise` on 4 GPUs): the same CLI under accelerate launch."""
    import subprocess

    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    argv = ["train", "--objective", "denoise", "--out-dir", "/outputs/r"]
    assert mr.container_run(argv, processes=4, check_paths=False) == 0
    assert seen == [[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4",
                     "-m", "qwen_identity.cli", *argv]]
    ran = []
    assert mr.container_run(argv, processes=1, run_main=lambda a: ran.append(a) or 0, check_paths=False) == 0
    assert ran == [argv] and len(seen) == 1   # one process: in-process, no launcher
