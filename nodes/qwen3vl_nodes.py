"""LoadQwen3VL and ExtractIdentityFeatures: thin ComfyUI adapters over core.qwen3vl / core.features.

Memory: inside ComfyUI the model is one of ComfyUI's managed models (nodes/comfy_runtime.py): loaded
into RAM, wrapped in ComfyUI's ModelPatcher, moved to the GPU by ComfyUI's `load_models_gpu` when
ExtractIdentityFeatures runs (ComfyUI first frees what that needs) and offloaded by ComfyUI like its own
models: "Unload models", the memory estimate before sampling, --lowvram/--novram.
- `keep_loaded=True`: after extraction it stays among ComfyUI's loaded models until ComfyUI needs the
  memory (no reload when the next run extracts again);
- `keep_loaded=False`: it goes back to RAM right after extraction.
The loader's output stays in RAM either way (ComfyUI caches it), so a later run never rereads the disk.
`device=auto` inside ComfyUI is where ComfyUI runs its own text encoders (`text_encoder_device()`).
Features are cached per (photos, model, settings) (nodes/feature_cache.py): a re-queue does not run
the model again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..core.errors import UserInputError
from ..core.files.safe_paths import expand_user
from ..core.runtime.devices import DEVICE_CHOICES, DTYPE_CHOICES, resolve_device, resolve_dtype
from ..core.runtime.model_sources import resolve_model_dir
from ..core.identity.features import (DEFAULT_MAX_PIXELS, DEFAULT_RESOLUTION, DEFAULT_SOURCE, FEATURE_SOURCES, RESOLUTIONS,
                             FeatureSettings, extract_features, prepare_photos)
from ..core.identity.face_crop import (CROP_FALLBACKS, CROP_HELP, CROPS, DEFAULT_CROP, DEFAULT_CROP_FALLBACK,
                                       FALLBACK_HELP)
from ..core.files.images import comfy_to_pil, pil_to_comfy
from ..core.identity.qwen3vl import Qwen3VLBundle, attention_choices, load_qwen3vl
from .comfy_runtime import (comfy_devices, comfy_progress, ensure_on_device, hand_to_comfyui, make_room,
                           model_management, release, weights_bytes)
from .feature_cache import FEATURE_CACHE
from ..core.runtime.model_folders import NO_FOLDER, chosen_model_source, list_model_folders, model_dirs

CATEGORY = "Qwen Identity"


def comfyui_manages_models() -> bool:
    """True inside a real ComfyUI (its ModelPatcher is importable): the model is handed to its memory manager."""
    if model_management() is None:
        return False
    try:
        import comfy.model_patcher  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


class LoadQwen3VL:
    DESCRIPTION = ("Loads a Qwen3-VL checkpoint (2B/4B/8B Instruct or Thinking, or a fine-tune) with transformers, "
                   "for ExtractIdentityFeatures. Put hub folders in ComfyUI/models/qwen3_vl/ (or LLM/).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("QWEN3VL",)
    RETURN_NAMES = ("qwen3vl",)
    OUTPUT_TOOLTIPS = ("The loaded Qwen3-VL model and processor.",)

    @classmethod
    def INPUT_TYPES(cls):
        folders = list_model_folders("qwen3_vl") or [NO_FOLDER]
        return {
            "required": {
                "model": (folders, {"tooltip": "A Qwen3-VL folder in ComfyUI/models/qwen3_vl/ (or models/LLM/). "
                                               "Ignored when model_path is filled in."}),
                "model_path": ("STRING", {"default": "", "tooltip": "Optional: an absolute folder path or a hub id "
                                          "such as Qwen/Qwen3-VL-2B-Instruct (downloaded into models/qwen3_vl/ "
                                          "when online), or the path of a single-file Qwen3-VL .safetensors such "
                                          "as ComfyUI's models/text_encoders/qwen3vl_8b.safetensors (vision tower "
                                          "included; no second download). Wins over the dropdown when not empty. "
                                          "Refused when the server's owner set the security level to strong."}),
                "dtype": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": "Weights precision. auto = bf16 on "
                                                "GPUs that support it, fp16 on other GPUs, fp32 on CPU."}),
                "device": (list(DEVICE_CHOICES), {"default": "auto", "tooltip": "Where extraction runs. auto = "
                                                  "where ComfyUI runs its own text encoders (the GPU; the CPU "
                                                  "when ComfyUI was started with --lowvram, --novram or --cpu)."}),
                "attention": (attention_choices(), {"default": "sdpa", "tooltip": "Attention implementation: sdpa "
                              "(default, PyTorch's fused attention), eager, or flash_attention_2 when flash-attn "
                              "is installed."}),
                "keep_loaded": ("BOOLEAN", {"default": True, "tooltip": "On: after extracting, the model stays "
                                "on the GPU among ComfyUI's loaded models until ComfyUI needs the memory (for "
                                "example to sample) or you press Unload models. Off: it goes back to RAM right "
                                "after extracting, so Qwen-Image gets the VRAM at once. Either way the model is "
                                "loaded and offloaded by ComfyUI like its own models."}),
            },
            "optional": {
                "hf_token": ("STRING", {"default": "", "tooltip": "Hugging Face token for gated/private hub ids "
                                        "(else HUGGINGFACE_TOKEN / HF_TOKEN). Not stored in outputs."}),
            },
        }

    def load(self, model, model_path, dtype="auto", device="auto", attention="sdpa", keep_loaded=True, hf_token="",
             **kwargs):
        source = chosen_model_source(
            model, model_path, "qwen3_vl", "Qwen3-VL model folder", placeholder=NO_FOLDER,
            no_choice="no Qwen3-VL model chosen: put a Qwen3-VL folder in ComfyUI/models/qwen3_vl/ or type a path / "
                      "hub id (e.g. Qwen/Qwen3-VL-2B-Instruct) in model_path.")
        single = expand_user(str(source).strip(), what="model_path")
        if single.suffix == ".safetensors" and single.is_file():   # ComfyUI's one-file Qwen3-VL text encoder
            return (self._load_single_file(single, dtype, device, attention, keep_loaded),)
        dirs = model_dirs("qwen3_vl")
        token = (hf_token or "").strip() or None
        folder = resolve_model_dir(source, search_dirs=dirs, download_dir=dirs[0] if dirs else None, token=token,
                                   what="Qwen3-VL model")
        if comfyui_manages_models():   # into RAM; ComfyUI moves it to the GPU when extraction needs it
            dev, ram = comfy_devices(device)
            dt = resolve_dtype(dtype, dev)
            bundle = load_qwen3vl(str(folder), device=ram, dtype=dt, attn_implementation=attention)
            return (self._hosted(bundle, dev, keep_loaded),)
        mm = model_management()
        dev = resolve_device(mm.get_torch_device() if (mm is not None and device == "auto") else device)
        dt = resolve_dtype(dtype, dev)
        load_on = dev if keep_loaded else torch.device("cpu")
        if keep_loaded:
            make_room(weights_bytes(folder, dt), dev)
        bundle = load_qwen3vl(str(folder), device=load_on, dtype=dt, attn_implementation=attention)
        bundle.device = dev
        bundle.keep_loaded = bool(keep_loaded)
        return (bundle,)

    @staticmethod
    def _hosted(bundle: Qwen3VLBundle, dev: torch.device, keep_loaded: bool) -> Qwen3VLBundle:
        bundle.device = dev
        bundle.keep_loaded = bool(keep_loaded)
        hand_to_comfyui(bundle)
        return bundle

    @staticmethod
    def _load_single_file(path: Path, dtype, device, attention, keep_loaded):
        from ..core.identity.single_file_qwen3vl import load_single_file_bundle

        mm = model_management()
        managed = comfyui_manages_models()
        if managed:
            dev, ram = comfy_devices(device)
        else:
            dev = resolve_device(mm.get_torch_device() if (mm is not None and device == "auto") else device)
            ram = torch.device("cpu")
        try:   # the Qwen2-BPE tokenizer ComfyUI ships beside its own Qwen3-VL text encoder
            import comfy.text_encoders  # type: ignore[import-not-found]

            tokenizer_dir = Path(comfy.text_encoders.__file__).parent / "qwen25_tokenizer"
        except (ImportError, AttributeError, TypeError):
            tokenizer_dir = None
        bundle = load_single_file_bundle(path, tokenizer_dir, device=ram if managed or not keep_loaded else dev,
                                         dtype=dtype, attn_implementation=attention)
        if managed:
            return LoadQwen3VL._hosted(bundle, dev, keep_loaded)
        bundle.device = dev
        bundle.keep_loaded = bool(keep_loaded)
        return bundle


class ExtractIdentityFeatures:
    DESCRIPTION = ("Identity features of one person from several photos (an IMAGE batch): per-image Qwen3-VL "
                   "features, their (weighted) average as the identity vector, and a preview of what the model saw.")
    CATEGORY = CATEGORY
    FUNCTION = "extract"
    RETURN_TYPES = ("IDENTITY_FEATURES", "IMAGE")
    RETURN_NAMES = ("identity_features", "model_view")
    OUTPUT_TOOLTIPS = ("Per-image features [N, D], the combined identity vector [D] and their metadata.",
                       "The images exactly as the model saw them (with crop face: the aligned face squares), "
                       "padded with grey to one size.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "qwen3vl": ("QWEN3VL", {"tooltip": "The model from LoadQwen3VL."}),
                "images": ("IMAGE", {"tooltip": "One or more photos of the SAME person (an IMAGE batch). Each "
                                     "gives a feature; they are averaged into one identity vector."}),
                "feature_source": (list(FEATURE_SOURCES), {"default": DEFAULT_SOURCE, "tooltip": "merger_pooled "
                                   "(default): the vision merger's image tokens, what the LLM consumes; cheap, no "
                                   "LLM forward. llm_hidden: the LLM's hidden states at the image tokens of "
                                   "`layer`; costs a full forward. Must match what the head was trained on."}),
                "layer": ("INT", {"default": -1, "min": -256, "max": 256, "tooltip": "llm_hidden only: which hidden "
                          "state (0 = embeddings, -1 = last, -2 = second to last ...)."}),
                "resolution": (list(RESOLUTIONS), {"default": DEFAULT_RESOLUTION, "tooltip": "center_crop_448 "
                               "(default): shortest side to 448 then a centre 448x448 crop. pixel_budget: whole "
                               "photo, aspect kept, at most max_pixels, sides multiples of 32."}),
                "max_pixels": ("INT", {"default": DEFAULT_MAX_PIXELS, "min": 1024, "max": 4096 * 4096, "step": 1024,
                               "tooltip": "pixel_budget only: the most pixels one photo may have when the model sees "
                               "it (default 200704 = 448x448). Bounds memory for huge photos."}),
            },
            "optional": {
                "weights": ("STRING", {"default": "", "tooltip": "Optional per-photo weights in batch order, e.g. "
                            "'1,1,0.5'. Empty = equal weights."}),
                "crop": (list(CROPS), {"default": DEFAULT_CROP, "tooltip": "Which part of each photo the model "
                         "sees. " + CROP_HELP + " model_view shows the result."}),
                "crop_fallback": (list(CROP_FALLBACKS), {"default": DEFAULT_CROP_FALLBACK, "tooltip": FALLBACK_HELP}),
            },
        }

    def extract(self, qwen3vl, images, feature_source=DEFAULT_SOURCE, layer=-1, resolution=DEFAULT_RESOLUTION,
                max_pixels=DEFAULT_MAX_PIXELS, weights="", crop=DEFAULT_CROP, crop_fallback=DEFAULT_CROP_FALLBACK):
        if not isinstance(qwen3vl, Qwen3VLBundle):
            raise UserInputError("the qwen3vl input must come from LoadQwen3VL.")
        settings = FeatureSettings(source=feature_source, layer=int(layer), resolution=resolution,
                                   max_pixels=int(max_pixels), crop=crop, crop_fallback=crop_fallback)
        key = FEATURE_CACHE.key(qwen3vl, images, settings=settings.to_meta(), weights=weights)
        hit = FEATURE_CACHE.get(key)
        if hit is not None:
            return hit
        pil = comfy_to_pil(images)
        seen, crops = prepare_photos(pil, settings, qwen3vl.patch_multiple,
                                     names=[f"image {i} of the batch" for i in range(len(pil))])
        ensure_on_device(qwen3vl)
        try:
            feats = extract_features(qwen3vl, pil, settings, weights=weights, prepared=seen, crops=crops,
                                     progress=comfy_progress(len(seen)))
        finally:
            release(qwen3vl)
        return FEATURE_CACHE.put(key, (feats, pil_to_comfy(pad_to_one_size(seen))))


def pad_to_one_size(images: list[Image.Image], fill=(128, 128, 128)) -> list[Image.Image]:
    """Centre each image on a grey canvas of the largest width and height (for an IMAGE batch preview)."""
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    out = []
    for im in images:
        if im.size == (w, h):
            out.append(im)
            continue
        canvas = Image.new("RGB", (w, h), fill)
        canvas.paste(im, ((w - im.width) // 2, (h - im.height) // 2))
        out.append(canvas)
    return out


NODE_CLASS_MAPPINGS = {"LoadQwen3VL": LoadQwen3VL, "ExtractIdentityFeatures": ExtractIdentityFeatures}
NODE_DISPLAY_NAME_MAPPINGS = {"LoadQwen3VL": "Load Qwen3-VL (identity)",
                              "ExtractIdentityFeatures": "Extract Identity Features (Qwen3-VL)"}
