"""LoadQwenImageDiffusers and QwenImageSampleFromEmbeds: thin ComfyUI adapters over core.sampling.

QwenImageSampleFromEmbeds runs on either a diffusers pipeline (our own loop, `core/generation/sampling.py`) or
ComfyUI's native Qwen-Image MODEL + VAE (delegated to `nodes/native_sampling.sample_native`, ComfyUI's
sampler API).
"""

from __future__ import annotations

import torch

from ..core.runtime.devices import DEVICE_CHOICES, DTYPE_CHOICES
from ..core.errors import UserInputError
from ..core.generation.sampling import (DEFAULT_CFG, DEFAULT_HEIGHT, DEFAULT_MAX_BATCH, DEFAULT_SEEDS, DEFAULT_STEPS,
                             DEFAULT_WIDTH, OFFLOAD_CHOICES, QwenImageBundle, check_size, parse_seeds)
from ..core.generation.reference_rows import ROW_CHOICES as REFERENCE_ROW_CHOICES
from .comfy_runtime import comfy_progress, model_management
from ..core.runtime.model_folders import NO_FOLDER, chosen_model_source, list_model_folders, model_dirs

CATEGORY = "Qwen Identity"
DEFAULT_SAMPLER, DEFAULT_SCHEDULER = "euler", "simple"
MAX_BATCH_AUTO = 0  # the widget value "auto": the native path asks ComfyUI's memory estimate, the diffusers path uses 4


def _progress_and_interrupt():
    """(progress, interrupt) for core.sampling: ComfyUI's progress bar and Cancel button, or (None, None)."""
    mm = model_management()
    if mm is None:
        return None, None
    return comfy_progress(1), mm.throw_exception_if_processing_interrupted


def _sampler_choices() -> tuple[list[str], list[str]]:
    try:
        import comfy.samplers  # type: ignore[import-not-found]

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:
        return [DEFAULT_SAMPLER], [DEFAULT_SCHEDULER]


class LoadQwenImageDiffusers:
    DESCRIPTION = ("Loads a diffusers Qwen-Image pipeline (transformer, VAE, text encoder, scheduler) from "
                   "ComfyUI/models/diffusers/<name>/ (a hub folder with model_index.json), a path, or a hub id, "
                   "for QwenImageTextEncodeDiffusers and QwenImageSampleFromEmbeds.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("QWEN_IMAGE_PIPELINE",)
    RETURN_NAMES = ("pipeline",)
    OUTPUT_TOOLTIPS = ("The loaded diffusers QwenImagePipeline and its device/dtype.",)

    @classmethod
    def INPUT_TYPES(cls):
        folders = list_model_folders("diffusers") or [NO_FOLDER]
        return {
            "required": {
                "model": (folders, {"tooltip": "A Qwen-Image pipeline folder in ComfyUI/models/diffusers/. Ignored "
                                               "when model_path is filled in."}),
                "model_path": ("STRING", {"default": "", "tooltip": "Optional: a folder path or a hub id such as "
                               "Qwen/Qwen-Image (downloaded into models/diffusers/ when online). Wins over the "
                               "dropdown when not empty. Refused when the server's owner set the security "
                               "level to strong."}),
                "dtype": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": "Weights precision. auto = bf16 on GPUs "
                          "that support it, fp16 on other GPUs, fp32 on CPU."}),
                "device": (list(DEVICE_CHOICES), {"default": "auto", "tooltip": "Where sampling runs. auto = "
                           "ComfyUI's device (GPU unless started with --cpu)."}),
                "offload": (list(OFFLOAD_CHOICES), {"default": "none", "tooltip": "none: everything on the device "
                            "(fastest; Qwen-Image needs ~58 GB in bf16). model_cpu_offload: each component moves to "
                            "the GPU only while it runs. group: blocks streamed from pinned CPU memory with "
                            "prefetch (fits 24 GB without precision loss, ~22 s/image on an H100). sequential: "
                            "layer by layer (least VRAM, slowest). Offload needs a CUDA GPU."}),
            },
            "optional": {
                "hf_token": ("STRING", {"default": "", "tooltip": "Hugging Face token for gated/private hub ids "
                             "(else HUGGINGFACE_TOKEN / HF_TOKEN). Not stored in outputs."}),
                "fp8_storage": ("BOOLEAN", {"default": False, "tooltip": "Keep the transformer's weights in fp8 and "
                                "compute in dtype: half the memory (the 20B transformer in ~20 GB), some precision "
                                "lost. With offload model_cpu_offload or group it is the way onto a 24 GB card."}),
            },
        }

    def load(self, model, model_path="", dtype="auto", device="auto", offload="none", hf_token="", fp8_storage=False,
             **kwargs):
        from ..core.generation.sampling import load_qwen_image_pipeline

        source = chosen_model_source(
            model, model_path, "diffusers", "Qwen-Image pipeline folder", placeholder=NO_FOLDER,
            no_choice="no Qwen-Image pipeline chosen: put a diffusers Qwen-Image folder (with model_index.json) in "
                      "ComfyUI/models/diffusers/ or type a path / hub id (e.g. Qwen/Qwen-Image) in model_path.")
        dirs = model_dirs("diffusers")
        mm = model_management()
        if mm is not None and device == "auto":
            device = mm.get_torch_device()
        bundle = load_qwen_image_pipeline(source, device=device, dtype=dtype, offload=offload,
                                          search_dirs=dirs, token=(hf_token or "").strip() or None,
                                          fp8_storage=bool(fp8_storage))
        return (bundle,)


