"""`qwen-identity train --objective denoise` end to end: seed dirs -> features, prompts, latents (all
cached) -> the head trained through the frozen Qwen-Image transformer -> head checkpoint + metrics.

Order (one big model in memory at a time): Qwen3-VL (features; captions when asked) is released, then
the text encoder (prompt embeddings), then the VAE (latents, face boxes); only then the transformer
loads. With warm caches only the transformer loads.

Data: each person needs at least two photos (the residual is computed from the OTHER photos of the
person than the target). A person with one photo is refused with a message, unless
`--single-photo flip`: then the mirrored photo is a second view (both its latent and its features come
from the mirror image), so each view conditions on the other.

Photos keep their aspect (`--aspect-buckets on`, the default): each is encoded at the aspect bucket
nearest its shape with about the pixel count of `--train-resolution` (core/denoising/aspect_buckets.py,
sides multiples of the model family's size multiple; one latent cache file per bucket), batches hold one
bucket, and the bucket list with photos per bucket goes to metrics.json and the head's training
arguments; `off` trains every photo at `--train-resolution` (one shape).

Held-out people (`--val-fraction`, split by person) are never trained on; after every epoch the
held-out denoising gain (core/measurement/identity_gain.py) is measured on their photos and written to
metrics.json (and the head's metadata). Outputs are the same files as the caption objective:
`checkpoints/<run name>_head.safetensors` and its model card `<run name>_head.md` (the same head format;
LoadResidualHead, InjectResidual, sweep and eval take it unchanged), `checkpoints/train_state.safetensors` (--resume), `metrics.json`,
`loss_curve.png`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.denoising.latent_cache import (PhotoView, Resolution, cache_path, face_token_weights, latents_for,
                                           latents_per_bucket, photo_buckets, vae_key)
from ..core.denoising.compiled_training import check_compile, compile_for_training, training_rope
from ..core.denoising.flow_matching import freeze_transformer
from ..core.families import detect_family
from ..core.denoising.prompt_cache import prompt_embeddings, prompt_key
from ..core.errors import ModelMismatchError, NotEnoughMemoryError, UserInputError
from ..core.files.atomic import atomic_write_json
from ..core.residual import model_card as cards
from ..core.residual.head import HeadMeta, ResidualHead, check_head_family, describe_text_width
from ..core.residual.injection import REFERENCE_RMS_KEY
from ..core.residual.length_policy import POLICY_NAME
from ..version import __version__
from . import checkpoint as ckpt
from .data import Identity, identities_fingerprint, load_identities, split_identities
from .denoise import (DenoiseData, DenoiseHistory, DenoiseLoopConfig, head_gain, make_optimizer, steps_per_epoch,
                      train_denoise)
from .distributed import shard_map
from .plots import write_loss_curve

CAPTION_SOURCES = ("template", "caption")
DEFAULT_TEMPLATE = "a photo of a person"
SINGLE_PHOTO = ("refuse", "flip")
ASPECT_BUCKETS = ("on", "off")
MEMORY_FLAGS = ("--batch-size 1 with --grad-accum N (same step, less memory)", "--gradient-checkpointing",
                "a smaller --train-resolution", "--dtype bf16")


@dataclass
class DenoiseOptions:
    loop: DenoiseLoopConfig = field(default_factory=DenoiseLoopConfig)
    resolution: str = "512x512"
    aspect_buckets: str = "on"         # on: each photo at the bucket nearest its aspect; off: all at `resolution`
    caption_source: str = "template"
    template: str = DEFAULT_TEMPLATE
    face_weight: float = 0.0          # 0: off; else the weight of face-box tokens (others 1)
    face_detector: str = "hog"
    single_photo: str = "refuse"
    allow_upscale: bool = False
    gradient_checkpointing: bool = False
    gain_pairs: int = 4
    offload: str = "none"
    fp8_storage: bool = False
    compile: bool = False             # regional torch.compile of the blocks (CUDA only)
    compile_backend: str = "inductor"  # tests: "aot_eager" exercises the same path on the CPU

    def validate(self) -> None:
        self.loop.validate()
        Resolution.parse(self.resolution)
        if self.caption_source not in CAPTION_SOURCES:
            raise UserInputError(f"--caption-source must be one of {', '.join(CAPTION_SOURCES)} (got {self.caption_source!r}).")
        if self.caption_source == "template" and not self.template.strip():
            raise UserInputError("--caption-template is empty: give the prompt every photo is conditioned on, "
                                 f"e.g. {DEFAULT_TEMPLATE!r}.")
        if self.single_photo not in SINGLE_PHOTO:
            raise UserInputError(f"--single-photo must be one of {', '.join(SINGLE_PHOTO)} (got {self.single_photo!r}).")
        if self.face_weight != 0 and not (self.face_weight >= 1) or self.face_weight == float("inf"):
            raise UserInputError(f"--face-weight must be 0 (off) or a number >= 1 (got {self.face_weight}).")
        if self.aspect_buckets not in ASPECT_BUCKETS:
            raise UserInputError(f"--aspect-buckets must be on or off (got {self.aspect_buckets!r}).")
        if self.gain_pairs < 1:
            raise UserInputError(f"--gain-pairs must be at least 1 (got {self.gain_pairs}).")
        if self.compile and self.fp8_storage:
            raise UserInputError(
                "--compile and --fp8-storage do not combine: fp8 layerwise casting re-casts each layer's weights "
                "inside the compiled blocks, which torch.compile (fullgraph) refuses. Drop one of them: --compile "
                "for speed on a large card, --fp8-storage for a 24 GB card.")
        if self.offload != "none":
            raise UserInputError(
                f"--offload {self.offload} is not supported with --objective denoise: backpropagation through "
                "offloading is not verified (group offload needs the weights back on the GPU during the backward). "
                "Use --fp8-storage (half the weight memory), --gradient-checkpointing, --batch-size 1 with "
                "--grad-accum, or a smaller --train-resolution.")

    def record(self) -> dict[str, Any]:
        """What the head's metadata records about the objective."""
        return {"objective": "denoise", "resolution": str(Resolution.parse(self.resolution)),
                "sigma_sampling": self.loop.sigma_sampling(), "alpha_train": self.loop.alpha_train,
                "caption_source": self.caption_source,
                "template": self.template if self.caption_source == "template" else None,
                "face_weight": self.face_weight, "single_photo": self.single_photo,
                "reg_weight": self.loop.reg_weight, "grad_accum": self.loop.grad_accum,
                "batch_size": self.loop.batch_size, "lr": self.loop.lr, "seed": self.loop.seed,
                "gradient_checkpointing": self.gradient_checkpointing,
                # only when on, so runs from before buckets existed (one resolution) still resume with off
                **({"aspect_buckets": "on"} if self.aspect_buckets == "on" else {}),
                # only when on, so runs from before the flag existed still resume (compile changes no result)
                **({"fp8_storage": True} if self.fp8_storage else {})}


