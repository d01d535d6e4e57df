"""QwenImageAccelerate and QwenImageTrueCFG: MODEL -> MODEL adapters over nodes/native_acceleration.py.

Both return a clone of ComfyUI's Qwen-Image MODEL with ComfyUI hooks added (an apply_model wrapper, a
sampler CFG function), so KSampler, SamplerCustom and QwenImageSampleFromEmbeds all use them.
"""

from __future__ import annotations

from .native_acceleration import BACKENDS, DYNAMIC, MODES, accelerate, set_true_cfg

CATEGORY = "Qwen Identity"


class QwenImageAccelerate:
    DESCRIPTION = ("Makes ComfyUI's own Qwen-Image MODEL faster: each transformer block is compiled with "
                   "torch.compile (regional: one block's code, reused by all 60) and swapped in only while a "
                   "sampler runs the model, through ComfyUI's apply_model wrapper on a clone. LoRA loaders "
                   "before or after, fp8 weights, size and batch changes and the identity conditioning keep "
                   "working; when ComfyUI loads the model only partly (low VRAM) it runs uncompiled and says "
                   "so in the log. The first run of a size pays the compile (tens of seconds on a GPU).")
    CATEGORY = CATEGORY
    FUNCTION = "accelerate"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model with compiled transformer blocks (a clone; the input is unchanged).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "ComfyUI's Qwen-Image MODEL (UNETLoader, optionally after LoRA "
                          "loaders or ModelSamplingAuraFlow)."}),
                "backend": (list(BACKENDS), {"default": "inductor", "tooltip": "torch.compile backend. inductor: "
                            "fused GPU kernels (the fast one). aot_eager / eager: no code generation, for checking "
                            "that compilation itself is not the problem."}),
                "mode": (list(MODES), {"default": "default", "tooltip": "inductor mode. default: fuses the "
                         "element-wise work between the matrix products. max-autotune-no-cudagraphs: also "
                         "benchmarks kernel choices (longer first run). reduce-overhead: adds CUDA graphs, used "
                         "only when every weight is on the GPU (else the default mode)."}),
                "dynamic": (list(DYNAMIC), {"default": "auto", "tooltip": "Sizes in the compiled code. auto: "
                            "compile for the first size, then once more size-generic when the resolution or batch "
                            "changes (bounded recompiles). static: one compile per size (fastest code, a compile "
                            "for every new size). dynamic: size-generic from the start."}),
            },
        }

    def accelerate(self, model, backend="inductor", mode="default", dynamic="auto", **kwargs):
        return (accelerate(model, backend=backend, mode=mode, dynamic=dynamic),)


class QwenImageTrueCFG:
    DESCRIPTION = ("Gives ComfyUI's Qwen-Image MODEL the true CFG of diffusers' QwenImagePipeline (and of this "
                   "pack's diffusers path): the guided prediction is rescaled, token by token, to the norm of "
                   "the conditional prediction, so a high cfg turns the prediction instead of inflating it. "
                   "Installed through ComfyUI's sampler CFG hook on a clone; any sampler node uses it. At cfg 1 "
                   "nothing changes.")
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model with the true-CFG norm rescale (a clone; the input is unchanged).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "ComfyUI's Qwen-Image MODEL."})}}

    def patch(self, model, **kwargs):
        return (set_true_cfg(model),)


NODE_CLASS_MAPPINGS = {"QwenImageAccelerate": QwenImageAccelerate, "QwenImageTrueCFG": QwenImageTrueCFG}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageAccelerate": "Qwen-Image Accelerate (Qwen Identity)",
                              "QwenImageTrueCFG": "Qwen-Image True CFG (Qwen Identity)"}
