"""TrainIdentityHead: a personal identity head from a few photos, trained through ComfyUI's own Qwen-Image.

The node is an adapter: it turns its inputs into the core's `PersonalData` (Qwen3-VL features of each
photo, each photo's latent from ComfyUI's VAE, the prompt embeddings of the CONDITIONING), builds the
Denoiser over the MODEL as ComfyUI loaded it (nodes/comfy_training.py) and calls `core.tuning.tune_head`,
the loop the CLI runs too. Order of work on the GPU: Qwen3-VL extracts the features first and is then
moved off the GPU, the VAE encodes, and only then does ComfyUI load the transformer for training.

ComfyUI conventions: a ProgressBar step per training step; the Cancel button stops training after the
current step, the best head so far is kept (written when a file name is given, atomically) and the prompt
then ends as ComfyUI's interrupt does; a re-queue with the same inputs is answered from ComfyUI's cache
without training again; the saved head appears in LoadResidualHead's list after a refresh.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from PIL import Image

from ..core.denoising.aspect_buckets import bucket_list, nearest_bucket
from ..core.denoising.latent_cache import NO_FACE, Resolution, crop_to, face_box
from ..core.errors import ModelMismatchError, UserInputError
from ..core.files.images import comfy_to_pil
from ..core.identity.face_crop import CROP_FALLBACKS, CROP_HELP, CROPS, DEFAULT_CROP, DEFAULT_CROP_FALLBACK, FALLBACK_HELP
from ..core.identity.features import FeatureSettings, extract_features, prepare_photos, settings_from_meta
from ..core.identity.qwen3vl import Qwen3VLBundle
from ..core.measurement.loss_curve import draw_loss_chart, per_index
from ..core.residual.head import ResidualHead, check_head_family, describe_feature_width, save_head
from ..core.runtime.model_folders import model_dirs
from .comfy_runtime import ensure_on_device, model_management
from .comfy_training import (check_qwen_image_model, comfy_model_family, conditioning_embeds, encode_photos,
                             training_denoiser)

log = logging.getLogger(__name__)
CATEGORY = "Qwen Identity"
HEAD_SUFFIX = ".safetensors"
# The recipe of `qwen-identity tune` (training/personal.py), so the node and the CLI make the same head:
DEFAULT_STEPS = 200
DEFAULT_LR = 1e-3
DEFAULT_RESOLUTION = "768x512"    # WxH: the pixel budget of the aspect buckets
FACE_WEIGHT = 2.0                 # loss weight inside the face box (1 outside); unweighted where no face is found


def parse_resolution(text: str) -> Resolution:
    try:
        return Resolution.parse(text)
    except UserInputError:
        raise UserInputError(f"resolution {text!r}: give WIDTHxHEIGHT with both sides multiples of 16, e.g. "
                             "768x512 or 512x512") from None


def photos_in_buckets(photos: list[Image.Image], res: Resolution) -> list[Image.Image]:
    """Each photo scaled to cover the aspect bucket nearest its shape (about res's pixel count) and
    centre-cropped, as `qwen-identity tune` does; a photo smaller than its bucket is upscaled."""
    buckets = bucket_list(res.width, res.height)
    out = []
    for i, im in enumerate(photos):
        size = Resolution(*nearest_bucket(im.width, im.height, buckets))
        if im.width < size.width or im.height < size.height:
            log.warning("TrainIdentityHead: photo %d is %dx%d, smaller than its training size %s: upscaled "
                        "(a lower resolution gives sharper targets)", i + 1, im.width, im.height, size)
        out.append(crop_to(im, size, f"photo {i + 1}", allow_upscale=True))
    return out


def pixels_of(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] float in 0..1."""
    arr = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return (arr.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0)[None]


def face_map(box, image_size: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """A [1, h, w] map at the latent's size, 1 inside the face box (photo pixels), or None without a face."""
    if box is None or tuple(box) == NO_FACE:
        return None
    (w_img, h_img), (h, w) = image_size, latent_hw
    left, top, right, bottom = (float(b) for b in box)
    sy, sx = h / h_img, w / w_img
    r0, r1 = max(0, int(math.floor(top * sy))), min(h, int(math.ceil(bottom * sy)))
    c0, c1 = max(0, int(math.floor(left * sx))), min(w, int(math.ceil(right * sx)))
    if r1 <= r0 or c1 <= c0:
        return None
    m = torch.zeros(1, h, w)
    m[:, r0:r1, c0:c1] = 1.0
    return m


def face_maps_of(images: list[Image.Image], latents: list[torch.Tensor]) -> list[torch.Tensor | None] | None:
    """Face maps of the training crops (dlib, as `qwen-identity tune`); None when dlib is not installed."""
    try:
        from ..core.measurement.face_similarity import FaceEmbedder

        embedder = FaceEmbedder(detector="hog")
    except UserInputError as e:
        log.warning("TrainIdentityHead: no face weighting (%s)", e)
        return None
    maps = [face_map(face_box(embedder, im), im.size, tuple(lat.shape[-2:])) for im, lat in zip(images, latents)]
    for i, m in enumerate(maps):
        if m is None:
            log.warning("TrainIdentityHead: no face found in photo %d: its loss is not face-weighted", i + 1)
    return maps


def head_file_for(save_name: str) -> Path | None:
    """The file in models/identity_heads/ that `save_name` names (None when empty); a path is refused."""
    name = (save_name or "").strip()
    if not name:
        return None
    if "/" in name or "\\" in name or name in (".", "..") or "\x00" in name or ":" in name:
        raise UserInputError(f"save_name {name!r} must be a plain file name such as 'anna' (saved into "
                             "models/identity_heads/); folders and paths are not allowed.")
    if not name.endswith(HEAD_SUFFIX):
        name += HEAD_SUFFIX
    dirs = model_dirs("identity_heads")
    if not dirs:
        raise UserInputError("no identity_heads model folder is registered, so save_name cannot be used; "
                             "leave save_name empty or run the node inside ComfyUI.")
    return Path(dirs[0]) / name


def loss_curve_image(history: list[float], evals: list[dict], size=(640, 400)) -> torch.Tensor:
    """The training loss per step and the held-out loss per evaluation as an IMAGE [1, H, W, 3]."""
    series = {"training loss": per_index(history),
              "held-out loss": [(e["step"], e.get("held_out_loss")) for e in evals]}
    img = draw_loss_chart(series, "personal head tuning", xlabel="step", size=size)
    w, h = size
    arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return (arr.float() / 255.0).unsqueeze(0)


def leave_gpu(bundle: Qwen3VLBundle) -> None:
    """Move Qwen3-VL off the GPU (whatever keep_loaded says) so the transformer gets the memory for training;
    ExtractIdentityFeatures moves it back when it next runs."""
    try:
        current = next(bundle.model.parameters()).device
    except StopIteration:
        return
    if current.type == "cpu":
        return
    bundle.model.to("cpu")
    mm = model_management()
    if mm is not None:
        mm.soft_empty_cache()
    elif current.type == "cuda":
        torch.cuda.empty_cache()


def photo_features(bundle: Qwen3VLBundle, photos: list[Image.Image], settings: FeatureSettings,
                   names: list[str]):
    """Per-photo Qwen3-VL features [N, D] (unit norm) and their metadata; the model leaves the GPU afterwards."""
    seen, crops = prepare_photos(photos, settings, bundle.patch_multiple, names=names)
    ensure_on_device(bundle)
    try:
        feats = extract_features(bundle, photos, settings, prepared=seen, crops=crops, names=names)
    finally:
        leave_gpu(bundle)
    return feats.per_image.float().cpu(), feats.meta


def check_init_head(init_head, feature_dim: int, text_width: int) -> None:
    if init_head is None:
        return
    if not isinstance(init_head, ResidualHead):
        raise UserInputError("the init_head input must come from LoadResidualHead (or another TrainIdentityHead).")
    if init_head.hidden_size != text_width:
        raise ModelMismatchError(
            f"the init head writes residuals {init_head.hidden_size} wide but this Qwen-Image model's text input is "
            f"{text_width} wide: start from a head made for this model, or from zero (leave init_head unconnected).")
    if init_head.feature_dim != feature_dim:
        raise ModelMismatchError(
            f"the init head takes features of width {init_head.feature_dim} "
            f"({describe_feature_width(init_head.feature_dim)}) but the Qwen3-VL model gives {feature_dim} "
            f"({describe_feature_width(feature_dim)}): load the Qwen3-VL the head was trained with, or start from zero.")


class TrainIdentityHead:
    DESCRIPTION = ("Trains a personal identity head on a few photos of one person, through the Qwen-Image model "
                   "loaded in this workflow (no extra download). Connect its head to InjectResidual. Keeps the "
                   "head with the lowest loss on a held-out photo (with 3 or more photos).")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("QWEN_IDENTITY_HEAD", "IMAGE")
    RETURN_NAMES = ("head", "loss_curve")
    OUTPUT_TOOLTIPS = ("The trained personal head, for InjectResidual.",
                       "The training loss per step and the held-out loss (orange) as a chart.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The Qwen-Image model from UNETLoader (Load Diffusion Model): bf16 or "
                                    "fp8 weights, with or without a LoRA. It is not changed; the head learns "
                                    "what this model needs to draw the person."}),
                "vae": ("VAE", {"tooltip": "Qwen-Image's VAE (qwen_image_vae.safetensors from VAELoader); encodes "
                                "the photos."}),
                "conditioning": ("CONDITIONING", {"tooltip": "The prompt the person is trained under, from "
                                                  "CLIPTextEncode, e.g. 'a photo of a person'. A plain, "
                                                  "neutral prompt works best."}),
                "photos": ("IMAGE", {"tooltip": "Photos of ONE person (an IMAGE batch, e.g. several LoadImage "
                                     "nodes joined by Batch Images). 3 to 20 is typical; with 3 or more one is "
                                     "held out to choose the best head. One photo works (its mirror image is "
                                     "used as a second view)."}),
                "qwen3vl": ("QWEN3VL", {"tooltip": "The model from LoadQwen3VL; it reads the photos first and then "
                                        "leaves the GPU before training starts."}),
                "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 100000, "tooltip": "Training steps "
                          "(one photo each). 200 is a good start; more photos can take more steps."}),
                "learning_rate": ("FLOAT", {"default": DEFAULT_LR, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                  "round": False, "tooltip": "Adam learning rate (after a short warm-up, "
                                  "decaying to 0). Lower it if the loss curve jumps up."}),
                "tokens": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Identity tokens K the head "
                           "writes. 0 = the start head's K, or 1 when training from zero."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Seed for the "
                         "held-out choice, the photo order and the noise: the same seed and inputs give the same "
                         "head."}),
                "resolution": ("STRING", {"default": DEFAULT_RESOLUTION, "tooltip": "WIDTHxHEIGHT, multiples of "
                               "16: the pixel count photos are trained at. Each photo keeps its aspect (the "
                               "nearest of 9 shapes from 2:1 to 1:2 at about this many pixels, centre-cropped). "
                               "512x512 is fast; 1024x1024 shows more detail and needs more memory."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute each block in "
                                           "the backward pass instead of keeping its activations: much less memory "
                                           "(turn on for 24 GB cards or fp8 weights loaded partially), about a "
                                           "third slower."}),
            },
            "optional": {
                "init_head": ("QWEN_IDENTITY_HEAD", {"tooltip": "Optional: a head to start from (e.g. a universal "
                              "head from LoadResidualHead); reaches a likeness in fewer steps. Unconnected: start "
                              "from zero."}),
                "save_name": ("STRING", {"default": "", "tooltip": "Optional: a file name (no folders) to save the "
                              "head as in models/identity_heads/, e.g. 'anna'. It then appears in "
                              "LoadResidualHead's list after a refresh. An existing file of that name is replaced. "
                              "Empty = not saved."}),
                "crop": (list(CROPS), {"default": DEFAULT_CROP, "tooltip": "Which part of each photo Qwen3-VL sees. "
                         + CROP_HELP + " Ignored when init_head is connected: its crop is used."}),
                "crop_fallback": (list(CROP_FALLBACKS), {"default": DEFAULT_CROP_FALLBACK, "tooltip": FALLBACK_HELP}),
            },
        }

    def train(self, model, vae, conditioning, photos, qwen3vl, steps=DEFAULT_STEPS, learning_rate=DEFAULT_LR,
              tokens=0, seed=0, resolution=DEFAULT_RESOLUTION, gradient_checkpointing=False, init_head=None,
              save_name="", crop=DEFAULT_CROP, crop_fallback=DEFAULT_CROP_FALLBACK):
        from ..core.tuning import PersonalData, TuneOptions, tune_head

        if isinstance(steps, bool) or int(steps) < 1:
            raise UserInputError(f"steps must be at least 1 (got {steps}); 200 is a good start.")
        if not isinstance(qwen3vl, Qwen3VLBundle):
            raise UserInputError("the qwen3vl input must come from LoadQwen3VL.")
        target = head_file_for(save_name)
        width = check_qwen_image_model(model)
        family = comfy_model_family(model)
        embeds, mask = conditioning_embeds(conditioning)
        if embeds.shape[-1] != width:
            raise ModelMismatchError(
                f"the conditioning is {embeds.shape[-1]} wide but the model's text input is {width} wide: encode the "
                f"prompt with this Qwen-Image's text encoder (CLIPLoader type qwen_image)")
        if init_head is not None and not isinstance(init_head, ResidualHead):
            raise UserInputError("the init_head input must come from LoadResidualHead (or another TrainIdentityHead).")
        res = parse_resolution(resolution)
        options = TuneOptions(steps=int(steps), lr=float(learning_rate), tokens=int(tokens) or None, seed=int(seed),
                              face_weight=FACE_WEIGHT)
        options.validate()

        pil = comfy_to_pil(photos)
        names = [f"photo {i + 1}" for i in range(len(pil))]
        sources = list(range(len(pil)))
        if len(pil) == 1:   # one photo: its mirror image is the "other view" the head is conditioned on
            pil = [pil[0], pil[0].transpose(Image.FLIP_LEFT_RIGHT)]
            names, sources = ["photo 1", "photo 1 (mirrored)"], [0, 0]
        settings = FeatureSettings(crop=crop, crop_fallback=crop_fallback)
        if init_head is not None and init_head.meta.feature_settings:
            settings = settings_from_meta(init_head.meta.feature_settings)
        features, feature_meta = photo_features(qwen3vl, pil, settings, names)
        check_init_head(init_head, int(features.shape[-1]), width)
        if init_head is not None:
            check_head_family(init_head, family)
        crops = photos_in_buckets(pil, res)
        latents = [encode_photos(vae, model, pixels_of(im))[0] for im in crops]
        data = PersonalData(latents=latents, features=features, embeds=[embeds] * len(pil),
                            masks=[mask] * len(pil), face_maps=face_maps_of(crops, latents), names=names,
                            sources=sources)

        mm = model_management()
        bar = None
        if mm is not None:
            import comfy.utils

            bar = comfy.utils.ProgressBar(int(steps))

        def progress(step, total, loss):
            if bar is not None:
                bar.update_absolute(step, total)

        def should_stop():
            return mm is not None and mm.processing_interrupted()

        largest = max(latents, key=lambda x: x.shape[-1] * x.shape[-2])
        with training_denoiser(model, latent_shape=tuple(largest.shape), batch=options.batch_size,
                               gradient_checkpointing=bool(gradient_checkpointing)) as denoiser:
            result = tune_head(data, denoiser, options, init_head=init_head, progress=progress,
                               should_stop=should_stop)
        head = result.head
        head.meta.family = family.name
        head.meta.feature_settings = {k: v for k, v in feature_meta.items()
                                      if k not in ("model_id", "feature_dim", "pack_version")}
        head.meta.qwen3_vl_model = str(feature_meta.get("model_id") or getattr(qwen3vl, "model_id", ""))
        head.meta.training_args.update({"resolution": str(res), "photos": len(set(sources)),
                                        "crop": feature_meta.get("crop"), "trained_in": "ComfyUI",
                                        "gradient_checkpointing": bool(gradient_checkpointing)})
        if target is not None:
            save_head(head, target)      # atomic: the previous file stays whole until the new one is complete
            log.info("TrainIdentityHead: saved %s (best step %s of %s)", target, result.metrics.get("best_step"),
                     result.metrics.get("steps_done"))
        if result.metrics.get("interrupted") and mm is not None:
            mm.throw_exception_if_processing_interrupted()   # end the prompt as ComfyUI's Cancel does
        return (head, loss_curve_image(result.history, result.metrics.get("held_out_evals", [])))


NODE_CLASS_MAPPINGS = {"TrainIdentityHead": TrainIdentityHead}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainIdentityHead": "Train Identity Head (personal, Qwen-Image)"}