class QwenImageSampleFromEmbeds:
    DESCRIPTION = ("Samples Qwen-Image from positive and negative CONDITIONING (e.g. from InjectResidual) for every "
                   "conditioning batch item × every seed, α-major: item 0 with each seed, then item 1, ... Connect "
                   "either a diffusers pipeline (LoadQwenImageDiffusers) or ComfyUI's native Qwen-Image MODEL and "
                   "VAE (fp8, GGUF and LoRA-patched models work). Good settings: steps 28, cfg 4.5, 768x512, "
                   "negative prompt 'blurry, low quality, deformed, watermark'. The diffusers path always uses "
                   "Qwen-Image's true CFG (diffusers' per-token norm rescale); the native path uses ComfyUI's CFG "
                   "unless true_cfg_norm is on.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "seeds")
    OUTPUT_TOOLTIPS = ("The images, α-major (for each conditioning item, for each seed); with reference_images, "
                       "row group after row group (see reference_rows).",
                       "The seeds used, comma-separated (connect to AlphaGrid).")

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _sampler_choices()
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "The prompt embeddings (a batch from an alphas list gives "
                             "one row of images per item)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt's embeddings (e.g. 'blurry, low "
                             "quality, deformed, watermark'); one item, or one per positive item."}),
                "seeds": ("STRING", {"default": DEFAULT_SEEDS, "tooltip": "Comma-separated generation seeds; each "
                          "seed gives the same image alone or in a batch."}),
                "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 200, "tooltip": "Denoising steps."}),
                "cfg": ("FLOAT", {"default": DEFAULT_CFG, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "Classifier-"
                        "free guidance scale (<= 1 turns CFG off and ignores the negative). Diffusers path: true "
                        "CFG with diffusers' norm rescale; native path: see true_cfg_norm."}),
                "width": ("INT", {"default": DEFAULT_WIDTH, "min": 16, "max": 4096, "step": 16, "tooltip": "Image "
                          "width, a multiple of 16."}),
                "height": ("INT", {"default": DEFAULT_HEIGHT, "min": 16, "max": 4096, "step": 16, "tooltip": "Image "
                           "height, a multiple of 16."}),
                "max_batch": ("INT", {"default": MAX_BATCH_AUTO, "min": 0, "max": 64, "tooltip": "Most images "
                              "denoised together (each costs two transformer rows with CFG), split evenly (a 3x3 "
                              "grid at 4 runs 3+3+3). 0 = auto: the native path batches as many as ComfyUI's memory "
                              "estimate allows (a 3x3 grid in ONE sampler call, like ComfyUI's own batched "
                              f"sampling), the diffusers path {DEFAULT_MAX_BATCH}. Higher is faster until memory runs "
                              "out."}),
            },
            "optional": {
                "pipeline": ("QWEN_IMAGE_PIPELINE", {"tooltip": "Diffusers path: the pipeline from "
                             "LoadQwenImageDiffusers. Leave empty to use model + vae."}),
                "model": ("MODEL", {"tooltip": "Native path: Qwen-Image from ComfyUI's own loaders (UNETLoader, GGUF, "
                          "LoRA ...). Needs vae too."}),
                "vae": ("VAE", {"tooltip": "Native path: the Qwen-Image VAE from ComfyUI's VAELoader."}),
                "sampler_name": (samplers, {"default": DEFAULT_SAMPLER, "tooltip": "Native path only: ComfyUI "
                                 "sampler."}),
                "scheduler": (schedulers, {"default": DEFAULT_SCHEDULER, "tooltip": "Native path only: ComfyUI "
                              "scheduler."}),
                "speed": (["standard", "fast"], {"default": "standard", "tooltip": "On a CUDA GPU, 'fast' "
                          "compiles the transformer blocks (the first run of each size pays tens of seconds of "
                          "compilation). Diffusers path: compiled blocks plus CUDA graphs (about 3x faster than "
                          "stock diffusers on an H100). Native path: what QwenImageAccelerate does (inductor, "
                          "regional compile through ComfyUI's hooks, eager when the model is only partly loaded). "
                          "Ignored on CPU/MPS."}),
                "true_cfg_norm": ("BOOLEAN", {"default": False, "tooltip": "Native path: use the seed's true CFG "
                                  "(as diffusers' QwenImagePipeline and the diffusers path: the guided prediction "
                                  "rescaled per token to the conditional one's norm) instead of ComfyUI's plain CFG. "
                                  "Off: the same image as ComfyUI's KSampler. The diffusers path always rescales."}),
                "reference_images": ("IMAGE", {"tooltip": "Diffusers path, Qwen-Image 2.1 only: photos of the person "
                                     "(up to 10), given to Qwen-Image 2.1 as its own reference images as well, "
                                     "to compare with the head (see reference_rows). The prompts must come from "
                                     "QwenImageTextEncodeDiffusers (they are read again with the photos) and the "
                                     "positive through InjectResidual. Refused on Qwen-Image 1.x."}),
                "reference_rows": (list(REFERENCE_ROW_CHOICES), {"default": "compare", "tooltip": "With "
                                   "reference_images, which rows to sample for the same seeds: compare = a "
                                   "'references only' row, then one 'head' row per α (no references), then one "
                                   "'both' row per α (references plus the head); or only one of them. Rows come "
                                   "out in that order; set AlphaGrid's rows to the same choice."}),
            },
        }

    def sample(self, positive, negative, seeds=DEFAULT_SEEDS, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG,
               width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, max_batch=MAX_BATCH_AUTO, pipeline=None, model=None,
               vae=None, sampler_name=DEFAULT_SAMPLER, scheduler=DEFAULT_SCHEDULER, speed="standard",
               true_cfg_norm=False, reference_images=None, reference_rows="compare", **kwargs):
        seed_list = parse_seeds(seeds)
        max_batch = int(max_batch)
        if max_batch < 0:
            raise UserInputError(f"max_batch={max_batch}: use 0 (auto) or the most images to denoise together.")
        check_size(width, height)
        seeds_text = ",".join(map(str, seed_list))
        if pipeline is not None and (model is not None or vae is not None):
            raise UserInputError("connect either a diffusers pipeline or a native MODEL + VAE, not both.")
        if pipeline is not None:
            if not isinstance(pipeline, QwenImageBundle):
                raise UserInputError("the pipeline input must come from LoadQwenImageDiffusers.")
            from ..core.generation.acceleration import speed_options
            from ..core.generation.sampling import sample

            progress, interrupt = _progress_and_interrupt()

            def run(pos, neg):
                return sample(pipeline, pos, neg, seed_list, steps=int(steps), cfg=float(cfg), width=int(width),
                              height=int(height), max_batch=max_batch or DEFAULT_MAX_BATCH, progress=progress,
                              interrupt=interrupt, **speed_options(pipeline, speed == "fast")).images

            if reference_images is None:
                return (run(positive, negative), seeds_text)
            images, _labels = sample_with_references(pipeline, run, positive, negative, reference_images,
                                                     reference_rows, guided=float(cfg) > 1.0)
            return (images, seeds_text)
        if reference_images is not None:
            raise UserInputError("reference_images work on the diffusers path only (a Qwen-Image 2.1 pipeline from "
                                 "LoadQwenImageDiffusers); on the native path give the photos to ComfyUI's "
                                 "TextEncodeQwenImage21 instead.")
        if model is None or vae is None:
            raise UserInputError("nothing to sample with: connect a pipeline (LoadQwenImageDiffusers), or both a "
                                 "native Qwen-Image MODEL and its VAE.")
        try:
            from .native_sampling import sample_native
        except ImportError:
            raise UserInputError("the native MODEL + VAE path is not available in this version of the pack "
                                 "(nodes/native_sampling.py is missing); use the diffusers pipeline input.") from None
        model = native_model_options(model, fast=speed == "fast", true_cfg=bool(true_cfg_norm))
        progress, _ = _progress_and_interrupt()
        images = sample_native(model, vae, positive, negative, seed_list, int(steps), float(cfg), int(width),
                               int(height), sampler_name, scheduler, progress=progress, max_batch=max_batch or None)
        if not isinstance(images, torch.Tensor):
            raise UserInputError("the native sampler returned no IMAGE tensor.")
        return (images, seeds_text)


