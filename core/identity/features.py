"""Identity features from Qwen3-VL: what the model sees, the two feature sources, and the feature cache.

Feature sources (both mean-pooled over the image's tokens, then L2-normalised):
- `merger_pooled` (DEFAULT): the vision tower's merger output (`model.get_image_features(...)
  .pooler_output`), i.e. exactly the image tokens the language model consumes, already at the LLM width
  D. It needs no language-model forward (the vision tower is ~0.4-0.6 B parameters of the 2-8 B), does
  not depend on any prompt text, and is the same for every Qwen3-VL size/variant sharing a vision tower
  recipe. That makes it cheap enough to run next to Qwen-Image and stable to train a head on.
- `llm_hidden`: the language model's hidden states at the image-token positions of a chosen layer
  (`layer`, index into `hidden_states`: 0 = embeddings, -1 = last), with the processor output passed
  whole and `output_hidden_states=True` (the POC's "model forward pass"). The image tokens see only the
  fixed chat prefix `<|im_start|>user\\n<|vision_start|>` before them (causal attention), so they do not
  depend on any prompt wording. It costs a full LLM forward and carries the LLM's contextual mixing.

The crop (core/identity/face_crop.py) chooses the region first: `face` (default: the aligned face
square), `center` (the centre square, the behaviour before the setting) or `full` (the whole photo).

Resolution policies (`prepare_images` returns exactly the pixels the model sees; the processor is run
with `do_resize=False`, so its own min/max-pixel resize never changes them):
- `center_crop_448` (default, the POC's): shortest side resized to 448 (bicubic), centre crop 448x448
  -> 14x14 = 196 image tokens. A face square is simply resized to 448x448; `full` is letterboxed.
- `pixel_budget`: aspect ratio kept, total pixels <= `max_pixels` (default 448*448), both sides rounded to
  the model's patch multiple (patch_size * merge_size = 32), never below one 32x32 cell. `center` first
  cuts the centre square, `face` the face square; `full` keeps the whole photo. Huge photos
  are downscaled before the model sees them, so they cannot exhaust memory; a 1x1 image becomes 32x32.

The combined identity vector is normalise(sum_i w_i f_i / sum_i w_i) over the per-image features f_i
(already unit norm); w defaults to all ones.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from ..files.atomic import atomic_write
from ..errors import UserInputError
from ..files.images import to_rgb
from .face_crop import (CROP_FALLBACKS, CROPS, DEFAULT_CROP, DEFAULT_CROP_FALLBACK, CropInfo, NoFaceError, check_crop,
                        crop_region, legacy_crop, letterbox)

FEATURE_SOURCES = ("merger_pooled", "llm_hidden")
DEFAULT_SOURCE = "merger_pooled"
RESOLUTIONS = ("center_crop_448", "pixel_budget")
DEFAULT_RESOLUTION = "center_crop_448"
CROP_SIZE = 448
DEFAULT_MAX_PIXELS = CROP_SIZE * CROP_SIZE
PATCH_MULTIPLE = 32  # Qwen3-VL: patch 16 x spatial merge 2
MAX_MAX_PIXELS = 4096 * 4096

CACHE_FORMAT = "qwen-identity-features"
CACHE_FORMAT_VERSION = 1
CACHE_METADATA_KEY = "qwen_identity_features"

Progress = Callable[[int, int], None]
_log = logging.getLogger("qwen_identity")


@dataclass(frozen=True)
class FeatureSettings:
    """How features are computed; recorded in the features' metadata and in heads trained on them."""

    source: str = DEFAULT_SOURCE
    layer: int = -1                     # llm_hidden only: index into hidden_states (0 = embeddings, -1 = last)
    resolution: str = DEFAULT_RESOLUTION
    max_pixels: int = DEFAULT_MAX_PIXELS  # pixel_budget only
    crop: str = DEFAULT_CROP              # face | center | full (core/identity/face_crop.py)
    crop_fallback: str = DEFAULT_CROP_FALLBACK  # face only: error | center | full for a photo without a face

    def __post_init__(self):
        check_crop(self.crop, self.crop_fallback)
        if self.source not in FEATURE_SOURCES:
            raise UserInputError(f"unknown feature source {self.source!r}: use one of {', '.join(FEATURE_SOURCES)}.")
        if self.resolution not in RESOLUTIONS:
            raise UserInputError(f"unknown resolution policy {self.resolution!r}: use one of {', '.join(RESOLUTIONS)}.")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise UserInputError(f"layer must be an integer (0 = embeddings, -1 = last), got {self.layer!r}.")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int):
            raise UserInputError(f"max_pixels must be an integer, got {self.max_pixels!r}.")
        if self.resolution == "pixel_budget" and not (PATCH_MULTIPLE ** 2 <= self.max_pixels <= MAX_MAX_PIXELS):
            raise UserInputError(f"max_pixels={self.max_pixels} is out of range: use {PATCH_MULTIPLE ** 2} "
                                 f"(one {PATCH_MULTIPLE}x{PATCH_MULTIPLE} cell) to {MAX_MAX_PIXELS}; the default is "
                                 f"{DEFAULT_MAX_PIXELS} (448x448).")

    def to_meta(self) -> dict[str, Any]:
        """The settings that change the features (layer only for llm_hidden, max_pixels only for the budget,
        the fallback only for the face crop)."""
        return {"source": self.source, "layer": self.layer if self.source == "llm_hidden" else None,
                "resolution": self.resolution,
                "max_pixels": self.max_pixels if self.resolution == "pixel_budget" else CROP_SIZE * CROP_SIZE,
                "crop": self.crop, "crop_fallback": self.crop_fallback if self.crop == "face" else None}


