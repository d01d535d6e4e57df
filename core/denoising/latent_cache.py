"""Training photos -> normalised Qwen-Image VAE latents (and face boxes), cached on disk.

A photo is scaled to cover the training resolution (width x height, multiples of 16) and centre-cropped;
a photo smaller than the resolution on either side is an error (upscaling would teach the head blur).
The VAE's latent mean (its distribution's mode, so a cache is deterministic) is normalised as the
pipeline expects: (z - latents_mean) / latents_std.

Cache: `OUT/cache/latents-<key>.safetensors`, one file per (VAE config hash, resolution, dtype, cache
format); the key is in the file name and repeated in its metadata, so a cache made with another model,
resolution or dtype is never read (it simply has another name). Inside, one entry per photo content
(sha256, plus ":flip" for a mirrored view). Face boxes (when face weighting is on) are stored beside the
latent in the pixel frame of the cropped training image; no face is stored as [-1, -1, -1, -1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image, ImageOps

from ..errors import UserInputError
from ..files.atomic import atomic_write
from ..files.dataset_fingerprint import cache_key
from ..files.safetensors_io import read_safetensors, safetensors_bytes

CACHE_FORMAT = "qwen-identity-latent-cache-v1"
NO_FACE = (-1.0, -1.0, -1.0, -1.0)


@dataclass(frozen=True)
class Resolution:
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> "Resolution":
        t = str(text).lower().replace(" ", "")
        try:
            w, h = (t.split("x") + [None])[:2] if "x" in t else (t, t)
            res = cls(int(w), int(h))
        except (TypeError, ValueError):
            raise UserInputError(f"--train-resolution {text!r}: give WIDTHxHEIGHT (e.g. 512x512 or 512x768) or one "
                                 "number for a square.") from None
        if res.width < 16 or res.height < 16 or res.width % 16 or res.height % 16:
            raise UserInputError(f"--train-resolution {text!r}: width and height must be multiples of 16 and at least "
                                 "16 (the VAE downsamples 8x, the transformer packs 2x2 latents).")
        return res

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def crop_to(image: Image.Image, res: Resolution, name: str = "photo", allow_upscale: bool = False) -> Image.Image:
    """Scale to cover res, centre-crop. Smaller photos are refused unless allow_upscale."""
    w, h = image.size
    if not allow_upscale and (w < res.width or h < res.height):
        fit = f"{max(16, w // 16 * 16)}x{max(16, h // 16 * 16)}"
        raise UserInputError(f"{name} is {w}x{h}, smaller than the training resolution {res}. Either lower the "
                             f"resolution to fit the photos (--train-resolution {fit}: sharp targets, fewer tokens per "
                             "face, farther from the sizes Qwen-Image generates at) or pass --allow-upscale (the photo "
                             "is enlarged: blurry targets the head may learn to ask for, full cost per step); or use "
                             "larger photos. See 'Data for a universal head' in docs/training.md.")
    return ImageOps.fit(image.convert("RGB"), (res.width, res.height), method=Image.BICUBIC, centering=(0.5, 0.5))


def vae_key(vae_source: dict[str, Any], res: Resolution, dtype: str) -> str:
    return cache_key(CACHE_FORMAT, vae_source, str(res), dtype)


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"latents-{key}.safetensors"


def load_cache(path: Path, key: str) -> dict[str, torch.Tensor]:
    """Entries of a latent cache file whose metadata carries `key`; a missing or damaged file is empty."""
    if not path.is_file():
        return {}
    try:
        meta, tensors = read_safetensors(path, lambda e: "damaged")
    except UserInputError:
        return {}
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
        return {}
    return tensors


def save_cache(path: Path, key: str, entries: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    data = safetensors_bytes({k: v.contiguous() for k, v in entries.items()},
                             {"format": CACHE_FORMAT, "key": key, "info": json.dumps(info, sort_keys=True, default=str)})
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def image_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, 1, H, W] in [-1, 1] (the VAE's input layout: one frame)."""
    import numpy as np

    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1)[None, :, None]


@torch.no_grad()
def encode_latent(vae, image: Image.Image) -> torch.Tensor:
    """Normalised latent [C, h, w] (float32, CPU) of one cropped image, as the VAE's model family
    encodes it (core/families/: the distribution's mode, normalised the way the transformer expects)."""
    from ..families import detect_family

    return detect_family(vae, "VAE").encode_vae_input(vae, image_tensor(image))[0]


def face_box(embedder, image: Image.Image) -> tuple[float, float, float, float]:
    res = embedder.analyze(image)
    if not res.faces:
        return NO_FACE
    return tuple(float(v) for v in res.faces[0].box)  # type: ignore[return-value]