def _prompt_of(conditioning, side: str) -> str:
    from ..core.generation.reference_rows import PROMPT_KEY

    texts = {item[1].get(PROMPT_KEY) for item in conditioning if isinstance(item, (list, tuple)) and len(item) > 1}
    if len(texts) != 1 or None in texts:
        raise UserInputError(f"reference_images: the {side} conditioning must come from ONE "
                             "QwenImageTextEncodeDiffusers node (its prompt is read again together with the photos).")
    return texts.pop()


def sample_with_references(pipeline, run, positive, negative, reference_images, rows: str, guided: bool):
    """(images, row labels): `core.generation.reference_rows.comparison_rows` (what `qwen-identity sweep
    --references compare` runs) with the node's inputs: the prompts' texts recorded by
    QwenImageTextEncodeDiffusers, the residual re-added as InjectResidual recorded it."""
    from ..core.files.images import comfy_to_pil
    from ..core.generation.reference_rows import comparison_rows, row_groups
    from ..core.generation.sampling import encode_text
    from ..core.residual.injection import recorded_injections, reinject

    groups = row_groups(rows)
    photos = comfy_to_pil(reference_images)
    alphas = []
    if "head" in groups or "both" in groups:
        recipes = recorded_injections(positive)
        if len(recipes) != 1:
            raise UserInputError("reference_images: the positive went through InjectResidual more than once; "
                                 "compare rows take one residual.")
        alphas = recipes[0]["alphas"]

    def encode_with_references():
        pos = encode_text(pipeline, _prompt_of(positive, "positive"), references=photos)
        neg = encode_text(pipeline, _prompt_of(negative, "negative"), references=photos) if guided else negative
        return pos, neg

    images, _, labels = comparison_rows(run, positive, negative, encode_with_references,
                                        lambda cond: reinject(positive, cond), alphas, rows)
    return images, labels


def native_model_options(model, fast: bool, true_cfg: bool):
    """The native path's MODEL with the node's options applied through ComfyUI's hooks (clones; the input
    MODEL is never changed): speed "fast" on a CUDA device = QwenImageAccelerate's defaults, true_cfg_norm =
    QwenImageTrueCFG."""
    from .native_acceleration import accelerate, acceleration_state, set_true_cfg

    device = getattr(model, "load_device", None)
    if fast and getattr(device, "type", None) == "cuda" and acceleration_state(model) is None:
        model = accelerate(model)
    if true_cfg:
        model = set_true_cfg(model)
    return model


NODE_CLASS_MAPPINGS = {"LoadQwenImageDiffusers": LoadQwenImageDiffusers,
                       "QwenImageSampleFromEmbeds": QwenImageSampleFromEmbeds}
NODE_DISPLAY_NAME_MAPPINGS = {"LoadQwenImageDiffusers": "Load Qwen-Image (diffusers)",
                              "QwenImageSampleFromEmbeds": "Qwen-Image Sample From Embeds (Qwen Identity)"}
