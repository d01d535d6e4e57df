"""Stand-ins for ComfyUI objects the pack must refuse (shared by the training-denoiser and tuning-node tests)."""

from __future__ import annotations


class SD15Model:
    """Stands for comfy.model_base.BaseModel of another family."""

    @staticmethod
    def apply_model(*a, **k):
        raise AssertionError("must not be called")


class NotQwenModel:
    """A ComfyUI-like MODEL of another family (an SD1.5 latent format, no Qwen-Image text input)."""

    model = SD15Model()

    def clone(self):
        return self

    def get_model_object(self, name):
        if name == "latent_format":
            import comfy.latent_formats

            return comfy.latent_formats.SD15()
        raise AttributeError(name)
