"""The features -> inject -> sample -> grid loop of the offline pipeline (`sweep`, `demo`, and the parts
`eval` and training share).

Unit of work: `run_identities(identities, settings, out_dir)` does every given identity (one seed
directory each) and writes, per identity, `generations/<name>_alpha_grid.png` and
`generations/<name>_meta.json`; it returns one `IdentityResult` per identity. `merge_results(out_dir,
results)` then writes `generations/meta.json`, the run's index (shared settings once, and each
identity's grid and meta file). Nothing in `run_identities` depends on the other identities of the
run, so a list of identities can be split into chunks that run in separate processes or containers
(each calling `run_identities` on its chunk with the same settings) and merged once at the end;
`merge_results` with no `results` reads the per-identity meta files back from `out_dir`.

`Models` loads Qwen3-VL and Qwen-Image at most once each, only when needed (features found in the
feature cache load no Qwen3-VL), from a folder, a models-folder name or a hub id.
"""

from __future__ import annotations

import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import UserInputError
from ..files.atomic import atomic_write, atomic_write_json
from ..files.dataset_fingerprint import file_sha256
from ..files.images import comfy_to_pil, load_image
from ..generation import sampling
from ..generation.acceleration import speed_options
from ..generation.grid import make_grid
from ..generation.reference_rows import comparison_rows
from ..identity import qwen3vl as qwen3vl_loader
from ..identity.features import FeatureSettings, IdentityFeatures, extract_features, load_feature_cache, \
    save_feature_cache, settings_from_meta
from ..identity.seed_dirs import SeedDir
from ..families import find_family
from ..residual.head import ResidualHead, check_head_family, load_head
from ..residual.injection import inject_identity
from ..runtime.devices import resolve_device, resolve_dtype
from ..runtime.model_folders import model_dirs
from ..runtime.model_sources import hub_cache_dir, hub_token
from ..runtime.progress import tqdm_progress
from .cache_keys import feature_key, photo_hashes
from .defaults import DEFAULT_BASE_PROMPT, DEFAULT_NEGATIVE_PROMPT, DEFAULT_QWEN3_VL, DEFAULT_QWEN_IMAGE

GENERATIONS = "generations"
RUN_META = "meta.json"
FEATURE_CACHE = Path("cache") / "features.safetensors"
VERSION_PACKAGES = ("torch", "transformers", "diffusers", "accelerate", "safetensors", "pillow", "numpy")
Say = Callable[[str], None]


