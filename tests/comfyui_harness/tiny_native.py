"""Random-weight Qwen-Image files that ComfyUI's NATIVE loaders accept (written at test time, never committed).

`build_native_models(root)` writes, under `root` laid out like ComfyUI/models:
  diffusion_models/qwen_image_tiny_L1.safetensors  Qwen-Image transformer (ComfyUI's class, whose key
      names are diffusers' too) with ONE layer and every other width real (24x128 heads,
      joint_attention_dim 3584, in_channels 64):
      ComfyUI detects qwen_image from `txt_norm.weight` and reads only in_channels and the layer count
      from the weights, so narrower stand-ins do not load. ~0.7 GB bf16.
  vae/qwen_image_vae_random.safetensors  ComfyUI's Wan-2.1 VAE (dim 96, z 16; Qwen-Image's VAE).
  text_encoders/qwen_image_te_tiny.safetensors  Qwen2.5-VL-7B text tower with ONE thin layer at the
      real width (3584, full vocabulary); loaded by the test pack's TinyQwenImageCLIPLoader.
Weights are drawn from fixed seeds. The result is memoised per process (one build per test session).
Needs comfy importable (COMFYUI_DIR): the shapes come from ComfyUI's own classes (built on the meta device).

Where they live (`session_models_root`): by default in the checkout's ignored `.comfyui/native_models/<key>/`,
`<key>` a hash of the files' shapes, this module's source and torch's version: ~2 GB written once and then
reused by every ComfyUI release whose classes give the same shapes and by every later run. A folder in /tmp
per process would be written again by each session (a minute of CPU) and, when a process is killed before
its exit handlers run, left behind, 2 GB each time, until the disk is full.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TRANSFORMER = "qwen_image_tiny_L1.safetensors"
VAE = "qwen_image_vae_random.safetensors"
TEXT_ENCODER = "qwen_image_te_tiny.safetensors"
_BUILT: dict[str, "NativeModels"] = {}
_ROOT: dict[str, Path] = {}


@dataclass(frozen=True)
class NativeModels:
    root: Path                    # a ComfyUI-style models/ folder

    @property
    def transformer(self) -> Path:
        return self.root / "diffusion_models" / TRANSFORMER

    @property
    def vae(self) -> Path:
        return self.root / "vae" / VAE

    @property
    def text_encoder(self) -> Path:
        return self.root / "text_encoders" / TEXT_ENCODER


def _save(sd: dict, path: Path, dtype=torch.bfloat16) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: two test processes may write the same file at once; the last rename wins, and
    # both wrote the same bytes
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to(dtype).contiguous() for k, v in sd.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def random_weights(shapes: dict, seed: int, gains: dict | None = None) -> dict:
    """Variance-preserving random weights for a state dict's shapes (deterministic for `seed`).

    Weights ~ N(0, 1/fan_in), biases 0, norm scales 1. ComfyUI's own layers skip weight
    initialisation (their parameters start as uninitialised memory), so a module built from
    `comfy.*` classes must never be saved as is.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        shape = tuple(shape)
        if k.endswith("bias"):
            out[k] = torch.zeros(shape)
        elif len(shape) <= 1 or "norm" in k or k.endswith("gamma") or k.endswith("scale"):
            out[k] = torch.ones(shape)
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            out[k] = torch.randn(shape, generator=g) * fan_in ** -0.5 * (gains or {}).get(k, 1.0)
    return out


def _meta_shapes(build) -> dict:
    with torch.device("meta"):
        module = build()
    return {k: v.shape for k, v in module.state_dict().items()}


def _transformer_shapes() -> dict:
    import comfy.ldm.qwen_image.model
    import comfy.ops

    return _meta_shapes(lambda: comfy.ldm.qwen_image.model.QwenImageTransformer2DModel(
        num_layers=1, operations=comfy.ops.disable_weight_init))


def _vae_shapes() -> dict:
    import comfy.ldm.wan.vae

    return _meta_shapes(lambda: comfy.ldm.wan.vae.WanVAE(
        dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0))


def _text_encoder_shapes() -> dict:
    import comfy.ops
    import comfy.text_encoders.llama as llama

    from .test_pack import TINY_TE_CONFIG

    shapes = _meta_shapes(lambda: llama.Qwen25_7BVLI(TINY_TE_CONFIG, torch.float32, "meta", comfy.ops.manual_cast))
    return {k: v for k, v in shapes.items() if not k.startswith("visual.")}


def write_transformer(path: Path) -> None:
    # a small output projection keeps the random velocity (and so the decoded image) unsaturated
    _save(random_weights(_transformer_shapes(), seed=0, gains={"proj_out.weight": 0.01}), path)


def write_vae(path: Path) -> None:
    _save(random_weights(_vae_shapes(), seed=1), path)


def write_text_encoder(path: Path) -> None:
    _save(random_weights(_text_encoder_shapes(), seed=2), path)


def _content_key() -> str:
    """What the written files depend on: the three models' shapes (from this ComfyUI's classes), this
    module's source (seeds, gains, layer counts) and torch's version (its random generator)."""
    shapes = [[name, [[k, list(v)] for k, v in fn().items()]] for name, fn in   # in order: it draws the values
              (("transformer", _transformer_shapes), ("vae", _vae_shapes), ("text_encoder", _text_encoder_shapes))]
    h = hashlib.sha256(json.dumps(shapes).encode())
    h.update(Path(__file__).read_bytes())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def session_models_root() -> Path:
    """The models/ folder every test module of this process shares (see the module docstring).

    QWEN_IDENTITY_NATIVE_MODELS=DIR puts the files in DIR instead. Where the checkout's `.comfyui/` cannot
    be written, a temporary folder removed at exit.
    """
    if "root" not in _ROOT:
        keep = os.environ.get("QWEN_IDENTITY_NATIVE_MODELS")
        cache = Path(__file__).resolve().parents[2] / ".comfyui" / "native_models"
        if keep:
            _ROOT["root"] = Path(keep)
        elif _writable(cache):
            _ROOT["root"] = cache / _content_key()
        else:
            _ROOT["root"] = Path(tempfile.mkdtemp(prefix="qwen_identity_native_models_"))
            atexit.register(shutil.rmtree, _ROOT["root"], True)
    return _ROOT["root"]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


def build_native_models(root: Path | None = None, text_encoder: bool = True) -> NativeModels:
    """Write (once per process) the tiny native files under `root`; needs `comfy` importable."""
    root = Path(root) if root is not None else session_models_root()
    key = f"{root.resolve()}:{text_encoder}"
    if key not in _BUILT:
        models = NativeModels(root)
        if not models.transformer.exists():
            write_transformer(models.transformer)
        if not models.vae.exists():
            write_vae(models.vae)
        if text_encoder and not models.text_encoder.exists():
            write_text_encoder(models.text_encoder)
        _BUILT[key] = models
    return _BUILT[key]
