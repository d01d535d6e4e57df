"""A Qwen3-VL stored as ONE safetensors file (what a 2026 ComfyUI keeps in models/text_encoders/) as a
transformers `Qwen3VLForConditionalGeneration` + `Qwen3VLProcessor`, so identity needs no second download.

What such a file holds (read from ComfyUI's own sources, never copied: `comfy/sd.py` detects a Qwen3-VL
text encoder by the key `model.visual.deepstack_merger_list.0.norm.weight` and tells 4B from 8B by the
rows of `model.visual.merger.linear_fc2.weight`, then renames `model.language_model.` -> `model.`,
`model.visual.` -> `visual.`, `lm_head.` -> `model.lm_head.` before loading its `comfy/text_encoders/
qwen3vl.py` module): the Hugging Face key layout of `Qwen3VLForConditionalGeneration` in one file, the
vision tower included (ComfyUI's Qwen3-VL encodes images too). Files saved from inside ComfyUI carry
ComfyUI's own names (`model.layers.*`, `visual.*`, `model.lm_head.*`); both layouts are read here.

No config, tokenizer or processor files come with it, so:
- the config is inferred from tensor shapes (widths, depths, head counts from the q/k norms, vocabulary,
  tied embeddings when there is no `lm_head`); what shapes cannot tell is taken from the released
  Qwen3-VL configs, as ComfyUI's qwen3vl.py does: vision heads 16, DeepStack layers [5, 11, 17] for a
  24-block vision tower (2B/4B) and [8, 16, 24] for 27 blocks (8B/32B), RoPE theta 5e6 with interleaved
  M-RoPE sections [24, 20, 20] (head_dim 128), RMS eps 1e-6; `overrides` replaces any of them;
- the processor is built from the released values (patch 16, merge 2, mean/std 0.5) and a Qwen2-BPE
  tokenizer folder (vocab.json + merges.txt + tokenizer_config.json; ComfyUI ships one as
  comfy/text_encoders/qwen25_tokenizer, with the same ids for <|image_pad|> etc.).
Weights: bf16/fp16/fp32 load as they are; plain float8 (e4m3fn/e5m2) and float8 with one per-tensor scale
(`<name>.weight_scale` / `.scale_weight`) are widened to the load dtype; other quantized layouts (int8,
nvfp4, `.comfy_quant` formats other than per-tensor float8, GGUF) are refused with the reason. That includes
the smaller Qwen-Image 2.1 text encoders Comfy-Org ships beside qwen3vl_8b_bf16.safetensors: int8_convrot
(`.comfy_quant` format int8_tensorwise with a rotation, int8 weights) and w4a8 (int8 storage); ComfyUI's
QUANT_ALGOS in comfy/quant_ops.py name those layouts, and their rotation lives in the comfy_kitchen package.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import UserInputError

DETECTION_KEYS = ("model.visual.deepstack_merger_list.0.norm.weight", "visual.deepstack_merger_list.0.norm.weight")
# What shapes cannot tell (the released Qwen3-VL configs; ComfyUI's qwen3vl.py tables say the same).
DEEPSTACK_BY_DEPTH = {24: [5, 11, 17], 27: [8, 16, 24]}
VISION_HEADS = 16
ROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                 vision_end_token_id=151653)
_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
_FLOAT8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_PLAIN = {"BF16", "F16", "F32"}
# Qwen-Image 2.1's text encoder as Comfy-Org/Qwen-Image-2.1 ships it: the bf16 file is the one read here (its
# int8_convrot and w4a8 files are ComfyUI-quantized layouts, refused with the reason).
BF16_FILE_21 = "qwen3vl_8b_bf16.safetensors"


def read_header(path: Path) -> dict:
    """The safetensors header of `path` (tensor name -> dtype/shape/offsets), or a UserInputError."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > 200_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise UserInputError(f"{path} is not a readable safetensors file ({e}); choose the Qwen3-VL "
                             ".safetensors file in models/text_encoders again.") from None
    header.pop("__metadata__", None)
    return header


def is_single_file_qwen3vl(header: dict) -> bool:
    return any(k in header for k in DETECTION_KEYS)


def transformers_key(key: str) -> Optional[str]:
    """The transformers name of a file key (HF or ComfyUI layout); None for keys that are not weights."""
    if key.startswith(("model.language_model.", "model.visual.")) or key == "lm_head.weight":
        return key
    if key.startswith("model.lm_head."):
        return key[len("model."):]
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return None


