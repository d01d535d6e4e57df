"""TwoPersonRegions: two people's conditionings + a split or a mask -> one masked CONDITIONING.

A thin adapter over core/generation/regions.py. What it adds over ComfyUI's own ConditioningSetMask
x2 + InvertMask + ConditioningCombine (which give the same CONDITIONING keys): a left/right or
top/bottom split without drawing a mask, and checks ComfyUI does not make - a region that is empty
(the person would silently vanish), pixels in neither region (ComfyUI predicts zero there), a MASK
batch (fails inside the sampler for Qwen-Image), and a mask drawn for another picture size.
"""

from __future__ import annotations

import logging

from ..core.generation.regions import DEFAULT_LAYOUT, LAYOUTS, build_regions, region_image, two_person_conditioning

CATEGORY = "Qwen Identity"
log = logging.getLogger(__name__)


class TwoPersonRegions:
    DESCRIPTION = ("Two people in one picture: person A's conditioning is used in one region, person B's in the "
                   "other. Connect one InjectResidual per person (same prompt or a prompt per person), choose a "
                   "left/right or top/bottom split or draw a mask, and feed the result to KSampler or "
                   "QwenImageSampleFromEmbeds as the positive. Each person's conditioning is run on the whole "
                   "picture and the mask picks whose prediction is used where, so describe both people in the "
                   "prompt in the places the regions give them.")
    CATEGORY = CATEGORY
    FUNCTION = "combine"
    RETURN_TYPES = ("CONDITIONING", "MASK", "MASK")
    RETURN_NAMES = ("conditioning", "region_a", "region_b")
    OUTPUT_TOOLTIPS = ("Both conditionings, each with its region (ComfyUI's own conditioning masks): the positive "
                       "for KSampler or QwenImageSampleFromEmbeds.",
                       "Person A's region as the sampler uses it (latent resolution: 8x8-pixel blocks), for "
                       "MaskPreview.",
                       "Person B's region as the sampler uses it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning_a": ("CONDITIONING", {"tooltip": "Person A: the prompt with A's identity "
                                   "(InjectResidual's output)."}),
                "conditioning_b": ("CONDITIONING", {"tooltip": "Person B: the prompt with B's identity "
                                   "(a second InjectResidual)."}),
                "layout": (list(LAYOUTS), {"default": DEFAULT_LAYOUT, "tooltip": "left/right: A on the left, B "
                           "on the right; top/bottom: A on top; mask: A where the mask is white, B elsewhere (or "
                           "in mask_b)."}),
                "split": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 0.99, "step": 0.01, "tooltip": "For "
                          "left/right and top/bottom: the fraction of the width (height) that is A's. 0.5 = half "
                          "each."}),
                "width": ("INT", {"default": 768, "min": 16, "max": 4096, "step": 16, "tooltip": "The image "
                          "width the sampler makes (the same as EmptySD3LatentImage's / "
                          "QwenImageSampleFromEmbeds' width)."}),
                "height": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 16, "tooltip": "The image "
                           "height the sampler makes."}),
                "feather": ("INT", {"default": 0, "min": 0, "max": 1024, "step": 8, "tooltip": "Width in "
                            "pixels of a soft border between the regions, where the two predictions are blended "
                            "(0 = hard border). Works in 8-pixel steps (one latent pixel)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "For layout 'mask': person A's region (white = A), ideally "
                         "width x height; another size is resized, with a note in the log."}),
                "mask_b": ("MASK", {"tooltip": "Optional, layout 'mask': person B's region. Empty = everything "
                           "that is not A's. Where both masks are white the two predictions are averaged "
                           "(weighted by the mask values); every pixel must be in at least one mask."}),
            },
        }

    def combine(self, conditioning_a, conditioning_b, layout=DEFAULT_LAYOUT, split=0.5, width=768, height=512,
                feather=0, mask=None, mask_b=None, **kwargs):
        regions = build_regions(layout, int(width), int(height), float(split), mask=mask, mask_b=mask_b,
                                feather=int(feather))
        for note in regions.notes:
            log.warning("TwoPersonRegions: %s", note)
        out = two_person_conditioning(conditioning_a, conditioning_b, regions)
        return (out, region_image(regions.a), region_image(regions.b))


NODE_CLASS_MAPPINGS = {"TwoPersonRegions": TwoPersonRegions}
NODE_DISPLAY_NAME_MAPPINGS = {"TwoPersonRegions": "Two-Person Regions (Qwen Identity)"}
