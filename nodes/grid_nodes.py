"""AlphaGrid: a thin ComfyUI adapter over core.grid."""

from __future__ import annotations

import json

from ..core.errors import UserInputError
from ..core.generation.grid import make_grid
from ..core.files.images import comfy_to_pil, pil_to_comfy
from ..core.residual.injection import parse_alphas
from ..core.generation.reference_rows import ROW_CHOICES, comparison_labels
from ..core.generation.sampling import DEFAULT_SEEDS, parse_seeds
from ..core.measurement.identity_scores import score_identity

GRID_ROWS = ("alphas", *ROW_CHOICES)


class AlphaGrid:
    DESCRIPTION = ("Lays out α × seed images as one labelled grid (rows = α, columns = seeds, with their values written on the margins) and "
                   "returns the layout as JSON. The images must be α-major, as QwenImageSampleFromEmbeds makes them.")
    CATEGORY = "Qwen Identity"
    FUNCTION = "grid"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("grid", "metadata")
    OUTPUT_TOOLTIPS = ("One image: the labelled grid.", "JSON: α list, seeds, cell positions and labels.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "len(alphas) × len(seeds) images, α-major (from "
                           "QwenImageSampleFromEmbeds)."}),
                "alphas": ("STRING", {"default": "0.5,1.0,1.5", "tooltip": "The α list, comma-separated (connect "
                           "InjectResidual's alphas output)."}),
                "seeds": ("STRING", {"default": DEFAULT_SEEDS, "tooltip": "The seed list, comma-separated (connect "
                          "QwenImageSampleFromEmbeds' seeds output)."}),
            },
            "optional": {
                "cell_notes": ("STRING", {"default": "", "multiline": True, "tooltip": "Optional text under each "
                               "cell, one line per image in α-major order (e.g. identity scores). Empty = none."}),
                "rows": (list(GRID_ROWS), {"default": "alphas", "tooltip": "alphas: one row per α. The other "
                         "choices label the rows of QwenImageSampleFromEmbeds with reference_images: set the same "
                         "choice as its reference_rows (compare = 'references only', then 'head α=…' rows, then "
                         "'both α=…' rows)."}),
                "reference": ("IMAGE", {"tooltip": "Optional photos of the person: each cell's face distance to them "
                              "is written under it ('d=0.31'; below 0.6 = same person for dlib's face model; 'no face' "
                              "when none is found), after any cell_notes. Needs dlib-bin + face_recognition_models."}),
            },
        }

    def grid(self, images, alphas, seeds, cell_notes="", reference=None, rows="alphas"):
        alpha_list, seed_list = parse_alphas(alphas), parse_seeds(seeds)
        labels = None
        if rows != "alphas":   # reference images beside the head: the rows comparison_rows samples
            alpha_list, labels = comparison_labels(rows, alpha_list)
        notes = None
        if (cell_notes or "").strip():
            notes = cell_notes.splitlines()
            if len(notes) != images.shape[0]:
                raise UserInputError(f"cell_notes has {len(notes)} lines for {images.shape[0]} images: give one line "
                                     "per image, α-major.")
        extra = None
        if reference is not None:  # identity score per cell (see ScoreIdentity)
            scored = score_identity(comfy_to_pil(images), comfy_to_pil(reference))
            notes = scored["notes"] if notes is None else [f"{a} {b}".strip() for a, b in zip(notes, scored["notes"])]
            extra = {"identity_scores": scored["summary"], "cell_scores": scored["notes"]}
        g = make_grid(comfy_to_pil(images), alpha_list, seed_list, cell_notes=notes, extra_meta=extra,
                      row_labels=labels)
        return (pil_to_comfy([g.image]), json.dumps(g.meta, ensure_ascii=False))


NODE_CLASS_MAPPINGS = {"AlphaGrid": AlphaGrid}
NODE_DISPLAY_NAME_MAPPINGS = {"AlphaGrid": "Alpha × Seed Grid (Qwen Identity)"}