def _shapes(header: dict) -> dict[str, list[int]]:
    out = {}
    for k, v in header.items():
        t = transformers_key(k)
        if t is not None and not k.endswith(_SCALE_SUFFIXES) and not k.endswith(".comfy_quant"):
            out[t] = list(v["shape"])
    return out


def _count(shapes: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_config(header: dict, overrides: Optional[dict] = None) -> dict:
    """Qwen3VLConfig keyword arguments for the file whose header is `header` (see the module docstring)."""
    s = _shapes(header)
    t = "model.language_model."
    v = "model.visual."
    need = [t + "embed_tokens.weight", t + "layers.0.self_attn.q_proj.weight", t + "layers.0.self_attn.q_norm.weight",
            t + "layers.0.self_attn.k_proj.weight", t + "layers.0.mlp.gate_proj.weight",
            v + "patch_embed.proj.weight", v + "blocks.0.mlp.linear_fc1.weight", v + "merger.linear_fc1.weight",
            v + "merger.linear_fc2.weight", v + "pos_embed.weight"]
    missing = [k for k in need if k not in s]
    if missing:
        raise UserInputError(f"this file is not a complete Qwen3-VL (no {missing[0]}): LoadQwen3VL needs the whole "
                             "model with its vision tower, as ComfyUI's Qwen3-VL text encoder files have it.")
    vocab, hidden = s[t + "embed_tokens.weight"]
    head_dim = s[t + "layers.0.self_attn.q_norm.weight"][0]
    v_hidden, in_ch, t_patch, patch, _ = s[v + "patch_embed.proj.weight"]
    merge_dim = s[v + "merger.linear_fc1.weight"][1]
    merge = int(round((merge_dim / v_hidden) ** 0.5))
    depth = _count(s, v + "blocks.")
    n_deep = _count(s, v + "deepstack_merger_list.")
    over = dict(overrides or {})
    deepstack = over.pop("deepstack_visual_indexes", DEEPSTACK_BY_DEPTH.get(depth))
    if deepstack is None or len(deepstack) != n_deep:
        raise UserInputError(f"a Qwen3-VL vision tower of {depth} blocks with {n_deep} DeepStack mergers is not one "
                             f"of the released sizes (2B/4B: 24 blocks, 8B/32B: 27): its DeepStack layers cannot be "
                             "told from the file. Use the Hugging Face folder of that model instead.")
    rope = dict(ROPE)
    rope.update(over.pop("rope_parameters", {}))
    text = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_count(s, t + "layers."),
                intermediate_size=s[t + "layers.0.mlp.gate_proj.weight"][0], head_dim=head_dim,
                num_attention_heads=s[t + "layers.0.self_attn.q_proj.weight"][0] // head_dim,
                num_key_value_heads=s[t + "layers.0.self_attn.k_proj.weight"][0] // head_dim,
                rms_norm_eps=1e-6, attention_bias=False, hidden_act="silu", max_position_embeddings=262144,
                rope_parameters=rope, tie_word_embeddings="lm_head.weight" not in s)
    text.update(over.pop("text_config", {}))
    vision = dict(depth=depth, hidden_size=v_hidden, intermediate_size=s[v + "blocks.0.mlp.linear_fc1.weight"][0],
                  num_heads=VISION_HEADS, in_channels=in_ch, patch_size=patch, temporal_patch_size=t_patch,
                  spatial_merge_size=merge, out_hidden_size=s[v + "merger.linear_fc2.weight"][0],
                  num_position_embeddings=s[v + "pos_embed.weight"][0], deepstack_visual_indexes=list(deepstack),
                  hidden_act="gelu_pytorch_tanh")
    vision.update(over.pop("vision_config", {}))
    cfg = dict(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"], **TOKEN_IDS)
    cfg.update(over)
    return cfg


def _check_quantization(header: dict, path: Path) -> None:
    quant = [k for k in header if k.endswith(".comfy_quant")]
    odd = sorted({v["dtype"] for k, v in header.items()
                  if v["dtype"] not in _PLAIN and v["dtype"] not in _FLOAT8 and not k.endswith(".comfy_quant")})
    if quant or odd:
        what = f"tensors of type {', '.join(odd)}" if odd else f"ComfyUI quantization metadata ({quant[0]})"
        raise UserInputError(f"{path.name} is quantized for ComfyUI ({what}); LoadQwen3VL reads bf16/fp16/fp32 and "
                             "float8 files only. Use the bf16 (or fp8_e4m3fn) Qwen3-VL file (for Qwen-Image 2.1: "
                             f"{BF16_FILE_21}), or the Hugging Face folder.")


def load_state_dict(path: Path, header: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's weights under transformers' names, widened to `dtype` (float8 times its per-tensor scale)."""
    from safetensors import safe_open

    _check_quantization(header, path)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in header:
            name = transformers_key(key)
            if name is None or key.endswith(_SCALE_SUFFIXES):
                continue
            w = f.get_tensor(key)
            if header[key]["dtype"] in _FLOAT8:
                base = key[: -len(".weight")] if key.endswith(".weight") else key
                scale_key = next((base + s for s in _SCALE_SUFFIXES if base + s in header), None)
                w = w.float()
                if scale_key is not None:
                    scale = f.get_tensor(scale_key).float()
                    if scale.numel() != 1:
                        raise UserInputError(f"{path.name}: {scale_key} is not one per-tensor scale; this float8 "
                                             "layout is not supported. Use the bf16 Qwen3-VL file.")
                    w = w * scale.reshape(())
            out[name] = w.to(dtype)
    return out


def build_processor(tokenizer_dir: Path):
    """Qwen3VLProcessor from a Qwen2-BPE tokenizer folder and the released image/video processor values."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "vocab.json").is_file() and not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserInputError(f"{tokenizer_dir} holds no tokenizer (vocab.json + merges.txt or tokenizer.json); a "
                             "single-file Qwen3-VL needs one: ComfyUI's comfy/text_encoders/qwen25_tokenizer.")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    common = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                  image_std=[0.5, 0.5, 0.5])
    image = Qwen2VLImageProcessor(size={"shortest_edge": 65536, "longest_edge": 16777216}, **common)
    video = Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824}, **common)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                            chat_template=getattr(tokenizer, "chat_template", None))


