"""Run `qwen-identity` train / sweep / eval / extract on Modal GPUs: the seed's platform (docs/modal.md).

    modal run -m qwen_identity.cli.modal_runner --command sweep \\
        --args "--seed-dirs /outputs/data/seed_* --train --epochs 5" --gpu H100 --chunks 4

The seed's layout: a Volume for the Hugging Face cache (mounted at /cache, HF_HOME), a Volume for the
outputs (mounted at /outputs; `checkpoints/` and `generations/` land there as in a local run), the hub
token from the Modal Secret `huggingface` (HUGGINGFACE_TOKEN). GPU type and count are options.

No second implementation: every container calls `qwen_identity.cli.main(argv)` (or `accelerate launch
-m qwen_identity.cli` for several GPUs in one container, e.g. `train --objective denoise`). `sweep` and
`eval` with `--chunks N` fan out with Modal's `.map`: container i runs `--chunk i/N` (a stage under
OUT/.fanout/), then one CPU container runs `--merge-chunks N`: the output folder is the one a local run
writes (core/fanout.py). `sweep --train` trains once in chunk 0 first.

`orchestrate` (the plan and its calls) and `container_run` (a container's body) are plain functions, so
the whole path runs in-process without Modal (tests/test_modal_runner.py); `build_app` declares the Modal
objects. Importing this module without Modal installed is fine; building the app then says how to install it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from ..core.errors import UserInputError

APP_NAME = "qwen-identity"
HF_CACHE_VOLUME = "qwen-identity-hf-cache"
OUTPUTS_VOLUME = "qwen-identity-outputs"
HF_SECRET = "huggingface"            # a Modal Secret holding HUGGINGFACE_TOKEN
CACHE_MOUNT = "/cache"
OUTPUTS_MOUNT = "/outputs"
DEFAULT_GPU = "H100"
COMMANDS = ("train", "sweep", "eval", "extract")
FANOUT_COMMANDS = ("sweep", "eval")
PYTHON_VERSION = "3.11"
TIMEOUT_S = 6 * 3600
INSTALL_HINT = ("the Modal runner needs the `modal` package and a Modal account: pip install modal (or pip install "
                "'comfyui-qwen-identity[modal]'), then log in once with `modal token new`.")
REPO_ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "comfyui-qwen-identity"  # the pip name (pyproject.toml [project] name)


def require_modal():
    try:
        import modal
    except ImportError:
        raise UserInputError(INSTALL_HINT) from None
    return modal


def check_logged_in(environ=None, home: Path | None = None) -> None:
    """Refuse before any remote call when no Modal token is configured (env vars or ~/.modal.toml)."""
    env = os.environ if environ is None else environ
    if env.get("MODAL_TOKEN_ID") and env.get("MODAL_TOKEN_SECRET"):
        return
    config = Path(env.get("MODAL_CONFIG_PATH") or (home or Path.home()) / ".modal.toml")
    if config.is_file() and "token_id" in config.read_text(encoding="utf-8", errors="replace"):
        return
    raise UserInputError(f"not logged in to Modal (no MODAL_TOKEN_ID/MODAL_TOKEN_SECRET and no token in {config}): "
                         "run `modal token new` once (pip install modal first if needed).")


def gpu_spec(gpu: str, count: int) -> str | None:
    """Modal's GPU string: 'H100', 'H100:2'; None (a CPU container) for gpu 'none'."""
    if count < 1:
        raise UserInputError(f"--gpus must be at least 1, got {count}.")
    if not gpu or gpu.lower() in ("none", "cpu"):
        return None
    if ":" in gpu:
        raise UserInputError(f"--gpu {gpu!r}: give the type only (e.g. H100) and the count with --gpus.")
    return gpu if count == 1 else f"{gpu}:{count}"


def image_packages() -> list[str]:
    """The container's pip packages: the project's own dependencies and its eval extra (one list: pyproject.toml).

    From a checkout they are read from pyproject.toml; from a pip-installed package (no pyproject.toml
    beside it) from the installed package's metadata, which setuptools wrote from that same file.
    """
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        extra = data["project"]["optional-dependencies"]
        return list(data["project"]["dependencies"]) + list(extra["eval"]) + ["matplotlib>=3.7"]
    from importlib.metadata import requires

    base, eval_extra = [], []
    for req in requires(DISTRIBUTION) or []:
        spec, _, marker = (part.strip() for part in req.partition(";"))
        if not marker:
            base.append(spec)
        elif marker.replace('"', "'").replace(" ", "") == "extra=='eval'":
            eval_extra.append(spec)
    return base + eval_extra + ["matplotlib>=3.7"]


