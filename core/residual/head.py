"""The residual head (the POC's LinearResidualHead) and its one-file safetensors checkpoint.

`ResidualHead` maps an identity vector f [B, D] to a residual R [B, K, H] = scale * reshape(W f + b).
W and b start at zero and scale at 1, so an untrained head outputs exactly zero and gradients still
reach W. The checkpoint is a single `.safetensors` file (never a pickle): tensors `proj.weight`
[K*H, D], `proj.bias` [K*H], `scale` [1], and the metadata below as JSON under the key
`qwen_identity` (safetensors metadata is str -> str).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files.atomic import atomic_write
from ..errors import UserInputError
from ..families import FAMILIES
from ..files.safetensors_io import read_safetensors, safetensors_bytes

FORMAT_NAME = "qwen-identity-residual-head"
FORMAT_VERSION = 1
METADATA_KEY = "qwen_identity"
MAX_ELEMENTS = 2_000_000_000  # a head larger than this is not a head (absurd-shape guard)

# Known text widths: which Qwen-Image generation a hidden size belongs to (one per model family).
TEXT_WIDTHS = {f.text_width: f.describe_width() for f in FAMILIES}
FEATURE_WIDTHS = {2048: "Qwen3-VL-2B", 2560: "Qwen3-VL-4B", 4096: "Qwen3-VL-8B"}


def describe_text_width(h: int) -> str:
    return TEXT_WIDTHS.get(int(h), f"an unknown text encoder (H={h})")


def describe_feature_width(d: int) -> str:
    return FEATURE_WIDTHS.get(int(d), f"an unknown Qwen3-VL size (D={d})")


@dataclass
class HeadMeta:
    """What a head was trained on; heads and features/conditioning are checked against it."""

    feature_dim: int                      # D
    tokens: int                           # K identity-token slots
    hidden_size: int                      # H, the Qwen-Image text width
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    feature_settings: dict[str, Any] = field(default_factory=dict)  # source, layer, resolution, ...
    qwen3_vl_model: str = ""
    text_encoder_model: str = ""
    base_prompt: str = ""
    target: str = ""                      # "caption" | "zero" | ...
    length_policy: str = ""
    training_args: dict[str, Any] = field(default_factory=dict)
    dataset_fingerprint: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    pack_version: str = ""
    family: str = ""                      # the model family (core/families/), e.g. "qwen-image"; "" = from H
    card: dict[str, Any] = field(default_factory=dict)  # the model card's fields (core/residual/model_card.py)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, source: str = "head") -> "HeadMeta":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{source}: its metadata is not valid JSON ({e}); the file is damaged or not a head.") from None
        if not isinstance(data, dict):
            raise UserInputError(f"{source}: its metadata is not a JSON object; the file is not a head.")
        if data.get("format") != FORMAT_NAME:
            raise UserInputError(f"{source}: not a Qwen identity head (format {data.get('format')!r}, expected {FORMAT_NAME!r}).")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise UserInputError(f"{source}: head format version {version!r} is not supported by this pack "
                                 f"(it reads 1..{FORMAT_VERSION}); update the pack.")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("feature_dim", "tokens", "hidden_size"):
            v = kwargs.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserInputError(f"{source}: metadata field {key}={v!r} must be a positive integer.")
        if kwargs["feature_dim"] * kwargs["tokens"] * kwargs["hidden_size"] > MAX_ELEMENTS:
            raise UserInputError(f"{source}: metadata sizes D={kwargs['feature_dim']}, K={kwargs['tokens']}, "
                                 f"H={kwargs['hidden_size']} are absurdly large; the file is not a usable head.")
        return cls(**kwargs)


class ResidualHead(nn.Module):
    """Linear D -> K*H with a learnable scalar scale; zero output at initialisation."""

    def __init__(self, feature_dim: int, tokens: int, hidden_size: int, meta: HeadMeta | None = None):
        super().__init__()
        self.proj = nn.Linear(feature_dim, tokens * hidden_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.scale = nn.Parameter(torch.ones(1))
        self.meta = meta or HeadMeta(feature_dim=feature_dim, tokens=tokens, hidden_size=hidden_size)

    @property
    def feature_dim(self) -> int:
        return self.proj.in_features

    @property
    def tokens(self) -> int:
        return self.meta.tokens

    @property
    def hidden_size(self) -> int:
        return self.meta.hidden_size

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, D] or [D] -> residual [B, K, H]."""
        if features.ndim == 1:
            features = features.unsqueeze(0)
        if features.shape[-1] != self.feature_dim:
            from ..errors import ModelMismatchError

            raise ModelMismatchError(
                f"identity features have D={features.shape[-1]} ({describe_feature_width(features.shape[-1])}) "
                f"but the head expects D={self.feature_dim} ({describe_feature_width(self.feature_dim)}): "
                "extract features with the Qwen3-VL model the head was trained on, or pick a matching head.")
        x = features.to(self.proj.weight.dtype)
        out = self.scale * self.proj(x)
        return out.view(features.shape[0], self.tokens, self.hidden_size)


