"""Shared by the tests/test_robustness_*.py files: a stand-in ComfyUI runtime and a lock holder process."""

from __future__ import annotations

import subprocess
import sys

from fake_comfy import InterruptProcessingException, install_fake_comfy  # noqa: F401 (re-exported)


class _FakeComfyLog:
    """The stand-in's call log, counted the way the robustness tests read it."""

    def __init__(self, calls: list[tuple]):
        self.calls = calls

    def __getitem__(self, key: str):
        if key == "checks":
            return self.calls.count(("interrupt_check",))
        if key == "soft_empty_cache":
            return self.calls.count(("soft_empty_cache",))
        if key == "free_memory":
            return [c[1] for c in self.calls if c[0] == "free_memory"]
        raise KeyError(key)


def fake_comfy(monkeypatch, interrupt_at: int | None = None) -> _FakeComfyLog:
    """`fake_comfy.install_fake_comfy` with counters (see there)."""
    return _FakeComfyLog(install_fake_comfy(monkeypatch, interrupt_at))


HOLD_LOCK = ("import sys\nfrom qwen_identity.core.files.out_dir_lock import OutDirLock\n"
             "OutDirLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\nsys.stdin.read()\n")


class LockHolder:
    """Another process holding the out-dir lock of `out` until `close()`."""

    def __init__(self, out, env):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"
        self.pid = self.proc.pid

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class ReachedModels(BaseException):
    """Raised instead of loading a model: every argument was accepted (not an Exception: the CLI won't catch it)."""


def block_model_loading(monkeypatch) -> None:
    """Replace every model loader (Qwen3-VL, Qwen-Image, text encoder, tiny builder, face embedder) by ReachedModels."""
    import importlib

    def reached(*a, **k):
        raise ReachedModels()

    for m in ("qwen_identity.cli.eval", "qwen_identity.cli.demo", "qwen_identity.cli.sweep", "qwen_identity.cli.extract",
              "qwen_identity.cli.train", "qwen_identity.core.identity.qwen3vl", "qwen_identity.core.generation.sampling",
              "qwen_identity.tiny_models", "qwen_identity.training.pipeline"):
        importlib.import_module(m)
    names = ("load_qwen3vl", "load_qwen_image_pipeline", "load_text_encoder", "build_tiny_models")
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("qwen_identity") and mod is not None:
            for n in names:
                if hasattr(mod, n):
                    monkeypatch.setattr(mod, n, reached)
    import qwen_identity.core.measurement.face_similarity as fs

    monkeypatch.setattr(fs, "FaceEmbedder", reached)


def check_photo_decodes_or_fails_clearly(path, data: bytes, size: tuple[int, int]) -> None:
    """Write `data` to `path`; load_image gives an 8-bit RGB image of `size` or a UserInputError naming the
    file, and the file is unchanged."""
    import hashlib

    import numpy as np

    from qwen_identity.core.errors import UserInputError
    from qwen_identity.core.files.images import load_image

    path.write_bytes(data)
    before = hashlib.sha256(data).hexdigest()
    try:
        im = load_image(path)
    except UserInputError as e:
        assert str(path) in str(e)
    else:
        assert im.mode == "RGB" and im.size == size and np.asarray(im).dtype == np.uint8
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