def _model_key(source):
    from ..core.pipeline.cache_keys import model_key as key  # the offline caches' model identity (shared)

    return key(source)


def _views(identities: list[Identity], policy: str) -> list[list[PhotoView]]:
    out, single = [], []
    for ident in identities:
        views = [PhotoView(p, h) for p, h in zip(ident.photos, ident.photo_hashes)]
        if len(views) == 1:
            single.append(ident)
            if policy == "flip":
                views.append(PhotoView(views[0].path, views[0].sha256, flip=True))
        out.append(views)
    if single and policy == "refuse":
        names = ", ".join(str(i.path) for i in single[:5]) + (" ..." if len(single) > 5 else "")
        raise UserInputError(
            f"{len(single)} person(s) have only one photo ({names}). The denoise objective conditions each photo on "
            "the person's OTHER photos, so it needs at least two per person. Add photos, leave those people out, or "
            "pass --single-photo flip (the mirrored photo becomes the second view).")
    return out


class _ViewIdentity(Identity):
    """An identity whose photos are its views (mirrored ones included) for feature extraction."""

    def __init__(self, base: Identity, views: list[PhotoView]):
        super().__init__(base.name, base.path, [v.path for v in views], [v.key for v in views], base.caption_file_text)
        self._views = views

    def load_images(self, limit=None):
        return [v.load() for v in self._views[:limit]]