def save_head(head: ResidualHead, path: str | os.PathLike) -> Path:
    """Write the head atomically as one safetensors file with its metadata."""
    head.meta.feature_dim, head.meta.tokens = head.feature_dim, head.tokens
    tensors = {"proj.weight": head.proj.weight.detach().cpu().float().contiguous(),
               "proj.bias": head.proj.bias.detach().cpu().float().contiguous(),
               "scale": head.scale.detach().cpu().float().contiguous()}
    metadata = {METADATA_KEY: head.meta.to_json(), "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    data = safetensors_bytes(tensors, metadata)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def load_head(path: str | os.PathLike, device: torch.device | str = "cpu") -> ResidualHead:
    """Load and validate a head file; every problem is a UserInputError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"head file not found: {path}. Check the path, or put the head in ComfyUI/models/identity_heads/.")
    metadata, tensors = read_safetensors(
        path, lambda e: f"{path} is not a readable safetensors file ({type(e).__name__}: {e}). "
                        "Heads are .safetensors files written by `qwen-identity train`.",
        keys=("proj.weight", "proj.bias", "scale"))
    if METADATA_KEY not in metadata:
        raise UserInputError(f"{path} is a safetensors file but not a Qwen identity head (no '{METADATA_KEY}' metadata).")
    meta = HeadMeta.from_json(metadata[METADATA_KEY], source=str(path))
    d, k, h = meta.feature_dim, meta.tokens, meta.hidden_size
    expected = {"proj.weight": (k * h, d), "proj.bias": (k * h,), "scale": (1,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise UserInputError(f"{path}: tensor {name!r} is missing; the file is damaged. Retrain or re-download it.")
        if tuple(tensors[name].shape) != shape:
            raise UserInputError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)} but the metadata "
                                 f"(D={d}, K={k}, H={h}) requires {shape}; the file is damaged or edited.")
        if not torch.isfinite(tensors[name]).all():
            raise UserInputError(f"{path}: tensor {name!r} contains NaN or infinite values; the training diverged. "
                                 "Retrain with a lower learning rate.")
    head = ResidualHead(d, k, h, meta=meta)
    with torch.no_grad():
        head.proj.weight.copy_(tensors["proj.weight"])
        head.proj.bias.copy_(tensors["proj.bias"])
        head.scale.copy_(tensors["scale"])
    return head.to(device).eval()


# --- compatibility checks: a head meets features and conditioning ------------------------------
# Feature settings that change what the vector means (a mismatch is an error) and those that only
# change how photos were resized before extraction (a mismatch is a warning: same space, other detail).
HARD_FEATURE_SETTINGS = ("source", "layer", "pooling", "normalize")
SOFT_FEATURE_SETTINGS = ("resolution", "resolution_policy", "max_pixels", "min_pixels", "image_size", "resize")


def _features_meta_dict(features_meta: Any) -> dict[str, Any]:
    """Accept an IdentityFeatures-like object (with `.meta`), its meta dict, or a flat settings dict."""
    meta = getattr(features_meta, "meta", features_meta)
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise UserInputError(f"expected identity features (IDENTITY_FEATURES), got {type(features_meta).__name__}.")
    flat = dict(meta.get("settings") or meta.get("feature_settings") or {})
    flat.update({k: v for k, v in meta.items() if k not in ("settings", "feature_settings")})
    return flat


def _feature_dim_of(features_meta: Any, flat: dict[str, Any]) -> int | None:
    for key in ("feature_dim", "dim", "D"):
        if isinstance(flat.get(key), int):
            return int(flat[key])
    combined = getattr(features_meta, "combined", None)
    if isinstance(combined, torch.Tensor) and combined.ndim >= 1:
        return int(combined.shape[-1])
    return None


def check_head_features(head: ResidualHead, features_meta: Any) -> list[str]:
    """Check that identity features suit the head; return harmless differences as warnings.

    Raises ModelMismatchError naming both sides when the width D differs or the feature source/layer
    (what the vector means) differs. A different resolution policy is only a warning: the vector lives
    in the same space, the head just sees the photo at another level of detail.
    """
    from ..errors import ModelMismatchError

    flat = _features_meta_dict(features_meta)
    d = _feature_dim_of(features_meta, flat)
    if d is not None and d != head.feature_dim:
        raise ModelMismatchError(
            f"identity features have D={d} ({describe_feature_width(d)}) but the head expects "
            f"D={head.feature_dim} ({describe_feature_width(head.feature_dim)}, trained on "
            f"{head.meta.qwen3_vl_model or 'an unrecorded Qwen3-VL'}): extract features with the Qwen3-VL model "
            "the head was trained on, or pick a head trained on this one.")
    trained = _features_meta_dict(head.meta.feature_settings)
    for key in HARD_FEATURE_SETTINGS:
        if key in trained and key in flat and trained[key] != flat[key]:
            raise ModelMismatchError(
                f"identity features were extracted with {key}={flat[key]!r} but the head was trained on "
                f"{key}={trained[key]!r}: extract the features with {key}={trained[key]!r} (or pick a head "
                f"trained on {key}={flat[key]!r}).")
    warnings_: list[str] = []
    crop_warning = _crop_mismatch(trained, flat)
    if crop_warning:
        warnings_.append(crop_warning)
    for key in SOFT_FEATURE_SETTINGS:
        if key in trained and key in flat and trained[key] != flat[key]:
            warnings_.append(f"features use {key}={flat[key]!r} but the head was trained on {key}={trained[key]!r}; "
                             "this works, but identity may come through a little differently.")
    model = flat.get("model_id") or flat.get("qwen3_vl_model")
    if model and head.meta.qwen3_vl_model and model != head.meta.qwen3_vl_model:
        warnings_.append(f"features come from {model!r} but the head was trained on features from "
                         f"{head.meta.qwen3_vl_model!r} (same width D={head.feature_dim}); a fine-tune of the same "
                         "model works, a different model gives meaningless residuals.")
    return warnings_


def _crop_mismatch(trained: dict[str, Any], features: dict[str, Any]) -> str | None:
    """A warning when the features were cropped otherwise than the head's training photos (a head or features
    made before the crop setting existed count as what they were made with: `face_crop.legacy_crop`)."""
    from ..identity.face_crop import legacy_crop

    if not trained or not features or "resolution" not in features and "crop" not in features:
        return None
    head_crop, feature_crop = legacy_crop(trained), legacy_crop(features)
    if head_crop == feature_crop:
        return None
    return (f"the identity features use crop {feature_crop!r} but the head was trained on crop {head_crop!r}: the "
            f"head then sees other features than it learned from. Set crop {head_crop!r} on ExtractIdentityFeatures "
            f"(or --crop {head_crop} on the command line).")


def check_head_hidden(head: ResidualHead, hidden_size: int) -> None:
    """The prompt embeddings' width H must be the head's: otherwise name both sizes and their generations."""
    from ..errors import ModelMismatchError

    if int(hidden_size) != head.hidden_size:
        raise ModelMismatchError(
            f"the conditioning has text width H={int(hidden_size)} ({describe_text_width(hidden_size)}) but the head "
            f"outputs H={head.hidden_size} ({describe_text_width(head.hidden_size)}): use a head trained for this "
            "Qwen-Image generation, or encode the prompt with the text encoder the head was trained with "
            f"({head.meta.text_encoder_model or 'not recorded'}).")


def head_family(head: ResidualHead):
    """The model family a head is for (core/families/): its recorded `family`, else (heads from before
    the field) the family whose text width is the head's H; None when neither says."""
    from ..families import family_named, family_of_width

    if head.meta.family:
        return family_named(head.meta.family)
    return family_of_width(head.hidden_size)


