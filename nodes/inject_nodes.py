"""InjectResidual and QwenImageTextEncodeDiffusers: thin ComfyUI adapters over core.injection / core.sampling."""

from __future__ import annotations

import logging

from ..core.residual.injection import DEFAULT_MODE, MODES, format_alphas, inject_identity, parse_alphas

CATEGORY = "Qwen Identity"
log = logging.getLogger(__name__)


class InjectResidual:
    DESCRIPTION = ("Adds a person's identity to Qwen-Image prompt embeddings: E + α·R, R = the head's residual for "
                   "the identity features, spread over the prompt's tokens (padding untouched). Works on ComfyUI's "
                   "own CONDITIONING (CLIPTextEncode with Qwen-Image's text encoder) and on "
                   "QwenImageTextEncodeDiffusers. Connect it to the negative instead to push away from a person. "
                   "An alphas list gives one batched conditioning (α-major) for α sweeps.")
    CATEGORY = CATEGORY
    FUNCTION = "inject"
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "alphas")
    OUTPUT_TOOLTIPS = ("The conditioning with the identity added (batched α-major when several α are given; split "
                       "into step windows with start_percent/end_percent when start_at/end_at are set).",
                       "The α values used, comma-separated (connect to AlphaGrid).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "Qwen-Image prompt embeddings: the positive (or the "
                                 "negative, to push away from this person)."}),
                "head": ("QWEN_IDENTITY_HEAD", {"tooltip": "The residual head from LoadResidualHead."}),
                "identity": ("IDENTITY_FEATURES", {"tooltip": "The person's features from ExtractIdentityFeatures."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05, "tooltip": "α: how "
                             "much of the residual is added. 1 = what the head was trained to produce (absolute "
                             "mode); 0 = no change. Ignored when alphas is filled in."}),
                "alphas": ("STRING", {"default": "", "tooltip": "Optional comma-separated α list, e.g. "
                           "'0,0.5,1,1.5': one conditioning batch item per α (α-major) for a sweep. Empty = use "
                           "strength."}),
                "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction "
                             "of the sampling steps at which the identity starts (0 = from the first step). The "
                             "original prompt is used outside [start_at, end_at]."}),
                "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of "
                           "the sampling steps at which the identity stops (1 = to the last step)."}),
                "strength_mode": (list(MODES), {"default": DEFAULT_MODE, "tooltip": "absolute (default): α scales "
                                  "the head's residual as trained. relative: the residual is scaled by each token's "
                                  "RMS (Qwen-Image RMS-normalises text tokens), so α acts the same on prompts whose "
                                  "token norms differ."}),
            },
        }

    def inject(self, conditioning, head, identity, strength=1.0, alphas="", start_at=0.0, end_at=1.0,
               strength_mode=DEFAULT_MODE):
        values = parse_alphas(alphas) if (alphas or "").strip() else [float(strength)]
        out, warnings = inject_identity(conditioning, head, identity, values, float(start_at), float(end_at),
                                        strength_mode)
        for w in warnings:
            log.warning("InjectResidual: %s", w)
        return (out, format_alphas(values))


class QwenImageTextEncodeDiffusers:
    DESCRIPTION = ("Encodes a prompt with the diffusers Qwen-Image pipeline's own text encoder into ComfyUI's "
                   "CONDITIONING layout (the same as CLIPTextEncode with Qwen-Image), for InjectResidual and "
                   "QwenImageSampleFromEmbeds. A good negative prompt: 'blurry, low quality, deformed, watermark'.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Prompt embeddings [1, S, H] (S = prompt tokens + 5), no mask when nothing is padded.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": ("QWEN_IMAGE_PIPELINE", {"tooltip": "The pipeline from LoadQwenImageDiffusers."}),
                "text": ("STRING", {"multiline": True, "default": "a portrait photo of a person, studio lighting, "
                         "85mm", "tooltip": "The prompt (Qwen-Image's chat template is applied for you)."}),
            },
        }

    def encode(self, pipeline, text):
        from ..core.generation.reference_rows import PROMPT_KEY
        from ..core.generation.sampling import encode_text

        cond = encode_text(pipeline, text)
        cond[0][1][PROMPT_KEY] = text   # QwenImageSampleFromEmbeds' reference_images read the prompt again
        return (cond,)


NODE_CLASS_MAPPINGS = {"InjectResidual": InjectResidual, "QwenImageTextEncodeDiffusers": QwenImageTextEncodeDiffusers}
NODE_DISPLAY_NAME_MAPPINGS = {"InjectResidual": "Inject Identity Residual (Qwen Identity)",
                              "QwenImageTextEncodeDiffusers": "Qwen-Image Text Encode (diffusers)"}