def _check_memory_error(e: BaseException) -> None:
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        raise NotEnoughMemoryError(
            "out of GPU memory during denoise training. Reduce memory with: " + "; ".join(MEMORY_FLAGS)
            + ". The last checkpoint is intact; rerun with --resume.") from None


def run_denoise_training(cfg, opts: DenoiseOptions, progress=None, say: Callable[[str], None] | None = None,
                         warn: Callable[[str], None] | None = None, stop_after_step: int | None = None) -> dict:
    """Train (or resume) a denoise head. `cfg` is training.pipeline.TrainConfig (data, models, out-dir,
    system settings); `opts` the denoise objective's own settings. Returns the metrics written."""
    from .pipeline import start_run, validate_config, writer_lock

    opts.validate()
    validate_config(replace(cfg, target="caption"))
    device, dist, say, warn, progress = start_run(cfg, say, warn, progress)
    if opts.compile:
        check_compile(device, opts.compile_backend)
    identities = load_identities(cfg.seed_dirs, single_view=False, warn=warn, progress=progress("photos"))
    views = _views(identities, opts.single_photo)
    if len(identities) < 2 and cfg.val_fraction > 0:
        warn("only one person: no held-out people, so no held-out denoising gain is measured.")
    with writer_lock(dist, cfg.out_dir):
        return _run(cfg, opts, identities, views, device, dist, progress, say, stop_after_step)


def _prepare(cfg, opts: DenoiseOptions, identities, views, device, dist, progress, say):
    from ..core.runtime.devices import dtype_name, resolve_dtype
    from .pipeline import _captions, _features, _Models

    res = Resolution.parse(opts.resolution)
    dtype = resolve_dtype(cfg.dtype, device)
    models = _Models(cfg, device)
    qi_dir = models.qwen_image_dir()
    cache_dir = cfg.out_dir / "cache"
    # 1. latents first (cheap checks of every photo's size happen before any model loads)
    vae_src = {"model": _model_key(str(qi_dir / "vae")), "source": str(cfg.qwen_image_model)}
    flat = [v for vs in views for v in vs]
    state: dict[str, Any] = {}

    def load_vae():
        if "vae" not in state:
            state["vae"] = detect_family(qi_dir, "Qwen-Image model").load_vae(qi_dir, device, dtype)
        return state["vae"]

    def face_embedder():
        if "faces" not in state:
            from ..core.measurement.face_similarity import FaceEmbedder

            state["faces"] = FaceEmbedder(detector=opts.face_detector)
        return state["faces"]

    def info(r: Resolution) -> dict[str, Any]:
        return {"vae": vae_src, "resolution": str(r), "dtype": dtype_name(dtype)}

    map_fn = (lambda items, fn: shard_map(dist, items, fn))
    buckets = None
    if opts.aspect_buckets == "on":  # each photo at the bucket nearest its aspect; one cache file per bucket
        family = detect_family(qi_dir, "Qwen-Image model")
        sizes, per_photo = photo_buckets(flat, res, family.size_multiple, opts.allow_upscale)
        latents, faces = latents_per_bucket(flat, per_photo, cache_dir, lambda r: vae_key(vae_src, r, dtype_name(dtype)),
                                            load_vae, opts.face_weight > 0, face_embedder, opts.allow_upscale, say,
                                            map_fn=map_fn, write=dist.is_main, info_of=info)
        buckets = (sizes, per_photo)
        faces = faces if opts.face_weight > 0 else None
    else:
        key = vae_key(vae_src, res, dtype_name(dtype))
        latents, faces = latents_for(flat, res, cache_path(cache_dir, key), key, load_vae, opts.face_weight > 0,
                                     face_embedder, opts.allow_upscale, say, map_fn=map_fn, write=dist.is_main,
                                     info=info(res))
    state.clear()
    if faces is not None:
        missing = [str(v.path) + (" (mirrored)" if v.flip else "") for v, b in zip(flat, faces) if float(b[0]) < 0]
        if missing:
            raise UserInputError(f"--face-weight: no face found in {len(missing)} photo(s) at {res}: "
                                 + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                                 + ". Remove those photos, use --face-detector cnn, or turn face weighting off "
                                   "(--face-weight 0).")
    # 2. features (Qwen3-VL, cached) and captions when asked
    vid = [_ViewIdentity(i, v) for i, v in zip(identities, views)]
    if opts.caption_source == "caption":
        captions, _ = _captions(cfg, vid, models, dist, progress, say)
        prompts = captions
    else:
        prompts = [opts.template] * len(identities)
    feats, feature_meta = _features(cfg, vid, models, dist, progress, say)
    models._vl = None
    # 3. prompt embeddings (text encoder, cached)
    te_src = _model_key(str(qi_dir / "text_encoder"))
    embeds, mask, rho = prompt_embeddings(prompts, cache_dir, prompt_key(te_src, dtype_name(dtype), prompts),
                                          models.text_encoder, say, write=dist.is_main)
    models.release()
    return res, dtype, qi_dir, latents, faces, feats, feature_meta, embeds, mask, rho, prompts, buckets


