"""Training through ComfyUI's own Qwen-Image MODEL: the Denoiser contract over a ModelPatcher.

Personal tuning (`core.tuning.tune_head`) needs a Denoiser `denoiser(x_t, σ, embeds, mask) -> v` (the
flow-matching velocity, target noise − x0). The CLI builds one over a diffusers transformer; inside ComfyUI
the model is already loaded by UNETLoader (bf16 or fp8 weights, maybe LoRA-patched, maybe wrapped by other
packs), so this module builds the Denoiser over that MODEL instead of loading a second copy:

- `training_denoiser(model, ...)` (a context manager) clones the ModelPatcher (the user's MODEL is never
  patched: its patches, wrappers and options stay as they were), loads the clone through
  `comfy.model_management.load_models_gpu` (ComfyUI frees other models, applies the LoRA patches, may load
  partially on a small card), freezes the weights (no weight gradients; flags restored afterwards) and sets
  `comfy.model_management.in_training` where the ComfyUI version has it (2026 versions run fused,
  non-differentiable kernels otherwise);
- the call goes through `BaseModel.apply_model`, the public entry KSampler uses, with the transformer options
  (patches, wrappers) the sampler would pass. Qwen-Image is a flow model in ComfyUI (CONST sampling): the
  diffusion model's output is the velocity, `apply_model` returns x0 = x_t − σ·v, and the velocity is read
  back as (x_t − x0) / σ in float32 (σ > 0 by the contract);
- optional gradient checkpointing is added to the clone only, through ComfyUI's own block-replacement hook
  (`patches_replace["dit"]["double_block", i]`): each block's activations are recomputed in the backward
  pass, which also bounds memory when ComfyUI loaded the weights partially;
- `encode_photos(vae, model, pixels)` encodes with ComfyUI's VAE and applies the model's latent format
  (`process_latent_in`), which is the normalised latent space the diffusion model samples in (the same
  normalisation as diffusers' Qwen-Image pipeline);
- `conditioning_embeds(conditioning)` turns a CONDITIONING into the prompt embeddings [S, H] and mask [S].

`comfy` is imported inside the functions: the module imports without ComfyUI.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from ..core.errors import ModelMismatchError, UserInputError

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16              # Qwen-Image's Wan-2.1 VAE latent
QWEN_IMAGE_MODEL_CLASSES = ("QwenImage",)      # comfy.model_base class names of the Qwen-Image 1.x family
# Activation memory of a training step relative to ComfyUI's own estimate for one sampling forward
# (the backward pass keeps the forward's activations; with checkpointing only one block's).
TRAINING_MEMORY_FACTOR = 3.0


def model_text_width(model) -> int | None:
    """The text width the diffusion model expects (3584 for Qwen-Image), if it can be read."""
    try:
        return int(model.get_model_object("diffusion_model.txt_norm.weight").shape[0])
    except Exception:  # noqa: BLE001 - not a Qwen-Image-like model
        return None


def check_qwen_image_model(model) -> int:
    """Refuse a MODEL that is not ComfyUI's Qwen-Image; return its text width H."""
    base = getattr(model, "model", None)
    if base is None or not callable(getattr(model, "clone", None)) or not hasattr(base, "apply_model"):
        raise UserInputError("the model input is not a ComfyUI diffusion model: connect the MODEL output of "
                             "UNETLoader (Load Diffusion Model) with a Qwen-Image file such as "
                             "qwen_image_fp8_e4m3fn.safetensors")
    kind = type(base).__name__
    try:
        latent = type(model.get_model_object("latent_format")).__name__
    except Exception:  # noqa: BLE001
        latent = "unknown"
    width = model_text_width(model)
    if kind not in QWEN_IMAGE_MODEL_CLASSES or width is None:
        raise ModelMismatchError(
            f"the model input is a {kind} model (latent format {latent}), not Qwen-Image: TrainIdentityHead trains "
            f"through Qwen-Image only. Load a Qwen-Image diffusion model (e.g. qwen_image_fp8_e4m3fn.safetensors "
            f"or qwen_image_2512_fp8_e4m3fn.safetensors) with UNETLoader")
    return width


def comfy_model_family(model):
    """The model family (core/families/) of a ComfyUI MODEL, from its latent format's class name."""
    from ..core.families import detect_family

    return detect_family(type(model.get_model_object("latent_format")).__name__, "the model input")