@dataclass
class RunSettings:
    """Everything one run applies to every identity (the seed's defaults for sampling and prompts)."""

    head: Path
    alphas: list[float]
    seeds: list[int]
    steps: int = sampling.DEFAULT_STEPS
    guidance: float = sampling.DEFAULT_CFG
    height: int = sampling.DEFAULT_HEIGHT
    width: int = sampling.DEFAULT_WIDTH
    max_batch: int = sampling.DEFAULT_MAX_BATCH
    fast: bool = False
    offload: str = "none"
    fp8_storage: bool = False
    strength_mode: str = "absolute"
    base_prompt: str = DEFAULT_BASE_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    qwen3_vl_model: str = DEFAULT_QWEN3_VL
    qwen_image_model: str = DEFAULT_QWEN_IMAGE
    single_view: bool = False
    device: str = "auto"
    dtype: str = "auto"
    hf_token: str | None = None
    cache_dir: str | None = None
    references: str = "off"   # "compare": the identity's photos as Qwen-Image 2.1 reference images, as grid rows
    extra_meta: dict = field(default_factory=dict)

    def public(self) -> dict:
        """What meta.json records (no token)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("hf_token", "cache_dir", "extra_meta")}
        out["head"] = str(self.head)
        return out


@dataclass
class IdentityResult:
    """One identity's outputs (JSON-ready through `to_json`)."""

    identity: str
    seed_dir: str
    grid: str
    meta: str
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from ...version import __version__

    out = {"python": platform.python_version(), "qwen-identity": __version__}
    for name in VERSION_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def release_memory() -> None:
    """Give freed tensors' memory back (between loading Qwen3-VL and Qwen-Image)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_unique_names(seed_dirs: Sequence[SeedDir]) -> None:
    """Outputs are named after the seed folder: two folders with one name would overwrite each other."""
    names = [d.name for d in seed_dirs]
    if len(set(names)) != len(names):
        raise UserInputError(f"two seed directories share a folder name ({', '.join(sorted(names))}); the outputs "
                             "are named after it (<name>_alpha_grid.png, <name>_eval_grid.png): rename one.")


class Models:
    """Qwen3-VL and the Qwen-Image pipeline, each loaded at most once, only when asked for."""

    def __init__(self, qwen3_vl_model: str = DEFAULT_QWEN3_VL, qwen_image_model: str = DEFAULT_QWEN_IMAGE,
                 device: str = "auto", dtype: str = "auto", hf_token: str | None = None, cache_dir: str | None = None,
                 offload: str = "none", fp8_storage: bool = False):
        self.qwen3_vl_model, self.qwen_image_model = qwen3_vl_model, qwen_image_model
        self.device = resolve_device(device)
        self.dtype_arg = dtype
        self.dtype = resolve_dtype(dtype, self.device)
        self.hf_token, self.cache_dir = hub_token(hf_token), hub_cache_dir(cache_dir)
        self.offload, self.fp8_storage = offload, fp8_storage
        self._vl = None
        self._qi = None
        self.timings: dict[str, float] = {}

    @classmethod
    def for_settings(cls, s: RunSettings) -> "Models":
        return cls(s.qwen3_vl_model, s.qwen_image_model, s.device, s.dtype, s.hf_token, s.cache_dir, s.offload,
                   s.fp8_storage)

    def qwen3vl(self):
        if self._vl is None:
            t = time.perf_counter()
            dirs = model_dirs("qwen3_vl")
            self._vl = qwen3vl_loader.load_qwen3vl(self.qwen3_vl_model, search_dirs=dirs,
                                                   download_dir=dirs[0] if dirs else None, token=self.hf_token,
                                                   cache_dir=self.cache_dir, device=self.device, dtype=self.dtype)
            self.timings["load_qwen3_vl_s"] = time.perf_counter() - t
        return self._vl

    def qwen_image(self):
        if self._qi is None:
            t = time.perf_counter()
            self._qi = sampling.load_qwen_image_pipeline(
                self.qwen_image_model, device=self.device, dtype=self.dtype, search_dirs=model_dirs("diffusers"),
                token=self.hf_token, cache_dir=self.cache_dir, offload=self.offload, fp8_storage=self.fp8_storage)
            self.timings["load_qwen_image_s"] = time.perf_counter() - t
        return self._qi

    def drop_qwen3vl(self) -> None:
        self._vl = None
        release_memory()

    def drop_qwen_image(self) -> None:
        self._qi = None
        release_memory()


def identity_features(seed_dirs: Sequence[SeedDir], settings: FeatureSettings, models: Models,
                      cache: Path | None = None, write_cache: bool = False) -> list[IdentityFeatures]:
    """Features of every identity (combined and per image, on the CPU): from the feature cache where an
    entry has the same photos, model, settings and dtype (`cache_keys.feature_key`), else extracted
    with Qwen3-VL (loaded only then); the new entries are added to the cache with `write_cache`."""
    cached: dict[str, IdentityFeatures] = {}
    if cache is not None and cache.is_file():
        try:
            cached = load_feature_cache(cache)
        except UserInputError:  # a damaged cache is recomputed
            cached = {}
    keys = [feature_key(models.qwen3_vl_model, settings, photo_hashes(sd.photos), models.dtype, model_dirs("qwen3_vl"))
            for sd in seed_dirs]
    todo = [i for i, k in enumerate(keys) if k not in cached]
    if todo:
        vl = models.qwen3vl()
        with tqdm_progress("features", unit="identity") as bar:
            for n, i in enumerate(todo):
                sd = seed_dirs[i]
                feats = extract_features(vl, [load_image(p) for p in sd.photos], settings,
                                         names=[str(p) for p in sd.photos],
                                         extra_meta={"seed_dir": str(sd.path), "name": sd.name,
                                                     "photos": [p.name for p in sd.photos]})
                feats.combined, feats.per_image = feats.combined.cpu(), feats.per_image.cpu()
                cached[keys[i]] = feats
                bar(n + 1, len(todo))
        if write_cache and cache is not None:
            save_feature_cache(cache, cached)
    elif cache is not None:
        print(f"using the Qwen3-VL features cached in {cache} (same photos, model, settings and dtype)",
              file=sys.stderr)
    return [cached[k] for k in keys]


def _head_summary(head: ResidualHead) -> dict:
    m = head.meta
    return {"feature_dim": m.feature_dim, "tokens": m.tokens, "hidden_size": m.hidden_size, "target": m.target,
            "base_prompt": m.base_prompt, "feature_settings": m.feature_settings,
            "trained_on": (m.metrics or {}).get("train_identity_names"),
            "validation_identities": (m.metrics or {}).get("val_identity_names")}


REFERENCE_MODES = ("off", "compare")   # sweep --references


def _sample_rows(bundle, positive, negative, head, feats, sd: SeedDir, settings: RunSettings, bar, warn):
    """(images, α per grid row, row labels or None) for one identity. references "off": one row per α (E + α·R).
    "compare" (Qwen-Image 2.1): the identity's photos as the model's own reference images, side by side with
    the head for the same seeds: a "references only" row, then "head" rows (one per α, no references), then
    "both" rows (references and E + α·R)."""
    def run(cond, neg):
        return sampling.sample(bundle, cond, neg, settings.seeds, steps=settings.steps, cfg=settings.guidance,
                               width=settings.width, height=settings.height, max_batch=settings.max_batch,
                               progress=bar, **speed_options(bundle, settings.fast)).images

    def injected(cond):
        out, warnings = inject_identity(cond, head, feats, settings.alphas, mode=settings.strength_mode)
        for w in warnings:
            warn(w)
        return out

    if settings.references == "off":
        return run(injected(positive), negative), settings.alphas, None
    photos = [load_image(p) for p in sd.photos]

    def encode_with_references():
        return (sampling.encode_text(bundle, settings.base_prompt, references=photos),
                sampling.encode_text(bundle, settings.negative_prompt, references=photos))

    return comparison_rows(run, injected(positive), negative, encode_with_references, injected, settings.alphas,
                           rows="compare")


def run_identities(identities: Sequence[SeedDir], settings: RunSettings, out_dir: Path,
                   models: Models | None = None, say: Say = print, warn: Say | None = None,
                   write_dir: Path | None = None) -> list[IdentityResult]:
    """For each identity: features -> residual -> E + α·R on the base prompt -> α × seed images -> grid PNG
    and meta JSON in OUT/generations. Independent per identity (see the module docstring). `write_dir`:
    where generations/ goes instead (a fan-out chunk's stage, core/fanout.py); the feature cache is OUT's."""
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    check_unique_names(identities)
    head_path = Path(settings.head)
    if not head_path.is_file():
        raise UserInputError(f"no head at {head_path}: pass --train to train one first, or --head FILE.")
    head = load_head(head_path)
    head_sha = file_sha256(head_path)
    models = models or Models.for_settings(settings)
    out_dir = Path(out_dir)

    t = time.perf_counter()
    feats_all = identity_features(identities, settings_from_meta(head.meta.feature_settings or {}), models,
                                  cache=out_dir / FEATURE_CACHE)
    models.drop_qwen3vl()
    timings = {"features_s": time.perf_counter() - t}
    bundle = models.qwen_image()
    timings.update(models.timings)
    family = find_family(getattr(bundle, "pipeline", bundle))
    if family is not None:
        check_head_family(head, family)
    positive = sampling.encode_text(bundle, settings.base_prompt)
    negative = sampling.encode_text(bundle, settings.negative_prompt)
    gen_dir = Path(write_dir or out_dir) / GENERATIONS
    results = []
    if settings.references not in REFERENCE_MODES:
        raise UserInputError(f"references must be one of {', '.join(REFERENCE_MODES)} (got {settings.references!r}).")
    for sd, feats in zip(identities, feats_all):
        t = time.perf_counter()
        with tqdm_progress(sd.name, unit="step") as bar:
            images, row_alphas, row_labels = _sample_rows(bundle, positive, negative, head, feats, sd, settings, bar,
                                                          warn)
        sampling_s = time.perf_counter() - t
        grid = make_grid(comfy_to_pil(images), row_alphas, settings.seeds, row_labels=row_labels)
        png, meta_path = gen_dir / f"{sd.name}_alpha_grid.png", gen_dir / f"{sd.name}_meta.json"
        meta = {
            "identity": sd.name, "seed_dir": str(sd.path), "photos": [p.name for p in sd.photos],
            "prompt": settings.base_prompt, "negative_prompt": settings.negative_prompt, "alphas": settings.alphas,
            "seeds": settings.seeds, "steps": settings.steps, "guidance": settings.guidance, "guidance_kind": "true_cfg",
            "height": settings.height, "width": settings.width, "max_batch": settings.max_batch,
            "strength_mode": settings.strength_mode, "references": settings.references,
            "qwen3_vl_model": settings.qwen3_vl_model,
            "qwen_image_model": settings.qwen_image_model, "head": str(head_path), "head_sha256": head_sha,
            "head_meta": _head_summary(head),
            "features": {k: v for k, v in feats.meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
            "device": str(bundle.device), "dtype": str(bundle.dtype).replace("torch.", ""),
            "timings": {**{k: round(v, 3) for k, v in timings.items()}, "sampling_s": round(sampling_s, 3),
                        "seconds_per_image": round(sampling_s / len(images), 3)},
            "versions": package_versions(), "grid": grid.meta, **settings.extra_meta,
        }
        atomic_write(png, lambda tmp: grid.image.save(tmp, format="PNG"))
        atomic_write_json(meta_path, meta)
        say(f"{sd.name}: {png} ({len(settings.alphas)} α × {len(settings.seeds)} seeds, {sampling_s:.1f}s)")
        results.append(IdentityResult(sd.name, str(sd.path), str(png), str(meta_path), round(sampling_s, 3)))
    return results


def merge_results(out_dir: Path, results: Sequence[IdentityResult] | None = None,
                  settings: RunSettings | None = None) -> Path:
    """Write OUT/generations/meta.json: the run's settings once and every identity's grid and meta file
    (from `results`, or, when None, every `<name>_meta.json` already in OUT/generations, e.g. written by
    other processes). Returns its path."""
    gen_dir = Path(out_dir) / GENERATIONS
    if results is None:
        results = []
        for meta_path in sorted(gen_dir.glob("*_meta.json")):
            m = json.loads(meta_path.read_text(encoding="utf-8"))
            results.append(IdentityResult(m["identity"], m["seed_dir"], str(gen_dir / f"{m['identity']}_alpha_grid.png"),
                                          str(meta_path), (m.get("timings") or {}).get("sampling_s", 0.0)))
    if not results:
        raise UserInputError(f"nothing to merge: no <identity>_meta.json in {gen_dir}.")
    first = json.loads(Path(results[0].meta).read_text(encoding="utf-8"))
    shared = settings.public() if settings is not None else {
        k: first.get(k) for k in ("prompt", "negative_prompt", "alphas", "seeds", "steps", "guidance", "height",
                                  "width", "strength_mode", "qwen3_vl_model", "qwen_image_model", "head",
                                  "head_sha256")}
    doc = {"run": shared, "head_meta": first.get("head_meta"), "versions": first.get("versions"),
           "identities": [r.to_json() for r in sorted(results, key=lambda r: r.identity)]}
    return atomic_write_json(gen_dir / RUN_META, doc)
