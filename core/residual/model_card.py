"""Heads you can publish: the head's file name and its model card.

A trained head is written as `<run name>_head.safetensors` (the run name is the output folder's name),
so ComfyUI's dropdown of `models/identity_heads/` tells heads apart; heads written before were all
called `linear_head.safetensors` and are still found (`find_head`).

Every time a head is saved by a training run (universal heads by `qwen-identity train`, personal heads by
the tuning code) its model card is written beside it as `<head file stem>.md`, and the same fields go into
the head's safetensors metadata (`HeadMeta.card`), so a head copied without its card still carries them.
The fields: the Qwen-Image family and Qwen3-VL model it belongs to, the training objective, the photo
crop of its features, K, the data fingerprint and person count, the held-out gain with its 95 % CI and
the impostor's gain (when measured), the training steps, a licence field for the author to fill, the
intended use and a misuse note.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..files.atomic import atomic_write_text
from .head import ResidualHead, head_family, save_head

HEAD_SUFFIX = "_head.safetensors"
LEGACY_HEAD_FILE = "linear_head.safetensors"
LICENCE_TO_FILL = "to fill in by the author (the licence of the head, compatible with the training photos' terms)"
INTENDED_USE = ("Adding the identity of a consenting person, from their own photos, to Qwen-Image generations "
                "(ComfyUI nodes of the Qwen Identity pack or its `qwen-identity` command line), at a chosen "
                "strength and step window.")
MISUSE_NOTE = ("Do not use it to depict a real person without their consent, to impersonate or deceive (fake "
               "evidence, fraud, non-consensual intimate or defamatory imagery), or to identify or track people. "
               "Generated images can look like real photographs: label them as generated. The head carries "
               "whatever its training photos carried, including their biases.")


def head_file_name(run_name: str) -> str:
    """`<run name>_head.safetensors`, the run name reduced to letters, digits, `.`, `_` and `-`."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(run_name)).strip("._") or "identity"
    return safe + HEAD_SUFFIX


def head_path(out_dir: str | Path) -> Path:
    """Where a training run in `out_dir` writes its head: OUT/checkpoints/<OUT's name>_head.safetensors."""
    out_dir = Path(out_dir)
    return out_dir / "checkpoints" / head_file_name(out_dir.resolve().name)


def find_head(out_dir: str | Path) -> Path | None:
    """The head a run in `out_dir` wrote: its `<run>_head.safetensors`, else a `linear_head.safetensors` written
    by an older version, else None."""
    for path in (head_path(out_dir), Path(out_dir) / "checkpoints" / LEGACY_HEAD_FILE):
        if path.is_file():
            return path
    return None


def card_path(head_file: str | Path) -> Path:
    """The model card beside a head: `<head file stem>.md`."""
    head_file = Path(head_file)
    return head_file.with_name(head_file.stem + ".md")


def _gain(metrics: dict[str, Any]) -> dict[str, Any] | None:
    g = (metrics or {}).get("held_out_gain")
    if not isinstance(g, dict) or g.get("identity_gain") is None:
        return None
    return {"identity_gain": g.get("identity_gain"), "identity_gain_ci95": g.get("identity_gain_ci95"),
            "own_gain": g.get("own_gain"), "impostor_gain": g.get("impostor_gain"),
            "relative": g.get("identity_gain_relative"), "persons": g.get("persons"), "photos": g.get("photos")}


