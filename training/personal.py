"""`qwen-identity tune`: a folder of one person's photos -> a personal head (core/tuning) through the
frozen Qwen-Image of the given folder, with the same set-up as `train --objective denoise` (its model
loaders, feature/latent/prompt caches and transformer preparation) and the model family's Denoiser.

Order (one big model in memory at a time): Qwen3-VL (features, with the chosen crop) is released, then
the VAE (latents and face boxes), then the text encoder (the prompt), and only then the transformer.

Photos keep their aspect ratio: each goes to the aspect bucket nearest its shape at about the pixel count
of `--resolution` (a sliver centre-cropped at most) and is encoded at that size. A photo smaller than its
bucket is refused (or upscaled with --allow-upscale). An unreadable photo among readable ones is skipped
with a warning naming it; no readable photo at all is an error. A single photo gets its mirror image as
the second view. A photo in which no face is found trains unweighted, with a warning.

Outputs, all written atomically (an interrupt never leaves a half-written file): the head
(`--out`, a .safetensors LoadResidualHead, InjectResidual, sweep and eval read as any head), its model
card `<head>.md`, `<head>.metrics.json` and `<head>.loss.png` beside it. Caches go to `--work-dir` (default:
`~/.cache/qwen-identity/tune`, or under `$XDG_CACHE_HOME`), keyed by content, model and settings. Ctrl-C stops after
the current step and keeps the best head so far (the second Ctrl-C aborts without writing).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.denoising.latent_cache import PhotoView, Resolution, latents_per_bucket, photo_buckets, vae_key
from ..core.errors import UserInputError
from ..core.files.atomic import atomic_write_json
from ..core.files.dataset_fingerprint import dataset_fingerprint, file_sha256
from ..core.residual.head import check_head_family, check_head_features, load_head
from ..core.residual.model_card import card_path, save_head_with_card
from ..core.tuning import PersonalData, TuneOptions, tune_head
from ..version import __version__
from .data import Identity, readable_photos
from .pipeline import TrainConfig

DEFAULT_PROMPT = "a photo of a person"
DEFAULT_RESOLUTION = "768x512"
DEFAULT_FACE_WEIGHT = 2.0


def default_work_dir() -> Path:
    """The user's cache folder (not beside the head: a models folder lists every .safetensors below it, and
    ComfyUI's head dropdown would offer the caches)."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen-identity" / "tune"


@dataclass
class PersonalRun:
    photo_dir: Path
    out: Path
    options: TuneOptions = field(default_factory=TuneOptions)
    train: TrainConfig | None = None        # models, feature settings (crop), device, dtype (seed_dirs unused)
    resolution: str = DEFAULT_RESOLUTION    # WxH: the pixel budget of the aspect buckets
    prompt: str = DEFAULT_PROMPT
    init_head: Path | None = None
    impostor_dir: Path | None = None
    allow_upscale: bool = False
    face_detector: str = "hog"
    gradient_checkpointing: bool = False
    fp8_storage: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    work_dir: Path | None = None
    overwrite: bool = False

    def metrics_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".metrics.json")

    def plot_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".loss.png")


def validate(run: PersonalRun) -> None:
    """Every check that needs no model, before anything loads or is written."""
    run.options.validate()
    Resolution.parse(run.resolution)
    if not run.prompt.strip():
        raise UserInputError("--prompt is empty: give the prompt the person is tuned under, e.g. "
                             f"{DEFAULT_PROMPT!r}.")
    if run.out.suffix != ".safetensors":
        raise UserInputError(f"--out {run.out}: a head is a .safetensors file; end the name with .safetensors.")
    if run.out.is_dir():
        raise UserInputError(f"--out {run.out} is a folder; give a file name such as {run.out / 'me_head.safetensors'}.")
    if run.out.exists() and not run.overwrite:
        raise UserInputError(f"{run.out} already exists. Pass --overwrite to replace it, or choose another --out.")
    for parent in run.out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserInputError(f"--out {run.out}: {parent} is a file, not a folder.")
            break
    if run.compile and run.fp8_storage:
        raise UserInputError("--compile and --fp8-storage do not combine (fp8 layerwise casting re-casts weights "
                             "inside the compiled blocks): drop one of them.")
    if run.options.pull_back and run.init_head is None:
        raise UserInputError("--pull-back keeps the head near the head it starts from: give --init-head too, or "
                             "drop --pull-back.")


def read_photos(folder: Path, warn: Callable[[str], None], what: str = "PHOTO_DIR") -> tuple[list[Path], list[str]]:
    """The readable photos of a folder (natural order) and their sha256; unreadable ones are skipped with a
    warning; none readable is an error. Nothing is modified."""
    from ..core.identity.prepare import IMAGE_SUFFIXES
    from ..core.identity.seed_dirs import natural_key

    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{what} {folder} is not a folder: give the folder that holds the person's photos.")
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise UserInputError(f"no photos in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}): put 3 to 20 photos "
                             "of the person there.")
    photos, hashes = readable_photos(files, warn)
    if not photos:
        raise UserInputError(f"none of the {len(files)} photo(s) in {folder} could be read: re-save them as PNG or JPEG.")
    return photos, hashes


