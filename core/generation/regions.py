"""Two people in one picture: per-region weights that pick which conditioning's prediction is used where.

How ComfyUI (0.3.64, `comfy/samplers.py`) applies a conditioning mask, and what this module builds on:
every conditioning entry is run through the model on the WHOLE latent (a DiT such as Qwen-Image has no
per-region text attention), and its denoised prediction is multiplied per latent pixel by the entry's
`mask` (× `mask_strength` × `strength`); the positive prediction is the sum of those products divided
by the sum of the weights. So with person A's conditioning masked by `a` and person B's by `b`:

    prediction(pixel) = (a·pred_A + b·pred_B) / (a + b)

- where only A's weight is non-zero, the prediction IS A's (exactly; tests/test_regional_native.py);
- where both are non-zero (overlap, soft edges) it is their weighted average;
- where both are zero ComfyUI divides 0 by a tiny constant: the prediction is ZERO there (the region
  collapses to the latent mean), which is why `build_regions` refuses uncovered pixels.
The mask does not confine attention: each person's pass sees the whole picture (and, after the first
step, the other person's region in the shared latent), so identity can leak across the border.
docs/multi-person.md says what is and is not guaranteed.

Everything here is plain torch on ComfyUI's data layout (MASK = float [B, H, W] in 0..1; conditioning
extras `mask`, `mask_strength`, `set_area_to_bounds`, exactly the keys ComfyUI's ConditioningSetMask
writes); no ComfyUI import. The diffusers path (core/generation/sampling.py) reads the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserInputError

LATENT_FACTOR = 8            # Qwen-Image's VAE: one latent pixel per 8x8 image pixels
SIZE_MULTIPLE = 16           # VAE factor 8 x the transformer's 2x2 patches
LAYOUTS = ("left/right", "top/bottom", "mask")
DEFAULT_LAYOUT = "left/right"
DOMINANT = 0.5               # a person "has a region" where their share of the weight reaches this
_EPS = 1e-6


@dataclass
class Regions:
    """Per-latent-pixel weights of person A and person B ([h, w], 0..1) and notes for the user."""

    a: torch.Tensor
    b: torch.Tensor
    notes: list[str] = field(default_factory=list)


def latent_size(width: int, height: int) -> tuple[int, int]:
    """(h, w) of Qwen-Image's latent for an image of width x height (both multiples of 16)."""
    for name, v in (("width", width), ("height", height)):
        if int(v) != v or v < SIZE_MULTIPLE or int(v) % SIZE_MULTIPLE:
            raise UserInputError(f"{name}={v} must be a positive multiple of {SIZE_MULTIPLE} (the image size the "
                                 "sampler uses: Qwen-Image needs both sides divisible by 16)")
    return int(height) // LATENT_FACTOR, int(width) // LATENT_FACTOR


