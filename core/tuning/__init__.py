"""Personal identity heads: tune a residual head on one person's photos through a frozen denoiser.

Plain torch (no ComfyUI): the CLI (`qwen-identity tune`) and the ComfyUI node call `tune_head` with the
photos already encoded (latents, Qwen3-VL features, prompt embeddings) and a Denoiser from the model
family's adapter, so adding a model family never touches this package.
"""

from .data import PersonalData
from .options import SCHEDULES, TuneOptions
from .tune import TuneResult, tune_head

__all__ = ["PersonalData", "TuneOptions", "TuneResult", "tune_head", "SCHEDULES"]