@dataclass
class IdentityFeatures:
    """Per-image features [N, D], the combined identity vector [D], the weights used, and metadata."""

    per_image: torch.Tensor            # [N, D] float32, rows unit norm
    combined: torch.Tensor             # [D] float32, unit norm
    weights: torch.Tensor | None       # [N] float32 or None (equal weights)
    meta: dict[str, Any] = field(default_factory=dict)
    crops: list[CropInfo] = field(default_factory=list)  # per photo, when extracted in this process (not cached)

    @property
    def feature_dim(self) -> int:
        return int(self.per_image.shape[-1])

    @property
    def n_images(self) -> int:
        return int(self.per_image.shape[0])

    def __repr__(self) -> str:  # ComfyUI shows this in some previews; keep it short
        return (f"IdentityFeatures(N={self.n_images}, D={self.feature_dim}, model={self.meta.get('model_id')!r}, "
                f"source={self.meta.get('source')!r}, resolution={self.meta.get('resolution')!r}, "
                f"crop={legacy_crop(self.meta)!r})")


def l2_normalize(x: torch.Tensor, what: str = "feature") -> torch.Tensor:
    x = x.to(torch.float32)
    norms = x.norm(dim=-1, keepdim=True)
    if not torch.isfinite(x).all():
        raise UserInputError(f"the {what} contains NaN or infinite values: the model produced garbage (try dtype fp32 "
                             "or bf16 instead of fp16).")
    if (norms == 0).any():
        raise UserInputError(f"the {what} is all zeros and cannot be normalised.")
    return x / norms


