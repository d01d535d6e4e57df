"""ScoreIdentity: how close generated images are to a person's reference photos (a thin adapter over
core.measurement.identity_scores). dlib's face distance always; the Qwen3-VL feature cosine when
a QWEN3VL model is connected.
"""

from __future__ import annotations

import json

from ..core.files.images import comfy_to_pil
from ..core.measurement.face_similarity import DETECTORS, THRESHOLD
from ..core.measurement.identity_scores import score_identity
from .comfy_runtime import comfy_progress, on_device

CATEGORY = "Qwen Identity"
NO_FACE_MEAN = -1.0


class ScoreIdentity:
    DESCRIPTION = ("Scores generated images against reference photos of the person: dlib's face-embedding distance "
                   "(lower = more alike; below the threshold, 0.6, the model calls it the same person), and, with a "
                   "Qwen3-VL model connected, the Qwen3-VL feature cosine. Images without a face are reported, not "
                   "an error. See the pack's docs/measuring.md for what the numbers mean and their limits.")
    CATEGORY = CATEGORY
    FUNCTION = "score"
    RETURN_TYPES = ("STRING", "FLOAT", "STRING")
    RETURN_NAMES = ("scores", "mean_distance", "notes")
    OUTPUT_TOOLTIPS = (
        "JSON: per image its face distance to the references (mean and min), same-person verdict, faces found "
        "with boxes, Qwen3-VL cosine when measured; and a summary (mean distance, same-person rate, diversity).",
        f"Mean face distance over the images that have a face; {NO_FACE_MEAN} when no image (or no reference) has one.",
        "One short line per image ('d=0.31 cos=0.87', or 'no face'), in batch order: feed it to AlphaGrid's "
        "cell_notes to print each cell's score under it.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to score (e.g. the sampler's α×seed batch)."}),
                "reference": ("IMAGE", {"tooltip": "One or more photos of the person (an IMAGE batch). Each image is "
                                        "compared with every reference face; the mean distance is reported."}),
                "threshold": ("FLOAT", {"default": THRESHOLD, "min": 0.05, "max": 2.0, "step": 0.01,
                                        "tooltip": "Same-person threshold on the face distance (default 0.6, the "
                                        "dlib model's operating point; lower = stricter)."}),
                "detector": (list(DETECTORS), {"default": "hog", "tooltip": "Face detector: hog (default; fast on "
                             "CPU, frontal faces) or cnn (finds more poses, seconds per image on CPU)."}),
            },
            "optional": {
                "qwen3vl": ("QWEN3VL", {"tooltip": "Optional: a model from LoadQwen3VL adds the Qwen3-VL feature "
                            "cosine to the references (features: merger_pooled of the face crop; an image without a "
                            "face: its centre crop)."}),
            },
        }

    def score(self, images, reference, threshold=THRESHOLD, detector="hog", qwen3vl=None):
        n = int(images.shape[0]) if hasattr(images, "shape") and images.ndim == 4 else 1
        result = score_identity(comfy_to_pil(images), comfy_to_pil(reference), threshold, detector, qwen3vl,
                                progress=comfy_progress(n), on_device=on_device)
        mean = result["summary"].get("face_distance")
        return (json.dumps(result, indent=2), NO_FACE_MEAN if mean is None else float(mean), "\n".join(result["notes"]))


NODE_CLASS_MAPPINGS = {"ScoreIdentity": ScoreIdentity}
NODE_DISPLAY_NAME_MAPPINGS = {"ScoreIdentity": "Score Identity (face distance)"}