def single_mask(mask, what: str) -> torch.Tensor:
    """A ComfyUI MASK ([H, W] or [1, H, W]; also [1, 1, H, W]) as one float32 [H, W] in 0..1."""
    if not torch.is_tensor(mask):
        raise UserInputError(f"{what} is not a MASK tensor; connect a MASK (e.g. LoadImageMask, SolidMask)")
    m = mask.detach().to(device="cpu", dtype=torch.float32)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise UserInputError(
            f"{what} has shape {list(mask.shape)}: give ONE mask [H, W] (a MASK batch of several masks cannot be "
            "used: ComfyUI applies one conditioning mask to every image, and with Qwen-Image's latent a batch of "
            "masks fails inside the sampler); pick one mask of the batch first")
    if m.shape[0] < 1 or m.shape[1] < 1:
        raise UserInputError(f"{what} is empty (shape {list(mask.shape)})")
    if not bool(torch.isfinite(m).all()):
        raise UserInputError(f"{what} contains NaN or infinite values; masks hold 0..1")
    lo, hi = float(m.min()), float(m.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise UserInputError(f"{what} holds values {lo:.3g}..{hi:.3g}; a MASK holds 0..1 (white = 1 = this "
                             "person): convert an image with ImageToMask, or rescale it")
    return m.clamp(0.0, 1.0)


def to_latent(mask: torch.Tensor, width: int, height: int, what: str) -> tuple[torch.Tensor, list[str]]:
    """A [H, W] mask at the latent size [h, w] of a width x height image, and a note when it was resized.

    A mask at the image size is averaged over each 8x8 block (the share of the block that is white);
    a mask already at the latent size is kept; any other size is resized (bilinear, antialiased) to the
    latent size and noted, since it was probably drawn for another picture size."""
    h, w = latent_size(width, height)
    if tuple(mask.shape) == (h, w):
        return mask, []
    if tuple(mask.shape) == (int(height), int(width)):
        return F.avg_pool2d(mask[None, None], LATENT_FACTOR)[0, 0], []
    mh, mw = mask.shape
    ratio_note = ""
    if abs(mw / mh - width / height) > 0.01 * (width / height):
        ratio_note = (f"; its aspect ratio {mw / mh:.2f} differs from the image's {width / height:.2f}, so the "
                      "regions are stretched")
    out = F.interpolate(mask[None, None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    note = (f"{what} is {mw}x{mh} but the image is {width}x{height} (latent {w}x{h}): resized to {w}x{h}"
            f"{ratio_note}. Draw the mask at {width}x{height} to place the regions exactly.")
    return out.clamp(0.0, 1.0), [note]


def split_mask(layout: str, width: int, height: int, split: float) -> torch.Tensor:
    """Person A's region [height, width] for a split layout: the left (or top) `split` of the picture."""
    if layout not in LAYOUTS[:2]:
        raise UserInputError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    split = float(split)
    if not 0.0 < split < 1.0:
        raise UserInputError(f"split={split} must be between 0 and 1 (exclusive): the fraction of the picture "
                             "that is person A's (0.5 = half each)")
    size = int(width) if layout == "left/right" else int(height)
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    line = (centres <= split * size).float()
    if layout == "left/right":
        return line[None, :].expand(int(height), size).clone()
    return line[:, None].expand(size, int(width)).clone()


def feather_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Softens a latent-size mask's edges: a box blur `pixels` image pixels wide (a step becomes a ramp)."""
    k = int(round(int(pixels) / LATENT_FACTOR))
    if k <= 1:
        return mask
    left, right = k // 2, k - 1 - k // 2
    x = F.pad(mask[None, None], (left, right, left, right), mode="replicate")
    return F.avg_pool2d(x, k, stride=1)[0, 0]


def build_regions(layout: str, width: int, height: int, split: float = 0.5, mask=None, mask_b=None,
                  feather: int = 0) -> Regions:
    """Weights of person A and B per latent pixel, checked: every pixel covered, each person dominant
    somewhere. Person B gets everything that is not A's unless `mask_b` is given."""
    if layout not in LAYOUTS:
        raise UserInputError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    notes: list[str] = []
    if layout == "mask":
        if mask is None:
            raise UserInputError("layout 'mask' needs a MASK on the mask input (white = person A); or choose "
                                 "layout left/right or top/bottom")
        a, n = to_latent(single_mask(mask, "mask"), width, height, "mask")
        notes += n
    else:
        if mask is not None or mask_b is not None:
            raise UserInputError(f"a mask is connected but layout is {layout!r}, which ignores it: choose layout "
                                 "'mask' to use the mask, or disconnect it")
        a, _ = to_latent(split_mask(layout, width, height, split), width, height, "split")
    a = feather_mask(a, feather)
    if mask_b is None:
        b = 1.0 - a
    else:
        b, n = to_latent(single_mask(mask_b, "mask_b"), width, height, "mask_b")
        notes += n
        b = feather_mask(b, feather)
    total = a + b
    uncovered = total <= _EPS
    if bool(uncovered.any()):
        frac = float(uncovered.float().mean())
        raise UserInputError(
            f"{frac:.0%} of the picture is in neither mask nor mask_b: ComfyUI predicts zero there (a flat "
            "grey-brown hole). Make the masks cover the whole picture, or leave mask_b empty so person B gets "
            "everything that is not person A's")
    if mask_b is not None:
        both = (a > _EPS) & (b > _EPS)
        if bool(both.any()):
            notes.append(f"mask and mask_b overlap on {float(both.float().mean()):.0%} of the picture: there the "
                         "two people's predictions are averaged, weighted by the mask values")
    share_a = a / total
    for who, share, fix in (("A", share_a, "mask (white = person A)"), ("B", 1.0 - share_a, "mask_b / the mask")):
        top = float(share.max())
        if top < DOMINANT - _EPS:
            where = ("after shrinking the mask to the latent size (1 latent pixel = 8x8 image pixels) "
                     if layout == "mask" else "")
            raise UserInputError(
                f"person {who}'s region is empty {where}(their share of the picture never reaches "
                f"{DOMINANT:.0%}; highest {top:.0%}): person {who} would not appear. Check the {fix}"
                + (" and split" if layout != "mask" else ""))
    return Regions(a=a, b=b, notes=notes)


def masked_conditioning(conditioning, weights: torch.Tensor, what: str) -> list:
    """A copy of `conditioning` whose entries carry `weights` ([h, w]) as ComfyUI's ConditioningSetMask
    (set_cond_area "default", strength 1) writes it: `mask` [1, h, w], `set_area_to_bounds` False,
    `mask_strength` 1.0. Other keys (step windows, attention masks) are kept; the input is not edited."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise UserInputError(f"{what} is empty; connect a CONDITIONING (e.g. InjectResidual's output)")
    out = []
    for entry in conditioning:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise UserInputError(f"{what} is not a ComfyUI CONDITIONING ([[tensor, dict], ...])")
        extra = entry[1]
        for key in ("mask", "area"):
            if extra.get(key) is not None:
                raise UserInputError(f"{what} already carries a region ({key!r}, e.g. from ConditioningSetMask / "
                                     "ConditioningSetArea); connect the conditioning before it was masked")
        new = dict(extra)
        new.update({"mask": weights[None].clone(), "set_area_to_bounds": False, "mask_strength": 1.0})
        out.append([entry[0], new])
    return out


def two_person_conditioning(conditioning_a, conditioning_b, regions: Regions) -> list:
    """Person A's conditioning masked by regions.a, then B's by regions.b, as one CONDITIONING (what
    ConditioningSetMask on each plus ConditioningCombine give)."""
    return (masked_conditioning(conditioning_a, regions.a, "conditioning_a")
            + masked_conditioning(conditioning_b, regions.b, "conditioning_b"))


def region_image(weights: torch.Tensor) -> torch.Tensor:
    """A latent-size region as a MASK [1, H, W] at the image size (each latent pixel as an 8x8 block):
    what the sampler really uses, for MaskPreview."""
    return weights.repeat_interleave(LATENT_FACTOR, 0).repeat_interleave(LATENT_FACTOR, 1)[None].contiguous()


# ---- reading masks back from a CONDITIONING (both sampling paths) --------------------------------------

def entry_region(extra: dict, lat_h: int, lat_w: int, what: str) -> torch.Tensor | None:
    """The per-latent-pixel weight [lat_h, lat_w] an entry's `mask` gives (× mask_strength), resized the
    way ComfyUI resizes a conditioning mask (bilinear), or None for an unmasked entry."""
    mask = extra.get("mask")
    if mask is None:
        return None
    if extra.get("set_area_to_bounds"):
        raise UserInputError(f"{what} uses ConditioningSetMask's set_cond_area 'mask bounds', which runs the model "
                             "on the mask's bounding box only; use 'default' (the diffusers path supports only that)")
    m = single_mask(mask, f"{what}'s mask")
    if tuple(m.shape) != (lat_h, lat_w):
        m = F.interpolate(m[None, None], size=(lat_h, lat_w), mode="bilinear", align_corners=False)[0, 0]
    return m * float(extra.get("mask_strength", 1.0))


def mask_notes(conditioning, lat_h: int, lat_w: int, what: str) -> list[str]:
    """Notes for masks that ComfyUI will resize to the latent size (drawn for another picture size)."""
    notes = []
    for entry in conditioning or []:
        mask = entry[1].get("mask") if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        if mask is None:
            continue
        m = single_mask(mask, f"a {what} conditioning mask")
        if tuple(m.shape) not in ((lat_h, lat_w), (lat_h * LATENT_FACTOR, lat_w * LATENT_FACTOR)):
            notes.append(f"a {what} conditioning mask is {m.shape[1]}x{m.shape[0]} but the image is "
                         f"{lat_w * LATENT_FACTOR}x{lat_h * LATENT_FACTOR}: ComfyUI resizes it to the latent size "
                         f"{lat_w}x{lat_h} (bilinear)")
    return notes


def packed_weights(region: torch.Tensor, channels: int) -> torch.Tensor:
    """A [h, w] latent-pixel weight in diffusers' packed Qwen-Image layout [h/2 * w/2, channels * 4]
    (`QwenImagePipeline._pack_latents`: token = 2x2 latent pixels, feature = channel * 4 + dy * 2 + dx)."""
    h, w = region.shape
    r = region.reshape(h // 2, 2, w // 2, 2).permute(0, 2, 1, 3).reshape((h // 2) * (w // 2), 1, 4)
    return r.expand(-1, channels, 4).reshape((h // 2) * (w // 2), channels * 4)
