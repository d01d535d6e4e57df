"""What every model family (Qwen-Image 1.x, Qwen-Image 2.1, ...) provides: one adapter per family.

Training, tuning, sampling, evaluation and the nodes never branch on a family's name: they ask the
family of the model in hand (`core.families.detect_family` and friends) for its prompt encoding, VAE,
latent layout, transformer call and defaults. Adding a family is adding a subclass of `ModelFamily`
in its own module and listing it in `core.families.FAMILIES`.

The Denoiser is the one transformer call everyone shares (the denoise objective, personal tuning,
the ComfyUI training node): `denoiser(x_t, sigma, embeds, mask) -> v` on the family's own latents
[B, C, h, w] (normalised the way the transformer expects), σ [B] in (0, 1], prompt embeddings
[B, S, H] (already E + α·R) and their mask [B, S] (or None); v is the flow-matching velocity
(target ε - x0 for x_t = (1 - σ)·x0 + σ·ε). Packing into tokens, img_shapes and timestep scaling
happen inside; the weights stay frozen, gradients flow into `embeds` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch


@dataclass(frozen=True)
class FamilyDefaults:
    """What a user gets when they set nothing (the stock pipeline's defaults for this family)."""

    width: int
    height: int
    steps: int
    cfg: float
    negative_prompt: str = " "


class Denoiser:
    """The family's transformer as a flow-matching velocity predictor on unpacked latents (see the
    module docstring). Built by `ModelFamily.denoiser`; `dtype` is the compute dtype, `device` where the
    transformer's weights are."""

    def __init__(self, family: "ModelFamily", transformer: torch.nn.Module):
        from ..denoising.flow_matching import compute_dtype_of

        self.family = family
        self.transformer = transformer
        self.dtype = compute_dtype_of(transformer)
        try:
            self.device = next(transformer.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        if x_t.ndim != 4:
            raise ValueError(f"the denoiser takes latents [B, C, h, w]; got shape {tuple(x_t.shape)}")
        packed, shapes = self.family.pack_latents(x_t)
        v = self.family.predict_velocity(self.transformer, packed, sigma, embeds, mask, shapes, self.dtype)
        return self.family.unpack_latents(v.float(), shapes[0])


def single_frame(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w], or the VAE's one-frame [B, C, 1, h, w] -> [B, C, h, w]."""
    if latents.ndim == 5:
        if latents.shape[2] != 1:
            raise ValueError(f"expected one frame, got latents of shape {tuple(latents.shape)}")
        latents = latents[:, :, 0]
    return latents


def vae_normalise(vae, z: torch.Tensor) -> torch.Tensor:
    """(z - latents_mean) / latents_std over the channel axis of [B, C, 1, h, w] (float32, on z's device)."""
    c = z.shape[1]
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1)
    return (z.float() - mean.to(z.device)) / std.to(z.device)


class ModelFamily:
    """One image-model family. Subclasses set the class attributes and implement the methods."""

    # identity and recognition
    name: str = ""                       # as written into head metadata, e.g. "qwen-image"
    title: str = ""                      # for messages, e.g. "Qwen-Image (1.x, 2512, Edit)"
    text_width: int = 0                  # H of the prompt embeddings (the real model's)
    text_encoder_id: str = ""            # the hub id of the real text encoder
    text_encoder_classes: tuple[str, ...] = ()   # transformers classes of the text encoder
    pipeline_classes: tuple[str, ...] = ()       # diffusers model_index.json `_class_name`s
    transformer_classes: tuple[str, ...] = ()    # diffusers transformer classes (config `_class_name`)
    vae_classes: tuple[str, ...] = ()            # diffusers VAE classes
    comfy_latent_formats: tuple[str, ...] = ()   # ComfyUI latent_format class names
    state_dict_markers: tuple[str, ...] = ()     # keys (suffixes) only this family's transformer has
    comfy_text_width_keys: tuple[str, ...] = ()  # ComfyUI model objects whose first dim is the text width H
    rope_modules: tuple[str, ...] = ()   # diffusers modules whose `apply_rotary_emb_qwen` (complex RoPE) the
                                         # transformer calls: compiled forwards swap it for real arithmetic

    # latents
    latent_channels: int = 0
    vae_scale_factor: int = 0            # pixels per latent pixel
    patch_size: int = 1                  # latent pixels per token side
    size_multiple: int = 16              # image sides must be multiples of this
    defaults: FamilyDefaults = FamilyDefaults(1024, 1024, 50, 4.0)

    # ------------------------------------------------------------------ recognition
    def describe_width(self) -> str:
        return f"{self.title} ({self.text_encoder_id.split('/')[-1]} text encoder, H={self.text_width})"

    def matches_index(self, index: dict[str, Any]) -> bool:
        return index.get("_class_name") in self.pipeline_classes

    def matches_transformer_config(self, config: dict[str, Any]) -> bool:
        return config.get("_class_name") in self.transformer_classes

    def matches_state_dict(self, keys: Iterable[str]) -> bool:
        keys = list(keys)
        return bool(self.state_dict_markers) and all(any(k.endswith(m) for k in keys) for m in self.state_dict_markers)

    def matches_module(self, module: Any) -> bool:
        """A loaded model object (transformer, VAE, text encoder or pipeline) of this family."""
        module = getattr(module, "_orig_mod", module)  # torch.compile wrapper
        names = {c.__name__ for c in type(module).__mro__}
        return bool(names & set(self.transformer_classes + self.vae_classes + self.text_encoder_classes
                                + self.pipeline_classes))

    # ------------------------------------------------------------------ prompts
    def load_text_encoder(self, folder: Path, device, dtype):
        """(text_encoder, tokenizer-or-processor) from a diffusers folder of this family."""
        raise NotImplementedError

    def encode_prompts(self, text_encoder, tokenizer, prompts: list[str], device,
                       max_sequence_length: int):
        """PromptEmbeds (embeds [B, S, H], mask [B, S] long, right-padded), equal to the stock pipeline's."""
        raise NotImplementedError

    # ------------------------------------------------------------------ VAE and latents
    def load_vae(self, folder: Path, device, dtype):
        """The folder's vae/ as this family's diffusers VAE class (`vae_classes[0]`, safetensors only)."""
        import diffusers

        vae_cls = getattr(diffusers, self.vae_classes[0])
        return vae_cls.from_pretrained(Path(folder) / "vae", torch_dtype=dtype, use_safetensors=True).to(device).eval()

    def vae_input(self, x: torch.Tensor) -> torch.Tensor:
        """RGB pixels [B, 3, 1, H, W] in [-1, 1] -> what this family's VAE reads (the hook for a family whose
        VAE takes other channels, e.g. RGBA); RGB as given by default."""
        return x

    def vae_output_pixels(self, decoded: torch.Tensor) -> torch.Tensor:
        """The VAE's decoded [B, C, H, W] in [-1, 1] -> its RGB channels (a hook like `vae_input`)."""
        return decoded

    @torch.no_grad()
    def encode_vae_input(self, vae, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, 1, H, W] in [-1, 1] (the VAE's input layout) -> normalised latents [B, C, h, w] float32 (CPU):
        the distribution's mode, normalised with the VAE config's latents_mean/std."""
        p = next(vae.parameters())
        z = vae.encode(self.vae_input(x).to(device=p.device, dtype=p.dtype)).latent_dist.mode()  # [B, C, 1, h, w]
        return vae_normalise(vae, z.cpu())[:, :, 0].contiguous()

    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in 0..1 -> latents [B, C, h, w] float32, normalised as the transformer expects
        (the distribution's mode: deterministic)."""
        return self.encode_vae_input(vae, (pixels.float() * 2.0 - 1.0)[:, :, None])

    @torch.no_grad()
    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, h, w] (normalised) -> pixels [B, 3, H, W] in 0..1."""
        c = latents.shape[1]
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1)
        lat = latents[:, :, None].to(vae.dtype)
        lat = lat * std.to(lat.device, lat.dtype) + mean.to(lat.device, lat.dtype)
        decoded = vae.decode(lat, return_dict=False)[0][:, :, 0]
        return (self.vae_output_pixels(decoded) / 2 + 0.5).clamp(0, 1).float()

    def pack_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """[B, C, h, w] (or the VAE's [B, C, 1, h, w]) -> (tokens [B, N, F], img_shapes per sample)."""
        raise NotImplementedError

    def unpack_latents(self, packed: torch.Tensor, img_shape: tuple[int, int, int]) -> torch.Tensor:
        raise NotImplementedError

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of the latent of an image of width x height pixels."""
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    # ------------------------------------------------------------------ transformer
    def load_transformer(self, folder: Path, device, dtype, storage_dtype: torch.dtype | None = None):
        """The folder's transformer/ as this family's diffusers class (`transformer_classes[0]`, safetensors only).

        `storage_dtype` (float8_e4m3fn): weights stored in it and cast to `dtype` layer by layer when they run
        (diffusers' layerwise casting). They are then read one tensor at a time, cast, and put on `device`, so
        neither the GPU nor the CPU ever holds the whole model in `dtype`: Qwen-Image's 38 GiB of bf16 weights
        would not fit a 24 GB card even for the moment between loading and casting.
        """
        import diffusers

        transformer_cls = getattr(diffusers, self.transformer_classes[0])
        if storage_dtype is None:
            return transformer_cls.from_pretrained(Path(folder) / "transformer", torch_dtype=dtype,
                                                   use_safetensors=True).to(device)
        return _load_cast_per_tensor(transformer_cls, Path(folder) / "transformer", device, dtype, storage_dtype)

    def transformer_text_width(self, config: dict[str, Any]) -> int:
        """The text width H a transformer config takes."""
        raise NotImplementedError

    def predict_velocity(self, transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                         prompt_embeds_mask: torch.Tensor | None, img_shapes: Sequence[tuple[int, int, int]],
                         compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The training-step call on packed tokens: velocity [B, N, F] in the compute dtype."""
        raise NotImplementedError

    def denoiser(self, transformer) -> Denoiser:
        return Denoiser(self, transformer)

    # ------------------------------------------------------------------ pipeline
    def load_pipeline(self, folder: Path, dtype, **components):
        """The stock diffusers pipeline of this family from a folder (`pipeline_classes[0]`, safetensors only:
        no pickles); `components` (e.g. `transformer=`) are used instead of loading those from the folder."""
        import diffusers

        pipeline_cls = getattr(diffusers, self.pipeline_classes[0])
        return pipeline_cls.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, **components)

    def pipeline_text_stack(self, pipe) -> tuple[Any, Any]:
        """(text_encoder, tokenizer or processor) of a loaded pipeline, as `encode_prompts` takes them."""
        return pipe.text_encoder, pipe.tokenizer

    def encode_references(self, pipe, prompts, images: list, device, resolution: int) -> list:
        """CONDITIONING for prompts read together with reference images (families whose model takes them)."""
        from ..errors import UserInputError

        raise UserInputError(f"{self.title} takes no reference images: pass the person's photos as references only "
                             "with a Qwen-Image 2.1 model, or leave them out.")

    def sample(self, bundle, positive: list, negative: list | None, **options):
        """Images from CONDITIONING on the diffusers path (core/generation/sampling.sample's arguments):
        equal to the stock pipeline at the same seeds."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


def _load_cast_per_tensor(transformer_cls, folder: Path, device, dtype, storage_dtype):
    """`transformer_cls` from `folder` with layerwise casting, built empty and filled tensor by tensor.

    The empty model (parameters on the meta device) is put in `dtype` and given layerwise casting first, so
    each parameter's dtype there is the one it is stored in (`storage_dtype`, or `dtype` for the layers
    diffusers keeps uncast: norms, position embeddings); every tensor read from the safetensors files is cast
    to that and moved to `device` before the next is read. Same parameters, dtypes and hooks as
    `from_pretrained(torch_dtype=dtype)` followed by `enable_layerwise_casting`.
    """
    import json

    from accelerate import init_empty_weights
    from safetensors import safe_open

    with init_empty_weights():
        model = transformer_cls.from_config(transformer_cls.load_config(folder))
    # parameters (still on meta) to `dtype`; buffers stay as built (from_pretrained does not cast them either:
    # 2.1's timestep frequencies stay float32)
    model._apply(lambda t: t.to(dtype) if t.is_meta and t.is_floating_point() else t)
    model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=dtype)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [folder / "diffusion_pytorch_model.safetensors"]
    expected = dict(model.named_parameters())
    for f in files:
        part = {}
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                target = expected.get(key)
                if target is None:
                    raise ValueError(f"{f}: tensor {key!r} is not a parameter of {transformer_cls.__name__}; the "
                                     "folder does not hold this model. Use a complete diffusers folder.")
                # through `dtype` first, as from_pretrained(torch_dtype=dtype) then casting would round it
                part[key] = sf.get_tensor(key).to(dtype).to(device=device, dtype=target.dtype)
        model.load_state_dict(part, strict=False, assign=True)
    missing = [name for name, p in model.named_parameters() if p.is_meta]   # never read from the files
    if missing:
        raise ValueError(f"{folder}: {len(missing)} weights of {transformer_cls.__name__} are missing (first: "
                         f"{missing[0]}). Use a complete diffusers folder.")
    return model.to(device).eval()