def _denoise_data(qi_dir, res: Resolution, latents, faces, buckets, views, feats, embeds, mask, names,
                  face_weight: float) -> DenoiseData:
    """All photos as DenoiseData: one packed tensor at one resolution, or (aspect buckets) a packed latent,
    shape and face-token weights per photo at its own bucket."""
    family = detect_family(qi_dir, "Qwen-Image model")
    person = [p for p, vs in enumerate(views) for _ in vs]
    view = [j for vs in views for j in range(len(vs))]
    if buckets is None:
        packed, shapes = family.pack_latents(latents)
        tw = None if faces is None else torch.stack([face_token_weights(b.tolist(), res, face_weight) for b in faces])
        return DenoiseData(packed, shapes[0], person, view, feats, embeds, mask, tw, names)
    per_photo = buckets[1]
    packs = [family.pack_latents(lat[None]) for lat in latents]
    shapes = [tuple(s[0]) for _, s in packs]
    tw = None if faces is None else [face_token_weights(b.tolist(), r, face_weight) for b, r in zip(faces, per_photo)]
    return DenoiseData([p[0] for p, _ in packs], shapes[0], person, view, feats, embeds, mask, tw, names, shapes)


def bucket_report(buckets, photos: list[int] | None = None) -> dict[str, Any]:
    """The bucket list and how many photos (of `photos`, default all) train at each, for metrics and the head."""
    sizes, per_photo = buckets
    chosen = [per_photo[i] for i in (range(len(per_photo)) if photos is None else photos)]
    return {"buckets": [str(s) for s in sizes],
            "photos_per_bucket": {str(s): n for s in sizes if (n := sum(1 for b in chosen if b == s))}}


def _load_transformer(qi_dir: Path, device, dtype, hidden: int, gradient_checkpointing: bool,
                      fp8_storage: bool = False, compile_backend: str | None = None):
    from ..core.runtime.model_sources import read_config

    family = detect_family(qi_dir, "Qwen-Image model")
    cfg = read_config(qi_dir / "transformer")
    width = family.transformer_text_width(cfg)
    if width != hidden:
        raise ModelMismatchError(
            f"{qi_dir}: its transformer takes text of width {width} ({describe_text_width(width)}) but its text "
            f"encoder (and the head) has H={hidden} ({describe_text_width(hidden)}): the folder mixes two Qwen-Image "
            "generations. Use a complete Qwen-Image folder.")
    try:   # fp8: stored fp8 as it loads (a 24 GB card never holds the bf16 weights)
        tr = family.load_transformer(qi_dir, device, dtype, torch.float8_e4m3fn if fp8_storage else None)
    except RuntimeError as e:
        _check_memory_error(e)
        raise
    return prepare_transformer(tr, device, dtype, gradient_checkpointing, fp8_storage, compile_backend)