def load_single_file_model(path: Path, dtype: torch.dtype, overrides: Optional[dict] = None) -> Any:
    """`Qwen3VLForConditionalGeneration` (eval, on the CPU) with the weights of the single file `path`."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    path = Path(path)
    header = read_header(path)
    if not is_single_file_qwen3vl(header):
        raise UserInputError(f"{path.name} is not a Qwen3-VL file with its vision tower (no "
                             f"{DETECTION_KEYS[0]}); choose a Qwen3-VL text encoder such as qwen3vl_8b.safetensors.")
    _check_quantization(header, path)   # before shapes are read: packed quantized weights have other shapes
    config = Qwen3VLConfig(**infer_config(header, overrides))
    state = load_state_dict(path, header, dtype)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing:
        raise UserInputError(f"{path.name}: {len(missing)} weights of a Qwen3-VL are missing (e.g. {missing[0]}): the "
                             "file is incomplete or of another model.")
    _rebuild_meta_buffers(model, path)
    return model.eval()


def _rebuild_meta_buffers(model, path: Path) -> None:
    """Non-persistent buffers (the rotary inverse frequencies) are not in any file: after building on the meta
    device, rebuild the small modules that own them from their own config, on the CPU."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if not hasattr(module, "config"):
            raise UserInputError(f"{path.name}: cannot initialise {name} (transformers changed its Qwen3-VL)")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, type(module)(module.config))


def load_single_file_bundle(path, tokenizer_dir, *, device="auto", dtype="auto", attn_implementation="sdpa",
                            overrides: Optional[dict] = None):
    """A Qwen3VLBundle (what LoadQwen3VL outputs) from the single file `path` and a tokenizer folder."""
    from ..runtime.devices import resolve_device, resolve_dtype
    from .qwen3vl import ATTENTION_CHOICES, Qwen3VLBundle

    path = Path(path)
    if tokenizer_dir is None:
        raise UserInputError(f"{path.name} has no tokenizer inside; outside ComfyUI pass the folder of a Qwen2/Qwen3 "
                             "tokenizer (vocab.json + merges.txt), or use the Hugging Face Qwen3-VL folder instead.")
    if attn_implementation not in ATTENTION_CHOICES:
        raise UserInputError(f"unknown attention implementation {attn_implementation!r}: use one of "
                             f"{', '.join(ATTENTION_CHOICES)}.")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    processor = build_processor(tokenizer_dir)
    model = load_single_file_model(path, dt, overrides)
    model.config._attn_implementation = attn_implementation
    model = model.to(dev).eval()
    model.requires_grad_(False)
    return Qwen3VLBundle(model=model, processor=processor, model_id=path.stem, device=dev, dtype=dt,
                         feature_dim=int(model.config.text_config.hidden_size), path=path)
