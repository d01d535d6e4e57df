"""Default models and prompts of the offline pipeline (CLI, training, demo, bench).

The seed's prompts and sampling settings are kept; its model ids are not (it named Qwen2-VL-7B for the
features and Qwen2.5-7B-Instruct for generation): features come from Qwen3-VL, images from Qwen-Image.
No imports, so any module (also `core.generation.sampling`) can take its defaults from here.
"""

DEFAULT_QWEN3_VL = "Qwen/Qwen3-VL-2B-Instruct"
DEFAULT_QWEN_IMAGE = "Qwen/Qwen-Image"
DEFAULT_BASE_PROMPT = "a portrait photo of a person, studio lighting, 85mm"
DEFAULT_NEGATIVE_PROMPT = "blurry, low quality, deformed, watermark"
DEFAULT_ALPHAS = "0.5,1.0,1.5"