def _buckets(views: list[PhotoView], res: Resolution, multiple: int, allow_upscale: bool) -> list[Resolution]:
    """The aspect bucket of each view (core/denoising/latent_cache.photo_buckets)."""
    return photo_buckets(views, res, multiple, allow_upscale, "--resolution")[1]


def _face_map(box, res: Resolution, latent: torch.Tensor) -> torch.Tensor | None:
    """A [1, h, w] map (1 inside the face box) at the latent's size, or None when no face was found."""
    left, top, right, bottom = (float(b) for b in box)
    if left < 0:
        return None
    h, w = latent.shape[-2:]
    sy, sx = h / res.height, w / res.width
    m = torch.zeros(1, h, w)
    r0, r1 = max(0, int(math.floor(top * sy))), min(h, int(math.ceil(bottom * sy)))
    c0, c1 = max(0, int(math.floor(left * sx))), min(w, int(math.ceil(right * sx)))
    if r1 <= r0 or c1 <= c0:
        return None
    m[:, r0:r1, c0:c1] = 1.0
    return m


def _encode(views, buckets, work: Path, qi_dir, family, device, dtype, want_faces, run: PersonalRun, say):
    """Latents (and face boxes) of each view at its bucket, through the family's VAE (cached)."""
    from ..core.runtime.devices import dtype_name
    from .denoise_pipeline import _model_key

    vae_src = {"model": _model_key(str(qi_dir / "vae")), "source": str(run.train.qwen_image_model)}
    state: dict[str, Any] = {}

    def load_vae():
        if "vae" not in state:
            state["vae"] = family.load_vae(qi_dir, device, dtype)
        return state["vae"]

    def face_embedder():
        if "faces" not in state:
            from ..core.measurement.face_similarity import FaceEmbedder

            state["faces"] = FaceEmbedder(detector=run.face_detector)
        return state["faces"]

    info = (lambda res: {"vae": vae_src, "resolution": str(res), "dtype": dtype_name(dtype)})
    latents, boxes = latents_per_bucket(views, buckets, work / "cache",
                                        lambda res: vae_key(vae_src, res, dtype_name(dtype)), load_vae, want_faces,
                                        face_embedder, run.allow_upscale, say, info_of=info)
    state.clear()
    return latents, boxes