# ---------------------------------------------------------------------------- what runs in a container
def check_volume_paths(argv: Sequence[str], mount: str = OUTPUTS_MOUNT, volume: str = OUTPUTS_VOLUME) -> None:
    """Inputs under the outputs volume must exist there; the output folder must be on it (else results are lost)."""
    argv = list(argv)
    for flag in ("--seed-dirs", "--seed-dirs-file", "--head", "--features"):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            for item in argv[argv.index(flag) + 1].split(","):
                item = item.strip()
                if not item.startswith(mount) or any(ch in item for ch in "*?["):
                    continue
                if not Path(item).exists():
                    rel = PurePosixPath(item).relative_to(mount)
                    raise UserInputError(f"{flag} {item} does not exist on the Modal volume {volume!r} (mounted at "
                                         f"{mount}): upload it with `modal volume put {volume} LOCAL_PATH /{rel}`.")
    for flag in ("--out-dir", "--out"):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            value = argv[argv.index(flag) + 1]
            if not (value == mount or value.startswith(mount + "/")):
                raise UserInputError(f"{flag} {value} is not on the outputs volume: use a path under {mount} "
                                     f"(e.g. {mount}/run1), or the results vanish with the container.")


def container_run(argv: Sequence[str], processes: int = 1, run_main: Callable[[list[str]], int] | None = None,
                  check_paths: bool = True) -> int:
    """A container's body: the local CLI on `argv` (several processes: `accelerate launch -m qwen_identity.cli`)."""
    argv = [str(a) for a in argv]
    if check_paths:
        check_volume_paths(argv)
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "-m", "qwen_identity.cli", *argv]
        return subprocess.run(cmd, check=False).returncode
    if run_main is None:
        from . import main as run_main
    return int(run_main(argv))


def with_defaults(command: str, args: Sequence[str]) -> list[str]:
    """`command args`, with --out-dir on the outputs volume unless given (the seed's layout: checkpoints/, generations/)."""
    if command not in COMMANDS:
        raise UserInputError(f"--command {command!r}: use one of {', '.join(COMMANDS)}.")
    argv = [command, *args]
    if command != "extract" and "--out-dir" not in argv:
        argv += ["--out-dir", OUTPUTS_MOUNT]
    return argv


def orchestrate(command: str, args: Sequence[str], chunks: int, processes: int,
                call: Callable[[list[str], int], int], map_calls: Callable[[list[list[str]]], list[int]],
                merge_call: Callable[[list[str]], int]) -> int:
    """The runner's plan, independent of Modal: one call, or (sweep/eval, chunks > 1) train once when asked,
    `map_calls` over `--chunk i/N`, then `merge_call(--merge-chunks N)`. Returns the first non-zero exit code."""
    argv = with_defaults(command, args)
    if chunks < 1:
        raise UserInputError(f"--chunks must be at least 1, got {chunks}.")
    if chunks > 1 and command not in FANOUT_COMMANDS:
        raise UserInputError(f"--chunks fans out {' and '.join(FANOUT_COMMANDS)} only; {command} runs in one "
                             "container (use --gpus for several GPUs in it).")
    if chunks == 1:
        return call(argv, processes)
    train = "--train" in argv
    rest = [a for a in argv if a != "--train"]
    codes = []
    if train:   # chunk 0 trains the head first (into OUT/checkpoints), the others then use it
        code = call(argv + ["--chunk", f"0/{chunks}"], 1)
        if code:
            return code
        codes = map_calls([rest + ["--chunk", f"{i}/{chunks}"] for i in range(1, chunks)])
    else:
        codes = map_calls([rest + ["--chunk", f"{i}/{chunks}"] for i in range(chunks)])
    bad = next((c for c in codes if c), 0)
    if bad:
        return bad
    return merge_call(rest + ["--merge-chunks", str(chunks)])