def conditioning_embeds(conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """A ComfyUI CONDITIONING of one prompt -> (embeds [S, H] float32, mask [S] long) on the CPU."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise UserInputError("the conditioning input is empty: connect CLIPTextEncode (the prompt the person is "
                             "trained under, e.g. 'a photo of a person')")
    entry = conditioning[0]
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and torch.is_tensor(entry[0])
            and isinstance(entry[1], dict)):
        raise UserInputError("the conditioning input is not a ComfyUI CONDITIONING: connect CLIPTextEncode")
    if len(conditioning) > 1:
        log.warning("TrainIdentityHead: the conditioning has %d entries; only the first is used", len(conditioning))
    cond, extra = entry
    if cond.ndim != 3:
        raise UserInputError(f"the conditioning tensor has shape {tuple(cond.shape)}; expected [batch, tokens, width]")
    if cond.shape[0] > 1:
        log.warning("TrainIdentityHead: the conditioning holds %d prompts; the first is used", cond.shape[0])
    embeds = cond[0].detach().float().cpu()
    mask = extra.get("attention_mask")
    if torch.is_tensor(mask):
        mask = mask.reshape(-1, mask.shape[-1])[0].detach().long().cpu()
        if mask.shape[0] != embeds.shape[0]:
            mask = torch.ones(embeds.shape[0], dtype=torch.long)
    else:
        mask = torch.ones(embeds.shape[0], dtype=torch.long)
    return embeds, mask


def encode_photos(vae, model, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, H, W] in 0..1 -> latents [B, C, h, w] in the model's normalised latent space.

    ComfyUI's VAE takes [1, H, W, 3] and returns the raw Wan latent [1, C, 1, h, w]; the sampler applies the
    model's latent format (`process_latent_in`) before the diffusion model sees it, and so does this."""
    channels = getattr(vae, "latent_channels", LATENT_CHANNELS)
    if channels != LATENT_CHANNELS:
        raise ModelMismatchError(f"the VAE has {channels} latent channels, Qwen-Image's has {LATENT_CHANNELS}: load "
                                 "qwen_image_vae.safetensors with VAELoader")
    out = []
    with torch.no_grad():
        for photo in pixels:      # one at a time: Qwen-Image's (Wan) VAE reads a batch as the frames of a video
            raw = vae.encode(photo.movedim(0, -1)[None].float().cpu())
            latent = model.model.process_latent_in(raw.float())
            out.append(latent[:, :, 0] if latent.ndim == 5 else latent)
    return torch.cat(out).float().cpu()


def _merge_wrappers(transformer_options: dict, patcher) -> None:
    """The patcher's wrappers/callbacks into the transformer options, as ComfyUI's prepare_sampling does."""
    try:
        import comfy.patcher_extension as pe
    except ImportError:  # a ComfyUI without the extension mechanism
        return
    for name in ("wrappers", "callbacks"):
        own = getattr(patcher, name, None)
        if own:
            pe.merge_nested_dicts(transformer_options.setdefault(name, {}), own, copy_dict1=False)


def _checkpointed(previous):
    """A double-block replacement that runs the block (or a replacement already there) under
    torch.utils.checkpoint: its activations are recomputed in the backward pass instead of kept."""
    from torch.utils.checkpoint import checkpoint

    def replace(args, extra):
        inner = extra["original_block"]

        def run(img, txt, vec, pe):
            a = {"img": img, "txt": txt, "vec": vec, "pe": pe, "transformer_options": args["transformer_options"]}
            out = previous(a, extra) if previous is not None else inner(a)
            return out["img"], out["txt"]

        img, txt = checkpoint(run, args["img"], args["txt"], args["vec"], args["pe"], use_reentrant=False)
        return {"img": img, "txt": txt}

    return replace


class ComfyQwenImageDenoiser:
    """The Denoiser contract over a loaded, cloned ComfyUI Qwen-Image ModelPatcher (see the module docstring)."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.base = patcher.model
        self.device = torch.device(patcher.load_device)
        self.dtype = self.base.manual_cast_dtype or self.base.get_dtype()

    def _transformer_options(self, sigma: torch.Tensor) -> dict:
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        _merge_wrappers(options, self.patcher)
        options["cond_or_uncond"] = [0]
        options["sigmas"] = sigma
        return options

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        x = x_t.to(self.device, torch.float32)
        if x.ndim == 4:
            x = x.unsqueeze(2)            # ComfyUI's Qwen-Image takes the VAE's [B, C, 1, h, w]
        s = sigma.to(self.device, torch.float32).reshape(-1)
        c = {"c_crossattn": embeds.to(self.device), "transformer_options": self._transformer_options(s)}
        if mask is not None and not bool(mask.bool().all()):
            c["attention_mask"] = mask.to(self.device).long()   # versions that mask text use it; 0.3.x ignores it
        wrapper = self.patcher.model_options.get("model_function_wrapper")
        if wrapper is not None:
            x0 = wrapper(self.base.apply_model, {"input": x, "timestep": s, "c": c, "cond_or_uncond": [0]})
        else:
            x0 = self.base.apply_model(x, s, **c)
        v = (x - x0.float()) / s.view(-1, *([1] * (x.ndim - 1)))
        return v[:, :, 0] if x_t.ndim == 4 else v


def _freeze(module: torch.nn.Module) -> tuple[list, list]:
    params = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    module.requires_grad_(False)
    module.eval()
    return params, modes


def _restore(state: tuple[list, list]) -> None:
    params, modes = state
    for p, flag in params:
        if p.requires_grad != flag:
            # weights loaded under inference mode (ComfyUI's loaders) only take requires_grad=True there
            with torch.inference_mode(p.is_inference()):
                p.requires_grad_(flag)
    for m, training in modes:
        m.training = training


def _normal_copy(weight: torch.Tensor) -> torch.Tensor:
    """A weight function: an inference-mode tensor is copied so autograd may keep it for the backward pass."""
    return weight.clone() if weight.is_inference() else weight


def _copy_inference_weights(base: torch.nn.Module) -> list:
    """ComfyUI runs nodes under torch.inference_mode, so weights loaded there are inference tensors, which
    autograd refuses to keep for the backward pass (even with no gradient of their own). For the layers that
    hold such weights, add a weight function (ComfyUI's per-layer hook, the one LoRA patches use) that hands
    the layer a normal copy; weights loaded for this run outside inference mode are used as they are.
    Returns what to put back: (module, weight_function list, bias_function list)."""
    changed = []
    for m in base.modules():
        if not hasattr(m, "comfy_cast_weights"):
            continue
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        wi = torch.is_tensor(w) and w.is_inference()
        bi = torch.is_tensor(b) and b.is_inference()
        if not (wi or bi):
            continue
        changed.append((m, m.weight_function, m.bias_function))
        m.weight_function = list(m.weight_function) + ([_normal_copy] if wi else [])
        m.bias_function = list(m.bias_function) + ([_normal_copy] if bi else [])
    left = [n for n, p in base.named_parameters() if p.is_inference()
            and not hasattr(base.get_submodule(n.rsplit(".", 1)[0]) if "." in n else base, "comfy_cast_weights")]
    if left:
        raise UserInputError(f"the model has weights ComfyUI's layers do not manage ({', '.join(left[:3])}); "
                             "it cannot be trained through here")
    return changed


@contextlib.contextmanager
def training_denoiser(model, *, latent_shape: tuple[int, ...] | None = None, batch: int = 1,
                      gradient_checkpointing: bool = False) -> Iterator[ComfyQwenImageDenoiser]:
    """A Denoiser over a clone of `model`, loaded by ComfyUI's model management, for a with-block.

    latent_shape [C, h, w] (the largest photo) and batch size the memory request to ComfyUI; afterwards the
    weights' requires_grad flags, train/eval modes, the layers' weight functions and `in_training` are as
    before, and `model` itself was never patched."""
    import comfy.model_management as mm

    check_qwen_image_model(model)
    clone = model.clone()
    if gradient_checkpointing:
        blocks = len(clone.get_model_object("diffusion_model.transformer_blocks"))
        replace = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for i in range(blocks):
            clone.set_model_patch_replace(_checkpointed(replace.get(("double_block", i))), "dit", "double_block", i)
    memory = 0
    if latent_shape is not None:
        try:
            memory = int(clone.memory_required([batch, latent_shape[0], 1, *latent_shape[-2:]])
                         * (1.0 if gradient_checkpointing else TRAINING_MEMORY_FACTOR))
        except Exception:  # noqa: BLE001 - an exotic patcher: let ComfyUI decide
            memory = 0
    had_flag = hasattr(mm, "in_training")
    previous_flag = getattr(mm, "in_training", False)
    with torch.inference_mode(False), torch.enable_grad():
        mm.load_models_gpu([clone], memory_required=memory)   # weights moved now are normal tensors
        state = _freeze(clone.model)
        functions = _copy_inference_weights(clone.model)
        if callable(getattr(clone, "pre_run", None)):
            clone.pre_run()
        try:
            if had_flag:
                mm.in_training = True
            yield ComfyQwenImageDenoiser(clone)
        finally:
            if had_flag:
                mm.in_training = previous_flag
            for m, wf, bf in functions:
                m.weight_function, m.bias_function = wf, bf
            _restore(state)
            if callable(getattr(clone, "cleanup", None)):
                clone.cleanup()