def parse_weights(weights, n: int) -> torch.Tensor | None:
    """None/'' -> None; '1,1,0.5' or a sequence -> float32 [n], finite, >= 0, sum > 0; else UserInputError."""
    if weights is None:
        return None
    if isinstance(weights, str):
        text = weights.strip()
        if not text:
            return None
        try:
            values = [float(t) for t in text.replace(";", ",").split(",") if t.strip()]
        except ValueError:
            raise UserInputError(f"weights {weights!r} are not comma-separated numbers (e.g. '1,1,0.5').") from None
    else:
        values = [float(v) for v in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(values) != n:
        raise UserInputError(f"{len(values)} weights given for {n} images: give one weight per image, in batch order.")
    w = torch.tensor(values, dtype=torch.float32)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise UserInputError(f"weights {values} must be finite and not negative.")
    if float(w.sum()) <= 0:
        raise UserInputError(f"weights {values} sum to zero: at least one image needs a positive weight.")
    return w


def combine_features(per_image: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """normalise(weighted mean of the unit-norm rows of per_image) -> [D] float32."""
    per_image = per_image.to(torch.float32)
    if weights is None:
        mean = per_image.mean(dim=0)
    else:
        w = weights.to(torch.float32)
        mean = (per_image * w[:, None]).sum(dim=0) / w.sum()
    return l2_normalize(mean, what="combined identity vector (the views cancel out)")


# --- what the model sees -----------------------------------------------------------------------
def _budget_size(width: int, height: int, max_pixels: int, multiple: int) -> tuple[int, int]:
    """(w, h): aspect kept, w*h <= max_pixels, both multiples of `multiple`, each >= multiple."""
    scale = min(1.0, math.sqrt(max_pixels / float(width * height)))
    w = max(multiple, round(width * scale / multiple) * multiple)
    h = max(multiple, round(height * scale / multiple) * multiple)
    if w * h > max_pixels:
        w = max(multiple, math.floor(width * scale / multiple) * multiple)
        h = max(multiple, math.floor(height * scale / multiple) * multiple)
    # extreme aspect ratios: the short side is clamped up to one cell; shrink the long side to fit
    while w * h > max_pixels and (w > multiple or h > multiple):
        if w >= h:
            w = max(multiple, (max_pixels // h) // multiple * multiple)
        else:
            h = max(multiple, (max_pixels // w) // multiple * multiple)
    return w, h


def _size(image: Image.Image, settings: FeatureSettings, crop: str, multiple: int) -> Image.Image:
    """Size a cropped region under the resolution policy (the region is the photo for center/full)."""
    width, height = image.size
    if settings.resolution == "center_crop_448":
        if CROP_SIZE % multiple:
            raise UserInputError(f"the 448x448 centre crop does not fit this model's patch multiple {multiple}: "
                                 "use resolution 'pixel_budget'.")
        if crop == "full":
            return letterbox(image, CROP_SIZE)
        scale = CROP_SIZE / min(width, height)
        new_w, new_h = max(CROP_SIZE, round(width * scale)), max(CROP_SIZE, round(height * scale))
        resized = image.resize((new_w, new_h), Image.BICUBIC) if (new_w, new_h) != (width, height) else image
        left, top = (new_w - CROP_SIZE) // 2, (new_h - CROP_SIZE) // 2
        return resized.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    if crop == "center" and width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        width = height = side
    w, h = _budget_size(width, height, settings.max_pixels, multiple)
    return image.resize((w, h), Image.BICUBIC) if (w, h) != (width, height) else image.copy()


def prepare_photo(image: Image.Image, settings: FeatureSettings, multiple: int = PATCH_MULTIPLE,
                  name: str = "the photo") -> tuple[Image.Image, CropInfo]:
    """One photo -> (the RGB image the model sees under `settings`, what the crop did)."""
    image = to_rgb(image)
    width, height = image.size
    if width < 1 or height < 1:
        raise UserInputError(f"an image of size {width}x{height} has no pixels.")
    region, info = crop_region(image, settings.crop, settings.crop_fallback, name=name)
    return _size(region, settings, info.crop, multiple), info


def prepare_image(image: Image.Image, settings: FeatureSettings, multiple: int = PATCH_MULTIPLE) -> Image.Image:
    """One photo -> the RGB image the model sees under `settings`."""
    return prepare_photo(image, settings, multiple)[0]


def prepare_photos(pil_images: Sequence[Image.Image], settings: FeatureSettings | None = None,
                   multiple: int = PATCH_MULTIPLE, names: Sequence[str] | None = None,
                   ) -> tuple[list[Image.Image], list[CropInfo]]:
    """The images exactly as the model sees them and what the crop did to each. Every photo without a face
    (crop `face`, no fallback) is named in one NoFaceError; notes (fallbacks, several faces) are logged."""
    settings = settings or FeatureSettings()
    images = list(pil_images)
    if not images:
        raise UserInputError("no images given: connect at least one photo of the person.")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise UserInputError(f"image {i} is a {type(im).__name__}, not a PIL image.")
    names = [str(n) for n in names] if names is not None else [f"image {i} of {len(images)}" for i in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    seen, infos, missing = [], [], []
    for im, name in zip(images, names):
        try:
            out, info = prepare_photo(im, settings, multiple, name=name)
        except NoFaceError:
            missing.append(name)
            continue
        seen.append(out)
        infos.append(info)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise NoFaceError(f"no face found in {len(missing)} of {len(images)} photos ({shown}); crop is 'face'. Use "
                          "photos where the face is visible and at least about 80 pixels wide, or choose "
                          "crop_fallback 'center' or 'full' (those photos are then cropped that way), or crop "
                          "'center' / 'full' for all photos.")
    for info in infos:
        if info.note:
            _log.warning("%s", info.note)
    return seen, infos


def prepare_images(pil_images: Sequence[Image.Image], settings: FeatureSettings | None = None,
                   multiple: int = PATCH_MULTIPLE, names: Sequence[str] | None = None) -> list[Image.Image]:
    """The images exactly as the model sees them (see the module docstring for the crops and policies)."""
    return prepare_photos(pil_images, settings, multiple, names)[0]


# --- extraction --------------------------------------------------------------------------------
def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pooled_output(output):
    """get_image_features' per-image embeddings across transformers versions (the one fallback path)."""
    pooled = getattr(output, "pooler_output", None)  # transformers >= 5: a ModelOutput
    if pooled is None and isinstance(output, (tuple, list)):  # 4.57: (image_embeds, deepstack_embeds)
        pooled = output[0]
    if pooled is None:
        raise UserInputError(f"this transformers version's Qwen3-VL get_image_features returns {type(output).__name__}, "
                             "which this pack does not understand: use transformers >= 4.57 (tested with 5.24).")
    return list(pooled) if isinstance(pooled, (tuple, list)) else [pooled]


@torch.inference_mode()
def _features_pooled(bundle, images: list[Image.Image]) -> torch.Tensor:
    model, device = bundle.model, _model_device(bundle.model)
    if not hasattr(model, "get_image_features"):
        raise UserInputError("this Qwen3-VL model class has no get_image_features: use transformers >= 4.57.")
    inputs = bundle.processor.image_processor(images=images, return_tensors="pt", do_resize=False)
    pixel_values = inputs["pixel_values"].to(device)
    grid = inputs["image_grid_thw"].to(device)
    pooled = _pooled_output(model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid))
    if len(pooled) != len(images):
        raise RuntimeError(f"get_image_features returned {len(pooled)} images for {len(images)} inputs")
    return torch.stack([p.to(torch.float32).mean(dim=0) for p in pooled]).cpu()


def _chat_text(processor) -> str:
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    start = getattr(processor, "vision_start_token", "<|vision_start|>")
    end = getattr(processor, "vision_end_token", "<|vision_end|>")
    return f"<|im_start|>user\n{start}{image_token}{end}<|im_end|>\n"


@torch.inference_mode()
def _features_llm(bundle, images: list[Image.Image], layer: int) -> torch.Tensor:
    model, processor, device = bundle.model, bundle.processor, _model_device(bundle.model)
    text = _chat_text(processor)
    inputs = processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True,
                       do_resize=False)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    out = model(**inputs, output_hidden_states=True, use_cache=False)
    states = out.hidden_states
    n_states = len(states)
    if not -n_states <= layer < n_states:
        raise UserInputError(f"layer {layer} does not exist: this model has {n_states} hidden states "
                             f"(0 = embeddings .. {n_states - 1} = last; -1 = last).")
    hidden = states[layer]
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))
    mask = (inputs["input_ids"] == image_token_id) & inputs["attention_mask"].bool()
    feats = []
    for i in range(hidden.shape[0]):
        tokens = hidden[i][mask[i]]
        if tokens.shape[0] == 0:
            raise RuntimeError("no image tokens found in the processor output")
        feats.append(tokens.to(torch.float32).mean(dim=0))
    return torch.stack(feats).cpu()


def extract_features(bundle, pil_images: Sequence[Image.Image], settings: FeatureSettings | None = None,
                     weights=None, batch_size: int = 8, progress: Progress | None = None,
                     prepared: list[Image.Image] | None = None, extra_meta: dict | None = None,
                     names: Sequence[str] | None = None, crops: list[CropInfo] | None = None) -> IdentityFeatures:
    """Features of several photos of one person: per-image [N, D], combined [D], weights and metadata.

    `prepared` may pass the output of `prepare_images` (to avoid resizing twice when the caller also
    shows what the model saw; `crops` then passes what `prepare_photos` said about them). `names` name the
    photos in errors and notes (a photo without a face). `progress(done, total)` is called after each batch.
    """
    from ...version import __version__

    settings = settings or FeatureSettings()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if prepared is not None:
        images, crops = prepared, list(crops or [])
    else:
        images, crops = prepare_photos(pil_images, settings, bundle.patch_multiple, names)
    if not images:
        raise UserInputError("no images given: connect at least one photo of the person.")
    w = parse_weights(weights, len(images))
    total = len(images)
    chunks = []
    if progress:
        progress(0, total)
    for start in range(0, total, batch_size):
        batch = images[start:start + batch_size]
        if settings.source == "merger_pooled":
            chunks.append(_features_pooled(bundle, batch))
        else:
            chunks.append(_features_llm(bundle, batch, settings.layer))
        if progress:
            progress(min(start + batch_size, total), total)
    per_image = l2_normalize(torch.cat(chunks), what="image feature")
    combined = combine_features(per_image, w)
    meta = {"model_id": bundle.model_id, "feature_dim": int(per_image.shape[-1]), **settings.to_meta(),
            "n_images": total, "pack_version": __version__, **(extra_meta or {})}
    return IdentityFeatures(per_image=per_image.contiguous(), combined=combined.contiguous(), weights=w, meta=meta,
                            crops=crops)


# --- the feature cache (what `qwen-identity extract --out` writes and training reuses) ------------
def save_feature_cache(path: str | os.PathLike, items: dict[str, IdentityFeatures]) -> Path:
    """One safetensors file, written atomically: tensors `<i>.per_image`, `<i>.combined`, `<i>.weights`;
    metadata JSON under `qwen_identity_features` maps each item's index to its key and meta."""
    from safetensors.torch import save_file

    if not items:
        raise UserInputError("no identity features to save.")
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for i, (key, feats) in enumerate(items.items()):
        tensors[f"{i}.per_image"] = feats.per_image.detach().cpu().to(torch.float32).contiguous()
        tensors[f"{i}.combined"] = feats.combined.detach().cpu().to(torch.float32).contiguous()
        if feats.weights is not None:
            tensors[f"{i}.weights"] = feats.weights.detach().cpu().to(torch.float32).contiguous()
        entries.append({"key": str(key), "meta": feats.meta})
    doc = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "items": entries}
    metadata = {CACHE_METADATA_KEY: json.dumps(doc, sort_keys=True, default=str), "format": CACHE_FORMAT}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_feature_cache(path: str | os.PathLike) -> dict[str, IdentityFeatures]:
    """Read a feature cache back (insertion order kept); every problem is a UserInputError naming the file."""
    from ..files.safetensors_io import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"feature cache not found: {path}. Create it with `qwen-identity extract --out {path}`.")
    metadata, tensors = read_safetensors(
        path, lambda e: f"{path} is not a readable safetensors file ({type(e).__name__}: {e}). Recreate it "
                        "with `qwen-identity extract`.")
    if CACHE_METADATA_KEY not in metadata:
        raise UserInputError(f"{path} is a safetensors file but not a Qwen identity feature cache (no "
                             f"'{CACHE_METADATA_KEY}' metadata). Recreate it with `qwen-identity extract`.")
    try:
        doc = json.loads(metadata[CACHE_METADATA_KEY])
        entries = doc["items"]
        version = doc.get("format_version")
    except (ValueError, KeyError, TypeError):
        raise UserInputError(f"{path}: its feature-cache metadata is damaged. Recreate it with `qwen-identity extract`.") from None
    if doc.get("format") != CACHE_FORMAT or not isinstance(version, int) or not 1 <= version <= CACHE_FORMAT_VERSION:
        raise UserInputError(f"{path}: feature-cache format {doc.get('format')!r} v{version!r} is not supported "
                             f"(this pack reads {CACHE_FORMAT} v1..{CACHE_FORMAT_VERSION}); update the pack or recreate it.")
    out: dict[str, IdentityFeatures] = {}
    for i, entry in enumerate(entries):
        key, meta = entry.get("key"), entry.get("meta") or {}
        per_image, combined = tensors.get(f"{i}.per_image"), tensors.get(f"{i}.combined")
        if per_image is None or combined is None or per_image.ndim != 2 or combined.shape != per_image.shape[1:]:
            raise UserInputError(f"{path}: item {key!r} has missing or inconsistent tensors; the file is damaged. "
                                 "Recreate it with `qwen-identity extract`.")
        weights = tensors.get(f"{i}.weights")
        if weights is not None and weights.shape != per_image.shape[:1]:
            raise UserInputError(f"{path}: item {key!r} has {weights.shape[0]} weights for {per_image.shape[0]} images.")
        if not (torch.isfinite(per_image).all() and torch.isfinite(combined).all()):
            raise UserInputError(f"{path}: item {key!r} contains NaN or infinite values. Recreate the cache.")
        out[str(key)] = IdentityFeatures(per_image=per_image, combined=combined, weights=weights, meta=dict(meta))
    return out


def settings_from_meta(meta: dict) -> FeatureSettings:
    """The FeatureSettings recorded in a features' (or head's) metadata. Recorded before the crop setting
    existed: the crop they were made with (`face_crop.legacy_crop`)."""
    layer = meta.get("layer")
    return FeatureSettings(source=meta.get("source", DEFAULT_SOURCE), layer=-1 if layer is None else int(layer),
                           resolution=meta.get("resolution", DEFAULT_RESOLUTION),
                           max_pixels=int(meta.get("max_pixels") or DEFAULT_MAX_PIXELS), crop=legacy_crop(meta),
                           crop_fallback=meta.get("crop_fallback") or DEFAULT_CROP_FALLBACK)


__all__ = ["FeatureSettings", "IdentityFeatures", "prepare_images", "prepare_photos", "extract_features", "combine_features",
           "parse_weights", "save_feature_cache", "load_feature_cache", "settings_from_meta",
           "FEATURE_SOURCES", "RESOLUTIONS", "DEFAULT_SOURCE", "DEFAULT_RESOLUTION", "DEFAULT_MAX_PIXELS",
           "CROPS", "DEFAULT_CROP", "CROP_FALLBACKS", "DEFAULT_CROP_FALLBACK"]