# ---------------------------------------------------------------------------- the Modal objects
def build_image(modal):
    """Debian + the project's pip dependencies; the package's own source is added by Modal (include_source)."""
    return (modal.Image.debian_slim(python_version=PYTHON_VERSION)
            .apt_install("libgl1", "libglib2.0-0")
            .pip_install(*image_packages())
            .env({"HF_HOME": f"{CACHE_MOUNT}/huggingface", "HF_HUB_CACHE": f"{CACHE_MOUNT}/huggingface/hub",
                  "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}))


def _in_container(argv: list[str], processes: int) -> int:
    """Run the CLI in a container, seeing what earlier containers committed and committing what it wrote."""
    modal = require_modal()
    outputs = None if modal.is_local() else modal.Volume.from_name(OUTPUTS_VOLUME)
    if outputs is not None:
        outputs.reload()                 # the head chunk 0 trained, the chunks' stages
    try:
        return container_run(argv, processes)
    finally:
        if outputs is not None:
            outputs.commit()


# Global-scope bodies (Modal finds functions by name in the re-imported module); `build_app` declares them.
def run_remote(argv: list[str], processes: int = 1) -> int:
    """GPU container: `qwen-identity <argv>` (several GPUs: accelerate launch with `processes` processes)."""
    return _in_container(argv, processes)


def merge_remote(argv: list[str]) -> int:
    """CPU container: `qwen-identity <command> ... --merge-chunks N` on the outputs volume."""
    return _in_container(argv, 1)


def entrypoint(command: str = "sweep", args: str = "", chunks: int = 1, processes: int = 0) -> None:
    """modal run -m qwen_identity.cli.modal_runner --command train|sweep|eval|extract --args "<options>"
    [--chunks N] [--processes P]."""
    check_logged_in()
    code = orchestrate(command, shlex.split(args), chunks, processes or _DECLARED["gpus"],
                       call=lambda a, p: _DECLARED["run"].remote(a, p),
                       map_calls=lambda many: list(_DECLARED["run"].map(many)),
                       merge_call=lambda a: _DECLARED["merge"].remote(a))
    if code:
        raise SystemExit(code)


_DECLARED: dict = {}


def build_app(gpu: str | None = None, gpus: int | None = None):
    """(app, objects): the App with its GPU function `run_remote`, CPU function `merge_remote` and the local
    entrypoint, the image, volumes and secret.

    GPU type and count come from the arguments, else $QWEN_IDENTITY_MODAL_GPU / $QWEN_IDENTITY_MODAL_GPUS
    (read when `modal run` imports this file), else one H100.
    """
    modal = require_modal()
    gpu = gpu or os.environ.get("QWEN_IDENTITY_MODAL_GPU", DEFAULT_GPU)
    try:
        gpus = int(gpus or os.environ.get("QWEN_IDENTITY_MODAL_GPUS", "1"))
    except ValueError:
        raise UserInputError(f"QWEN_IDENTITY_MODAL_GPUS must be a whole number, got "
                             f"{os.environ.get('QWEN_IDENTITY_MODAL_GPUS')!r}.") from None
    image = build_image(modal)
    hf_cache = modal.Volume.from_name(HF_CACHE_VOLUME, create_if_missing=True)
    outputs = modal.Volume.from_name(OUTPUTS_VOLUME, create_if_missing=True)
    secret = modal.Secret.from_name(HF_SECRET)
    volumes = {CACHE_MOUNT: hf_cache, OUTPUTS_MOUNT: outputs}
    app = modal.App(APP_NAME, image=image)
    # include_source: Modal adds this function's package (qwen_identity, the repository) to the container
    run = app.function(gpu=gpu_spec(gpu, gpus), volumes=volumes, secrets=[secret], timeout=TIMEOUT_S,
                       include_source=True)(run_remote)
    merge = app.function(volumes={OUTPUTS_MOUNT: outputs}, timeout=3600, include_source=True)(merge_remote)
    main = app.local_entrypoint(name="main")(entrypoint)
    objects = {"run": run, "merge": merge, "main": main, "image": image, "volumes": volumes, "secret": secret,
               "gpu": gpu_spec(gpu, gpus), "gpus": gpus}
    return app, objects


try:   # `modal run -m qwen_identity.cli.modal_runner` needs a module-level `app`
    import modal as _modal  # noqa: F401
except ImportError:   # plain imports of the package keep working; build_app() explains what to install
    app = None
else:
    app, _DECLARED = build_app()