def check_head_family(head: ResidualHead, family) -> None:
    """A head is used only with a model of its own family: otherwise a ModelMismatchError naming both."""
    from ..errors import ModelMismatchError

    mine = head_family(head)
    if mine is not None and mine.name != family.name:
        raise ModelMismatchError(
            f"the head was trained for {mine.title} (family {mine.name!r}, H={head.hidden_size}) but the model is "
            f"{family.title} (family {family.name!r}): use a head trained for {family.title}, or the "
            f"{mine.title} model the head was trained with.")


def head_summary(head: ResidualHead) -> str:
    """A few human-readable lines about a head (the LoadResidualHead node's STRING output)."""
    m = head.meta
    lines = [f"Qwen identity head: D={m.feature_dim} ({describe_feature_width(m.feature_dim)}) -> "
             f"K={m.tokens} slot(s) x H={m.hidden_size} ({describe_text_width(m.hidden_size)})"
             + (f", model family {m.family}" if m.family else ""),
             f"scale={float(head.scale.detach().float().item()):.4g}, target={m.target or '?'}, "
             f"length policy={m.length_policy or '?'}, format v{m.format_version}, pack {m.pack_version or '?'}"]
    if m.qwen3_vl_model or m.text_encoder_model:
        lines.append(f"Qwen3-VL: {m.qwen3_vl_model or '?'}; text encoder: {m.text_encoder_model or '?'}")
    if m.feature_settings:
        from ..identity.face_crop import legacy_crop

        recorded = "crop" in m.feature_settings
        lines.append(f"photo crop: {legacy_crop(m.feature_settings)}"
                     + ("" if recorded else " (not recorded: made before the crop setting)")
                     + " - extract features with the same crop")
        lines.append("feature settings: " + json.dumps(m.feature_settings, sort_keys=True, default=str))
    if m.base_prompt:
        lines.append(f"base prompt: {m.base_prompt!r}")
    if m.metrics:
        keys = [k for k in ("epochs", "train_loss", "val_loss", "train_identities", "val_identities") if k in m.metrics]
        lines.append("metrics: " + ", ".join(f"{k}={m.metrics[k]}" for k in keys))
    if m.dataset_fingerprint:
        lines.append(f"dataset: {m.dataset_fingerprint[:16]}")
    return "\n".join(lines)