def face_token_weights(box: Sequence[float], res: Resolution, face_weight: float) -> torch.Tensor:
    """Weights [N] over the packed token grid (H/16 x W/16): face_weight on tokens the face box touches, 1 elsewhere."""
    gh, gw = res.height // 16, res.width // 16
    w = torch.ones(gh, gw)
    left, top, right, bottom = box
    c0, c1 = max(0, int(left // 16)), min(gw, int(-(-right // 16)))
    r0, r1 = max(0, int(top // 16)), min(gh, int(-(-bottom // 16)))
    if c1 > c0 and r1 > r0:
        w[r0:r1, c0:c1] = face_weight
    return w.flatten()


@dataclass
class PhotoView:
    """One training view: a photo file (its sha256), optionally mirrored."""

    path: Path
    sha256: str
    flip: bool = False

    @property
    def key(self) -> str:
        return self.sha256 + (":flip" if self.flip else "")

    def load(self) -> Image.Image:
        from ..files.images import load_image

        img = load_image(self.path)
        return ImageOps.mirror(img) if self.flip else img


def latents_for(views: Sequence[PhotoView], res: Resolution, cache_file: Path, key: str,
                load_vae: Callable[[], Any], want_faces: bool, face_embedder: Callable[[], Any] | None = None,
                allow_upscale: bool = False, say: Callable[[str], None] = lambda m: None,
                map_fn=None, write: bool = True, info: dict[str, Any] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latents [M, C, h, w], face boxes [M, 4] or None) for views, from the cache where present.

    Sizes are checked before any model loads. `map_fn(items, fn)` may shard the encoding over processes."""
    crops = {}
    for v in views:  # check every photo's size first: a bad photo fails before a model loads
        if v.key not in crops:
            crops[v.key] = None
            img = v.load()
            crop_to(img, res, str(v.path), allow_upscale)
    cached = load_cache(cache_file, key)
    todo = [v for v in {v.key: v for v in views}.values()
            if f"{v.key}/latent" not in cached or (want_faces and f"{v.key}/face" not in cached)]
    if todo:
        say(f"encoding {len(todo)} photo(s) with the Qwen-Image VAE at {res} (cached afterwards)")
        vae = load_vae()
        emb = face_embedder() if want_faces and face_embedder else None

        def one(_, v: PhotoView):
            img = crop_to(v.load(), res, str(v.path), allow_upscale)
            out = {f"{v.key}/latent": encode_latent(vae, img)}
            if emb is not None:
                out[f"{v.key}/face"] = torch.tensor(face_box(emb, img), dtype=torch.float32)
            elif f"{v.key}/face" in cached:
                out[f"{v.key}/face"] = cached[f"{v.key}/face"]
            return out

        results = map_fn(todo, one) if map_fn else [one(i, v) for i, v in enumerate(todo)]
        for r in results:
            cached.update(r)
        if write:
            save_cache(cache_file, key, cached, info or {})
    lat = torch.stack([cached[f"{v.key}/latent"] for v in views])
    faces = torch.stack([cached[f"{v.key}/face"] for v in views]) if want_faces else None
    return lat, faces


def photo_buckets(views: Sequence[PhotoView], res: Resolution, multiple: int, allow_upscale: bool,
                  option: str = "--train-resolution") -> tuple[list[Resolution], list[Resolution]]:
    """(the bucket list, each view's bucket): the aspect buckets (core/denoising/aspect_buckets.py) of about
    res's pixel count with sides multiples of the model family's `multiple` (VAE factor x patch: 16 for
    Qwen-Image 1.x, 32 for 2.1), and for each view the one nearest its shape. A photo smaller than its
    bucket is refused here, before any model loads, unless allow_upscale."""
    from .aspect_buckets import bucket_list, nearest_bucket

    w, h = (max(multiple, v // multiple * multiple) for v in (res.width, res.height))
    sizes = [Resolution(*s) for s in bucket_list(w, h, multiple=multiple)]
    out = []
    for v in views:
        w, h = v.load().size
        bucket = Resolution(*nearest_bucket(w, h, [(s.width, s.height) for s in sizes]))
        if not allow_upscale and (w < bucket.width or h < bucket.height):
            raise UserInputError(
                f"{v.path} is {w}x{h}, smaller than the training resolution {bucket} of its aspect bucket (the "
                f"bucket nearest its shape at about {res} pixels). Either lower {option} (sharp targets, fewer tokens "
                "per face) or pass --allow-upscale (the photo is enlarged: blurry targets the head may learn to ask "
                "for); or use a larger photo.")
        out.append(bucket)
    return sizes, out


def latents_per_bucket(views: Sequence[PhotoView], buckets: Sequence[Resolution], cache_dir: Path,
                       key_of: Callable[[Resolution], str], load_vae: Callable[[], Any], want_faces: bool,
                       face_embedder: Callable[[], Any] | None = None, allow_upscale: bool = False,
                       say: Callable[[str], None] = lambda m: None, map_fn=None, write: bool = True,
                       info_of: Callable[[Resolution], dict[str, Any]] = lambda r: {}
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """`latents_for` per bucket (one cache file per bucket, keyed on its resolution by `key_of`):
    each view's latent [C, h, w] at its own bucket, and its face box (None when faces are not wanted).
    `load_vae` / `face_embedder` may be called once per bucket that needs encoding: let them reuse."""
    latents: list[Any] = [None] * len(views)
    boxes: list[Any] = [None] * len(views)
    for res in sorted(set(buckets), key=lambda r: (r.width / r.height, r.width)):
        idx = [i for i, b in enumerate(buckets) if b == res]
        key = key_of(res)
        lat, faces = latents_for([views[i] for i in idx], res, cache_path(cache_dir, key), key, load_vae,
                                 want_faces, face_embedder, allow_upscale, say, map_fn=map_fn, write=write,
                                 info=info_of(res))
        for j, i in enumerate(idx):
            latents[i] = lat[j]
            boxes[i] = None if faces is None else faces[j]
    return latents, boxes