def prepare_transformer(tr, device, dtype, gradient_checkpointing: bool = False, fp8_storage: bool = False,
                        compile_backend: str | None = None):
    """Frozen (no weight gradients), optionally per-block checkpointed, with fp8 weight storage (diffusers
    layerwise casting: weights stored float8_e4m3fn, each layer cast to `dtype` when it runs; the step
    reads that compute dtype, `flow_matching.compute_dtype_of`) and the blocks compiled with
    `compile_backend` (None: not compiled). Train a compiled one inside `training_rope()`."""
    if fp8_storage and not any(p.dtype == torch.float8_e4m3fn for p in tr.parameters()):  # (not loaded as fp8)
        tr.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    tr = freeze_transformer(tr, gradient_checkpointing)
    if compile_backend:
        compile_for_training(tr, device, compile_backend)
    return tr


def _run(cfg, opts, identities, views, device, dist, progress, say, stop_after_step) -> dict:
    (res, dtype, qi_dir, latents, faces, feats, feature_meta, embeds, mask, rho,
     prompts, buckets) = _prepare(cfg, opts, identities, views, device, dist, progress, say)
    d, h, k = int(feats[0].shape[-1]), int(embeds.shape[-1]), int(cfg.tokens)
    loop = opts.loop
    train_ids, val_ids = split_identities(len(identities), cfg.val_fraction, loop.seed)
    names = [i.name for i in identities]
    all_data = _denoise_data(qi_dir, res, latents, faces, buckets, views, feats, embeds, mask, names, opts.face_weight)
    person = all_data.person
    train_photos = [i for i, p in enumerate(person) if p in set(train_ids)]
    train = all_data.subset(train_photos)
    val = all_data.subset([i for i, p in enumerate(person) if p in set(val_ids)])
    bucket_info = None
    if buckets is not None:
        bucket_info = {**bucket_report(buckets), "train_photos_per_bucket": bucket_report(buckets, train_photos)[
            "photos_per_bucket"]}
        say("aspect buckets (photos): " + ", ".join(f"{b} ({n})" for b, n in bucket_info["photos_per_bucket"].items()))

    fingerprint = identities_fingerprint(identities, prompts)
    settings = {key: v for key, v in feature_meta.items() if key not in ("model_id", "feature_dim", "pack_version")}
    record = opts.record()
    training_args = {**record, "tokens": k, "val_fraction": cfg.val_fraction, "dtype": cfg.dtype,
                     "epochs": loop.epochs, "identities": names,
                     "held_out": [names[i] for i in val_ids],
                     **({"buckets": bucket_info["buckets"], "photos_per_bucket": bucket_info["photos_per_bucket"]}
                        if bucket_info else {})}
    meta = HeadMeta(feature_dim=d, tokens=k, hidden_size=h, feature_settings=settings,
                    qwen3_vl_model=str(feature_meta.get("model_id") or cfg.qwen3_vl_model),
                    text_encoder_model=f"{Path(str(cfg.qwen_image_model)).name}/text_encoder",
                    base_prompt=opts.template if opts.caption_source == "template" else "",
                    target="denoise", length_policy=POLICY_NAME, family=detect_family(qi_dir).name, training_args=training_args,
                    dataset_fingerprint=fingerprint, pack_version=__version__)
    run_identity = json.loads(json.dumps({"dataset_fingerprint": fingerprint, "D": d, "K": k, "H": h,
                                          "split": [train_ids, val_ids], "qwen3_vl_model": meta.qwen3_vl_model,
                                          "qwen_image_model": str(cfg.qwen_image_model),
                                          **{key: v for key, v in record.items()},
                                          **({"buckets": bucket_info["buckets"]} if bucket_info else {})},
                                         default=str))
    torch.manual_seed(loop.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    head = ResidualHead(d, k, h, meta=meta)
    optimizer = make_optimizer(head, loop)
    ckpt_dir = cfg.out_dir / "checkpoints"
    state_path, head_path = ckpt_dir / ckpt.STATE_FILE, cards.head_path(cfg.out_dir)
    start_step, history = 0, DenoiseHistory()
    dummy = torch.Generator()
    if cfg.resume:
        tensors, _, info = ckpt.load_train_state(state_path)
        saved = info.get("run", {})
        if saved.get("H") not in (None, h):
            raise ModelMismatchError(
                f"--resume: the head in {cfg.out_dir} has H={saved.get('H')} ({describe_text_width(saved.get('H'))}) "
                f"but {qi_dir} has text width {h} ({describe_text_width(h)}). Resume with the Qwen-Image model the run "
                "started with, or start over with --overwrite.")
        diff = sorted(key for key in set(saved) | set(run_identity) if saved.get(key) != run_identity.get(key))
        if diff:
            raise UserInputError(f"--resume: the run in {cfg.out_dir} was trained with other settings or data "
                                 f"({', '.join(diff)} differ). Resume with the same arguments, or start over with "
                                 "--overwrite or another --out-dir.")
        ckpt.restore(head, optimizer, dummy, tensors)
        history = DenoiseHistory.from_dict(info.get("history", {}))
        start_step = int(info.get("step", 0))
        say(f"resuming after optimizer step {start_step}")

    per_epoch = steps_per_epoch(train, loop)
    total_steps = per_epoch * loop.epochs

    def metrics_for(step: int, hist: DenoiseHistory) -> dict:
        last_gain = next((g for g in reversed(hist.gain) if g), None)
        return {REFERENCE_RMS_KEY: rho, "objective": "denoise", "epochs": step // max(1, per_epoch),
                "step": step, "train_loss": hist.train_loss[-1] if hist.train_loss else None,
                "held_out_gain": last_gain["overall"] if last_gain else None,
                "train_identities": len(train_ids), "val_identities": len(val_ids),
                "train_photos": len(train), "val_photos": len(val),
                **({"aspect_buckets": bucket_info} if bucket_info else {}),
                "history": {"train_loss": hist.train_loss,
                            "held_out_gain": [g["overall"] if g else None for g in hist.gain]}}

    def on_checkpoint(step: int, epoch: int, hist: DenoiseHistory, epoch_end: bool) -> None:
        if not dist.is_main:
            return
        m = metrics_for(step, hist)
        head.meta.metrics = {key: v for key, v in m.items() if key != "history"}
        ckpt.save_train_state(state_path, head, optimizer, dummy, epoch,
                              {"run": run_identity, "history": hist.to_dict(), "step": step})
        with ckpt.reporting_write_errors(head_path):
            cards.save_head_with_card(head, head_path, steps=step, persons=len(names))
        last_gain = next((g for g in reversed(hist.gain) if g), None)
        report = {**m, "held_out_gain_per_person": last_gain["per_person"] if last_gain else None,
                  "gain_settings": last_gain["settings"] if last_gain else None,
                  "identities": {n: {"split": "train" if i in train_ids else "held out",
                                     "photos": len(views[i]), "prompt": prompts[i]} for i, n in enumerate(names)},
                  "head": str(head_path), "pack_version": __version__, "training_args": training_args}
        with ckpt.reporting_write_errors(cfg.out_dir / "metrics.json"):
            atomic_write_json(cfg.out_dir / "metrics.json", report)
        if epoch_end:
            with ckpt.reporting_write_errors(cfg.out_dir / "loss_curve.png"):
                write_loss_curve(cfg.out_dir / "loss_curve.png", hist.train_loss, [None] * len(hist.train_loss))
            g = m["held_out_gain"]
            say(f"epoch {epoch}/{loop.epochs}: train loss {m['train_loss']:.6g}" + (
                f", held-out own gain {g['own_gain']:.4g}, impostor gain {g['impostor_gain']:.4g}, identity gain "
                f"{g['identity_gain']:.4g} (95% CI {g['identity_gain_ci95'][0]:.4g}..{g['identity_gain_ci95'][1]:.4g})"
                if g else ""))

    if start_step >= total_steps:
        say(f"nothing to do: {state_path} already finished --epochs {loop.epochs}. Raise --epochs to train longer.")
        mf = cfg.out_dir / "metrics.json"
        return json.loads(mf.read_text()) if dist.is_main and mf.is_file() else {}
    transformer = _load_transformer(qi_dir, device, dtype, h, opts.gradient_checkpointing, opts.fp8_storage,
                                    opts.compile_backend if opts.compile else None)
    try:
        with training_rope(opts.compile):  # spans the backward: checkpointing recomputes compiled blocks there
            history = train_denoise(head, transformer, train, val if len(val) else None, loop, optimizer=optimizer,
                                    start_step=start_step, history=history, dist=dist, device=device,
                                    gain_pairs=opts.gain_pairs, on_checkpoint=on_checkpoint,
                                    progress=progress("training"), stop_after_step=stop_after_step)
    except RuntimeError as e:
        _check_memory_error(e)
        raise
    dist.barrier()
    return metrics_for(min(total_steps, stop_after_step or total_steps), history) if dist.is_main else {}


def measure_head_gain(head, cfg, opts: DenoiseOptions, alpha: float, say: Callable[[str], None] | None = None,
                      progress=None) -> dict:
    """The held-out denoising gain of a trained head on the photos of `cfg.seed_dirs` (people it was not
    trained on), for `qwen-identity eval --denoise-gain`: every person's photos are the targets, their
    other photos give the own residual, the next person is the impostor. Caches go to cfg.out_dir/cache."""
    from ..core.runtime.devices import resolve_device
    from .distributed import LocalDist

    opts.validate()
    say = say or (lambda m: print(m, file=sys.stderr))
    progress = progress or (lambda name: (lambda done, total: None))
    cfg.out_dir = Path(cfg.out_dir)
    device = resolve_device(cfg.device)
    identities = load_identities(cfg.seed_dirs, single_view=False, warn=say, progress=progress("photos"))
    if len(identities) < 2:
        raise UserInputError("--denoise-gain needs at least two people (the impostor is another person): pass more "
                             "seed directories.")
    views = _views(identities, opts.single_photo)
    (res, dtype, qi_dir, latents, faces, feats, feature_meta, embeds, mask, rho,
     prompts, buckets) = _prepare(cfg, opts, identities, views, device, LocalDist(device), progress, say)
    if int(feats[0].shape[-1]) != head.feature_dim:
        raise ModelMismatchError(f"the Qwen3-VL features have D={int(feats[0].shape[-1])} but the head expects "
                                 f"D={head.feature_dim}: use the Qwen3-VL model the head was trained on "
                                 f"({head.meta.qwen3_vl_model or 'not recorded'}).")
    check_head_family(head, detect_family(qi_dir, "Qwen-Image model"))
    if int(embeds.shape[-1]) != head.hidden_size:
        raise ModelMismatchError(f"{qi_dir} has text width H={int(embeds.shape[-1])} "
                                 f"({describe_text_width(int(embeds.shape[-1]))}) but the head outputs "
                                 f"H={head.hidden_size} ({describe_text_width(head.hidden_size)}): use the Qwen-Image "
                                 "generation the head was trained for.")
    data = _denoise_data(qi_dir, res, latents, faces, buckets, views, feats, embeds, mask,
                         [i.name for i in identities], opts.face_weight)
    transformer = _load_transformer(qi_dir, device, dtype, int(embeds.shape[-1]), False)
    head = head.to(device).float()
    try:
        gain = head_gain(head, transformer, data, alpha, opts.gain_pairs, opts.loop.seed, device)
    except RuntimeError as e:
        _check_memory_error(e)
        raise
    gain["settings"].update({"resolution": str(res), "prompts": sorted(set(prompts)),
                             "face_weight": opts.face_weight, "aspect_buckets": opts.aspect_buckets,
                             **(bucket_report(buckets) if buckets is not None else {})})
    return gain
