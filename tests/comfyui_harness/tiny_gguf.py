"""GGUF test fixtures: city96's ComfyUI-GGUF node pack (vendored beside the checkout, never in the repository)
and a GGUF file of the tiny full-width Qwen-Image transformer (written at test time).

ComfyUI-GGUF is on no package registry this project reaches (its PyPI name `comfyui-gguf` does not exist;
`gguf-node`/`gguf-comfy` there are other projects), so, like ComfyUI itself, it comes as a tarball of the
public repository in the project's shared/ folder:

    ../shared/vendor/comfyui-gguf/ComfyUI-GGUF-<commit>.tar.xz     one folder ComfyUI-GGUF/ inside
    (or $QWEN_IDENTITY_COMFYUI_GGUF: such a tarball, or an unpacked ComfyUI-GGUF folder)

Without it the GGUF tests skip and say exactly this. Its Python dependency, the `gguf` package (PyPI), is
installed into the ComfyUI test venv by scripts/setup_comfyui.sh.

`write_gguf(src, dst, qtype)` converts a Qwen-Image transformer .safetensors the way ComfyUI-GGUF's own
tools/convert.py does (general.architecture "qwen_image", 1-D and tiny tensors in F32), except that it
quantizes every 2-D weight to `qtype` directly with the gguf package's reference quantizer (the repository's
tools quantize with a patched llama.cpp, which is not available here). Q8_0/Q4_0/Q5_0 are the block
formats the gguf package can write; the K-quants users also download (Q4_K_M ...) it can only read.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path
from typing import Optional

ENV = "QWEN_IDENTITY_COMFYUI_GGUF"
ROOT = Path(__file__).resolve().parents[2]
TARBALL_GLOBS = ("comfyui-gguf/ComfyUI-GGUF-*.tar.xz", "ComfyUI-GGUF-*.tar.xz")
QUANTIZATION_THRESHOLD = 1024       # as tools/convert.py: tensors this small stay F32
HOW_TO_GET = ("city96's ComfyUI-GGUF is a test fixture kept beside the checkout, like ComfyUI: put "
              "`git archive --prefix=ComfyUI-GGUF/ HEAD | xz > ComfyUI-GGUF-<commit>.tar.xz` of "
              "https://github.com/city96/ComfyUI-GGUF at ../shared/vendor/comfyui-gguf/, or point "
              f"{ENV} at such a tarball or an unpacked ComfyUI-GGUF folder")


def find_comfyui_gguf() -> Optional[Path]:
    """The vendored ComfyUI-GGUF (a tarball or a folder), or None when it is not there."""
    value = os.environ.get(ENV)
    if value:
        p = Path(value)
        return p if p.exists() else None
    vendor = ROOT.parent / "shared" / "vendor"
    for pattern in TARBALL_GLOBS:
        found = sorted(vendor.glob(pattern))
        if found:
            return found[-1]
    return None


def unpack_comfyui_gguf(source: Path, dest: Path) -> Path:
    """The ComfyUI-GGUF folder: `source` itself when it is one, else the tarball unpacked under `dest`."""
    source = Path(source)
    if source.is_dir():
        if not (source / "nodes.py").is_file():
            raise RuntimeError(f"{source} is not a ComfyUI-GGUF folder (no nodes.py)")
        return source
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source) as tar:
        tar.extractall(dest, filter="data")
    folder = dest / "ComfyUI-GGUF"
    if not (folder / "nodes.py").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        raise RuntimeError(f"{source} holds no ComfyUI-GGUF/nodes.py")
    return folder


def write_gguf(src: Path, dst: Path, qtype: str = "Q8_0") -> dict:
    """Write `src` (a Qwen-Image transformer state dict, .safetensors) as a GGUF file ComfyUI-GGUF's
    UnetLoaderGGUF reads; returns {GGML type name: tensor count}."""
    import gguf
    import torch
    from safetensors.torch import load_file

    quant = getattr(gguf.GGMLQuantizationType, qtype)
    block = gguf.GGML_QUANT_SIZES[quant][0]
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(path=None, arch="qwen_image")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    counts: dict = {}
    for key, tensor in load_file(str(src)).items():
        data = tensor.to(torch.float32).numpy()
        if data.ndim >= 2 and data.size > QUANTIZATION_THRESHOLD and data.shape[-1] % block == 0:
            t = quant
        else:
            t = gguf.GGMLQuantizationType.F32
        writer.add_tensor(key, gguf.quants.quantize(data, t), raw_dtype=t)
        counts[t.name] = counts.get(t.name, 0) + 1
    writer.write_header_to_file(path=str(tmp))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return counts