def run_personal_tuning(run: PersonalRun, progress=None, say: Callable[[str], None] | None = None,
                        warn: Callable[[str], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> dict:
    """Tune and write the head, its metrics and loss plot; returns the metrics written."""
    from ..core.families import detect_family
    from ..core.files.out_dir_lock import OutDirLock
    from ..core.runtime.devices import dtype_name, resolve_dtype
    from ..core.denoising.compiled_training import check_compile, training_rope
    from ..core.denoising.prompt_cache import prompt_embeddings, prompt_key
    from .denoise_pipeline import _ViewIdentity, _check_memory_error, _load_transformer, _model_key
    from .pipeline import _features, _Models, start_run

    validate(run)
    run.out = Path(run.out)
    work = Path(run.work_dir) if run.work_dir else default_work_dir()
    cfg = replace(run.train, out_dir=work, tokens=run.options.tokens or 1)
    device, dist, say, warn, progress = start_run(cfg, say, warn, progress)
    if run.compile:
        check_compile(device, run.compile_backend)
    photos, hashes = read_photos(run.photo_dir, warn)
    impostor = read_photos(run.impostor_dir, warn, "--impostor-dir") if run.impostor_dir else None
    init = load_head(run.init_head) if run.init_head else None
    # the work folder is held before any model is resolved or loaded: a second run on it is refused at once
    with OutDirLock(work, allow_nested=True):
        models = _Models(cfg, device)
        qi_dir = models.qwen_image_dir()
        family = detect_family(qi_dir, "Qwen-Image model")
        if init is not None:
            check_head_family(init, family)
        dtype = resolve_dtype(cfg.dtype, device)
        res = Resolution.parse(run.resolution)
        views = [PhotoView(p, h) for p, h in zip(photos, hashes)]
        sources = list(range(len(views)))
        if len(views) == 1:
            warn(f"only one photo ({photos[0].name}): its mirror image is the other view the head is conditioned on; "
                 "3 or more photos give a held-out check and a better head.")
            views.append(PhotoView(photos[0], hashes[0], flip=True))
            sources.append(0)
        buckets = _buckets(views, res, family.size_multiple, run.allow_upscale)
        work.mkdir(parents=True, exist_ok=True)
        with OutDirLock(work):
            # 1. latents and face boxes (sizes are checked before any model loads)
            want_faces = run.options.face_weight > 0
            latents, boxes = _encode(views, buckets, work, qi_dir, family, device, dtype, want_faces, run, say)
            face_maps = None
            if want_faces:
                face_maps = [_face_map(b, r, lat) for b, r, lat in zip(boxes, buckets, latents)]
                for v, m in zip(views, face_maps):
                    if m is None and not v.flip:
                        warn(f"no face found in {v.path.name}: its loss is not face-weighted.")
            imp_latents = []
            if impostor:
                imp_views = [PhotoView(p, h) for p, h in zip(*impostor)]
                imp_latents, _ = _encode(imp_views, _buckets(imp_views, res, family.size_multiple, run.allow_upscale), work, qi_dir, family, device, dtype,
                                         False, run, say)
            # 2. features of every view (Qwen3-VL with the chosen crop, cached)
            person = Identity(run.photo_dir.name, run.photo_dir, photos, hashes, None)
            feats, feature_meta = _features(cfg, [_ViewIdentity(person, views)], models, dist, progress, say)
            models._vl = None
            if init is not None:
                for w in check_head_features(init, feature_meta):
                    warn(f"--init-head: {w}")
            # 3. the prompt (text encoder, cached)
            te_src = _model_key(str(qi_dir / "text_encoder"))
            embeds, mask, _ = prompt_embeddings([run.prompt], work / "cache",
                                                prompt_key(te_src, dtype_name(dtype), [run.prompt]),
                                                models.text_encoder, say)
            models.release()
            hidden = int(embeds.shape[-1])
            n = len(views)
            names = [v.path.name + (" (mirrored)" if v.flip else "") for v in views]
            data = PersonalData(latents, feats[0], [embeds[0]] * n, [mask[0]] * n, face_maps, names, sources)
            impostors = None
            if imp_latents:
                k = len(imp_latents)
                impostors = PersonalData(imp_latents, torch.zeros(k, data.feature_dim), [embeds[0]] * k, [mask[0]] * k,
                                         names=[p.name for p in impostor[0]])
            # 4. the transformer, frozen, as the family's Denoiser
            transformer = _load_transformer(qi_dir, device, dtype, hidden, run.gradient_checkpointing, run.fp8_storage,
                                            run.compile_backend if run.compile else None)
            bar = progress("tuning")

            def on_step(step: int, total: int, loss: float) -> None:
                bar(step, total)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss:.4g}")

            try:
                with training_rope(run.compile):
                    result = tune_head(data, family.denoiser(transformer), run.options, init_head=init,
                                       progress=on_step, should_stop=should_stop,
                                       impostors=impostors)
            except RuntimeError as e:
                _check_memory_error(e)
                raise
            finally:
                if hasattr(bar, "close"):
                    bar.close()
            del transformer
            head, metrics = result.head, dict(result.metrics)
            fingerprint = dataset_fingerprint([(run.photo_dir.name, hashes, run.prompt)])
            meta = head.meta
            meta.family = family.name
            meta.qwen3_vl_model = str(feature_meta.get("model_id") or cfg.qwen3_vl_model)
            meta.text_encoder_model = f"{Path(str(cfg.qwen_image_model)).name}/text_encoder"
            meta.feature_settings = {k: v for k, v in feature_meta.items()
                                     if k not in ("model_id", "feature_dim", "pack_version")}
            meta.base_prompt = run.prompt
            meta.dataset_fingerprint = fingerprint
            meta.pack_version = __version__
            init_info = None
            if run.init_head:
                init_info = {"name": Path(run.init_head).name, "sha256": file_sha256(run.init_head),
                             **(meta.training_args.get("init_head") or {})}
            meta.training_args.update({
                "init_head": init_info, "resolution": str(res), "buckets": sorted({str(b) for b in buckets}),
                "photos": len(photos), "qwen_image_model": str(cfg.qwen_image_model), "family": family.name,
                "crop": feature_meta.get("crop", cfg.feature_settings.get("crop")), "dtype": dtype_name(dtype),
                "gradient_checkpointing": run.gradient_checkpointing, "fp8_storage": run.fp8_storage})
            report = {**metrics, "head": str(run.out), "model_card": str(card_path(run.out)),
                      "photo_fingerprint": fingerprint, "family": family.name,
                      "qwen3_vl_model": meta.qwen3_vl_model, "qwen_image_model": str(cfg.qwen_image_model),
                      "init_head": init_info, "loss_history": result.history, "pack_version": __version__,
                      "training_args": meta.training_args}
            save_head_with_card(head, run.out, steps=int(metrics["steps_done"]), persons=1)
            atomic_write_json(run.metrics_path(), json.loads(json.dumps(report, default=str)))
            _plot(run.plot_path(), result.history, metrics)
        return report


def _plot(path: Path, history: list[float], metrics: dict) -> None:
    from .plots import write_loss_curve

    held = [None] * len(history)
    for e in metrics.get("held_out_evals") or []:
        if 1 <= e["step"] <= len(held):
            held[e["step"] - 1] = e["held_out_loss"]
    write_loss_curve(path, history, held, title="personal head: training loss and held-out loss", xlabel="step")
