"""Decoding photos and converting between PIL images and ComfyUI IMAGE tensors.

Conversions (documented in docs/nodes.md, ExtractIdentityFeatures):
- EXIF orientation is applied, so a phone photo is seen upright.
- Grayscale ("L", "1") is replicated to RGB; "I;16"/"I" (16-bit) are scaled to 8 bits (value / 257);
  float ("F") images are clipped to 0..255; CMYK/YCbCr/LAB go through PIL's RGB conversion.
- Transparency (RGBA, LA, palette with a transparent index) is composited over white.
- A ComfyUI IMAGE is float [B, H, W, C] in 0..1. It becomes uint8 by `round(x * 255)`, exactly the
  inverse of ComfyUI's LoadImage (`uint8 / 255`), so features from an IMAGE equal those from the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserInputError

_WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB by the documented rules."""
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        if mode == "I" and arr.max(initial=0) <= 255:
            scaled = arr
        else:
            scaled = arr / 257.0
        return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode a photo to RGB or raise UserInputError naming the file and the fix. Never writes to it."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"photo not found: {path}. Check the path.")
    if path.is_dir():
        raise UserInputError(f"{path} is a folder, not a photo.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserInputError(f"photo {path} is too large to decode safely ({e}). Downscale it below "
                             f"{Image.MAX_IMAGE_PIXELS} pixels.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserInputError(f"cannot decode photo {path}: {e}. Re-save it as PNG or JPEG.") from None


def pil_to_comfy(images: Iterable[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> ComfyUI IMAGE float [B, H, W, 3] in 0..1."""
    arrays = [np.asarray(to_rgb(im), dtype=np.float32) / 255.0 for im in images]
    if not arrays:
        raise UserInputError("no images to convert")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserInputError(f"images of different sizes cannot share one IMAGE batch: {sorted(shapes)}. "
                             "Resize them to one size first.")
    return torch.from_numpy(np.stack(arrays))


def comfy_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE [B, H, W, C] (or [H, W, C]) float 0..1 -> RGB PIL images, one per batch item.

    Rounds (not truncates), so a PNG loaded by ComfyUI converts back to its exact bytes. NaN or
    infinite pixels are an error naming the batch index; 1 or 4 channels are handled as gray / RGBA.
    """
    if not isinstance(images, torch.Tensor):
        raise UserInputError(f"expected an IMAGE tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise UserInputError(f"expected an IMAGE tensor [B, H, W, C] with C in 1/3/4, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise UserInputError("the IMAGE batch is empty: connect at least one photo.")
    out = []
    for i, img in enumerate(images):
        img = img.detach().to("cpu", torch.float32)
        if not torch.isfinite(img).all():
            raise UserInputError(f"image {i} of the batch contains NaN or infinite pixels: check the node that made it.")
        arr = (img.clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
        out.append(to_rgb(Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)))
    return out