def _personal_gain(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """A personal head's held-out photo figures (core/tuning), when it had one."""
    if (metrics or {}).get("own_gain_relative") is None:
        return None
    return {k: metrics.get(k) for k in ("own_gain_relative", "impostor_gain_relative", "held_out_photos",
                                        "best_step", "impostor_photos")}


def card_fields(head: ResidualHead, *, steps: int | None = None, persons: int | None = None,
                licence: str | None = None) -> dict[str, Any]:
    """The model card's fields, from the head's metadata (and the run's step and person counts)."""
    m = head.meta
    from ..identity.face_crop import legacy_crop

    metrics = m.metrics or {}
    if persons is None:
        counted = [metrics.get("train_identities"), metrics.get("val_identities")]
        persons = sum(int(c) for c in counted if isinstance(c, int)) or None
    previous = m.card or {}
    family = head_family(head)   # recorded, else from the text width H (heads made before the field)
    return {
        "family": family.name if family is not None else f"unknown (H={m.hidden_size})",
        "qwen3_vl_model": m.qwen3_vl_model or "not recorded",
        "text_encoder_model": m.text_encoder_model or "not recorded",
        "objective": m.target or "not recorded",
        "crop": legacy_crop(m.feature_settings),
        "tokens_K": int(m.tokens),
        "feature_dim_D": int(m.feature_dim),
        "hidden_size_H": int(m.hidden_size),
        "data_fingerprint": m.dataset_fingerprint or "not recorded",
        "persons": persons,
        "held_out_gain": _gain(metrics),
        "held_out_photo_gain": _personal_gain(metrics),
        "training_steps": steps if steps is not None else metrics.get("step"),
        "epochs": metrics.get("epochs"),
        "licence": licence or previous.get("licence") or LICENCE_TO_FILL,
        "intended_use": INTENDED_USE,
        "misuse": MISUSE_NOTE,
        "pack_version": m.pack_version,
    }


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "not measured"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def card_markdown(fields: dict[str, Any], head_name: str) -> str:
    """The model card as markdown (what a hub page or a shared folder shows)."""
    g = fields.get("held_out_gain")
    if g:
        lo, hi = (g.get("identity_gain_ci95") or [None, None])[:2]
        gain = (f"identity gain {_fmt(g['identity_gain'])} (95 % CI {_fmt(lo)} .. {_fmt(hi)}, resampling people), "
                f"own gain {_fmt(g['own_gain'])}, impostor gain {_fmt(g['impostor_gain'])}; on "
                f"{_fmt(g.get('persons'))} held-out people, {_fmt(g.get('photos'))} photos")
    elif fields.get("held_out_photo_gain"):
        p = fields["held_out_photo_gain"]
        gain = (f"personal head, one held-out photo ({', '.join(p.get('held_out_photos') or [])}): own gain "
                f"{_fmt(100 * p['own_gain_relative'], 3)} % of the prompt-alone loss at step {_fmt(p.get('best_step'))}"
                + (f"; impostor gain {_fmt(100 * p['impostor_gain_relative'], 3)} % on {p.get('impostor_photos')} "
                   "photos of other people" if p.get("impostor_gain_relative") is not None else ""))
    else:
        gain = ("not measured (only the denoise objective measures it while training; measure it with "
                "`qwen-identity eval --denoise-gain` on people the head was not trained on)")
    rows = [("Qwen-Image family", fields["family"]), ("Qwen3-VL model (features)", fields["qwen3_vl_model"]),
            ("text encoder", fields["text_encoder_model"]), ("objective", fields["objective"]),
            ("photo crop of the features", fields["crop"]),
            ("identity tokens K", fields["tokens_K"]), ("D -> K x H", f"{fields['feature_dim_D']} -> "
                                                        f"{fields['tokens_K']} x {fields['hidden_size_H']}"),
            ("data fingerprint", fields["data_fingerprint"]), ("people in the data", _fmt(fields["persons"])),
            ("held-out gain", gain), ("training steps", _fmt(fields["training_steps"])),
            ("epochs", _fmt(fields["epochs"])), ("licence", fields["licence"]),
            ("pack version", fields["pack_version"] or "not recorded")]
    table = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)
    return (f"# {head_name}\n\nA residual identity head of the Qwen Identity pack: it maps Qwen3-VL features of a "
            "person's photos to a residual on Qwen-Image's prompt embeddings.\n\n| field | value |\n|---|---|\n"
            f"{table}\n\n## Intended use\n{fields['intended_use']}\n\n## Misuse\n{fields['misuse']}\n\n"
            "## How to use\nPut the file in `ComfyUI/models/identity_heads/` and pick it in LoadResidualHead; "
            f"extract features with the same Qwen3-VL model and the photo crop `{fields['crop']}` "
            "(ExtractIdentityFeatures' `crop` input).\n\nThe same fields are in the file's safetensors metadata "
            "(`qwen_identity` JSON, key `card`).\n")


def save_head_with_card(head: ResidualHead, path: str | Path, *, steps: int | None = None,
                        persons: int | None = None, licence: str | None = None) -> Path:
    """Save the head (its metadata carrying the card's fields) and write its model card beside it, both
    atomically. Training code calls this wherever it saves a head."""
    fields = card_fields(head, steps=steps, persons=persons, licence=licence)
    head.meta.card = fields
    path = save_head(head, path) or Path(path)
    atomic_write_text(card_path(path), card_markdown(fields, Path(path).name))
    return Path(path)


__all__ = ["HEAD_SUFFIX", "LEGACY_HEAD_FILE", "head_file_name", "head_path", "find_head", "card_path", "card_fields",
           "card_markdown", "save_head_with_card"]
