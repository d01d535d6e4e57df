"""`qwen-identity train` end to end: seed dirs -> captions -> features -> targets -> head checkpoint.

Everything expensive is computed once and cached in the out-dir, keyed by content:
- `captions/<identity>.txt`: descriptions Qwen3-VL wrote (edit one and rerun to use your wording;
  delete it to have it written again). A `caption.txt` in the seed directory always wins.
- `cache/features.safetensors` (the feature-cache format of `qwen-identity extract`): one entry per
  identity keyed by `core.pipeline.cache_keys.feature_key` (photos' sha256, Qwen3-VL model, feature
  settings, dtype), the key `extract` and `sweep` use too.
- `cache/targets-<key>.safetensors`: the target residuals, keyed by `target_key` (text encoder, base
  prompt, composed prompts, K, length policy, dtype).
So a second run (or `--resume`) loads no model when nothing changed, and an epoch costs only the head.

Outputs: `checkpoints/<run name>_head.safetensors` (the head; the run name is the out-dir's name), its model
card `checkpoints/<run name>_head.md` (core/residual/model_card.py), `checkpoints/train_state.safetensors`
(for --resume), `metrics.json`, `loss_curve.png`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.files.atomic import atomic_write_json, atomic_write_text
from ..core.pipeline.cache_keys import feature_key, target_key
from ..core.pipeline.defaults import DEFAULT_BASE_PROMPT, DEFAULT_QWEN3_VL, DEFAULT_QWEN_IMAGE
from ..core.errors import UserInputError
from ..core.residual import model_card as cards
from ..core.residual.head import HeadMeta, ResidualHead
from ..core.files.out_dir_lock import OutDirLock
from ..core.residual.length_policy import POLICY_NAME
from ..core.residual.injection import REFERENCE_RMS_KEY
from ..core.residual.training_targets import Targets, caption_targets, compose_prompt, zero_targets
from ..version import __version__
from . import checkpoint as ckpt
from .data import Identity, identities_fingerprint, load_identities, split_identities
from .distributed import make_dist, shard_map
from .loop import History, LoopConfig, TensorData, make_optimizer, seed_everything, train_head
from .plots import write_loss_curve

Progress = Callable[[int, int], None]
ProgressFactory = Callable[[str], Progress]


@dataclass
class TrainConfig:
    seed_dirs: list[Path]
    out_dir: Path
    loop: LoopConfig = field(default_factory=LoopConfig)
    qwen3_vl_model: str = DEFAULT_QWEN3_VL
    qwen_image_model: str = DEFAULT_QWEN_IMAGE
    base_prompt: str = DEFAULT_BASE_PROMPT
    target: str = "caption"
    tokens: int = 1
    single_view: bool = False
    val_fraction: float = 0.2
    feature_settings: dict[str, Any] = field(default_factory=dict)  # FeatureSettings fields
    features_file: Path | None = None  # a `qwen-identity extract` output to take features from
    device: str = "auto"
    dtype: str = "auto"
    hf_token: str | None = None
    cache_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    distributed: str = "auto"  # auto | accelerate | off

    def training_args(self) -> dict[str, Any]:
        """What the head's metadata records: the arguments that shape the weights (no paths, no device)."""
        return {**asdict(self.loop), "target": self.target, "tokens": self.tokens, "single_view": self.single_view,
                "val_fraction": self.val_fraction, "dtype": self.dtype}


def validate_config(cfg: TrainConfig) -> None:
    """Every argument check that needs no model, before anything is loaded or written."""
    cfg.loop.validate()
    if cfg.target not in ("caption", "zero"):
        raise UserInputError(f"--target must be caption or zero (got {cfg.target!r}).")
    if cfg.tokens < 1 or cfg.tokens > 512:
        raise UserInputError(f"--tokens must be between 1 and 512 (got {cfg.tokens}).")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserInputError(f"--val-fraction must be in [0, 1) (got {cfg.val_fraction}).")
    if not cfg.base_prompt.strip():
        raise UserInputError("--base-prompt is empty: give the prompt the head will be used with.")
    out = Path(cfg.out_dir)
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserInputError(f"--out-dir {out}: {parent} is a file, not a folder. Choose another --out-dir.")
            break
    state = out / "checkpoints" / ckpt.STATE_FILE
    head_file = cards.find_head(out) or cards.head_path(out)
    if not cfg.resume and not cfg.overwrite and (state.exists() or head_file.exists()):
        raise UserInputError(f"{out} already holds a trained head ({head_file}). Pass --resume to continue that "
                             "training, --overwrite to start over (it replaces the checkpoint), or another --out-dir.")
    if cfg.resume and not state.is_file():
        raise UserInputError(f"--resume: no training state at {state}; run without --resume to start training.")


def _text_encoder_hidden(qwen_image_dir: Path) -> int:
    from ..core.runtime.model_sources import read_config

    cfg = read_config(qwen_image_dir / "text_encoder")
    return int((cfg.get("text_config") or {}).get("hidden_size") or cfg["hidden_size"])


class _Models:
    """Loads Qwen3-VL and the text encoder only when a cache misses, at most once."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self._vl = None
        self._te = None
        self._qi_dir: Path | None = None

    def _search(self, key: str):
        from ..core.runtime.model_folders import model_dirs

        return model_dirs(key)

    def qwen3vl(self):
        if self._vl is None:
            from ..core.identity.qwen3vl import load_qwen3vl

            self._vl = load_qwen3vl(self.cfg.qwen3_vl_model, search_dirs=self._search("qwen3_vl"),
                                    token=self.cfg.hf_token, cache_dir=self.cfg.cache_dir, device=self.device,
                                    dtype=self.cfg.dtype)
        return self._vl

    def qwen_image_dir(self) -> Path:
        if self._qi_dir is None:
            from ..core.runtime.model_sources import resolve_model_dir

            self._qi_dir = resolve_model_dir(self.cfg.qwen_image_model, search_dirs=self._search("diffusers"),
                                             token=self.cfg.hf_token, cache_dir=self.cfg.cache_dir,
                                             what="Qwen-Image model")
        return self._qi_dir

    def text_encoder(self):
        if self._te is None:
            from ..core.runtime.devices import resolve_dtype
            from ..core.generation.prompt_encoding import load_text_encoder

            self._te = load_text_encoder(self.qwen_image_dir(), device=self.device,
                                         dtype=resolve_dtype(self.cfg.dtype, self.device))
        return self._te

    def family_name(self, hidden_size: int) -> str:
        """The model family the head is for (core/families/): read off the Qwen-Image folder when it is at
        hand (resolved already, or a local folder), else from the text width (nothing is downloaded for it)."""
        from ..core.families import family_of_width, find_family

        folder = self._qi_dir or (Path(str(self.cfg.qwen_image_model)) if self.cfg.qwen_image_model else None)
        known = find_family(Path(folder)) if folder is not None and Path(folder).is_dir() else None
        known = known or family_of_width(hidden_size)
        return known.name if known else ""

    def release(self):
        self._vl = self._te = None


def _captions(cfg: TrainConfig, identities: list[Identity], models: _Models, dist, progress: ProgressFactory,
              say: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """(caption per identity, where it came from). caption.txt wins; else out-dir/captions/<name>.txt; else Qwen3-VL."""
    folder = cfg.out_dir / "captions"
    captions: list[str | None] = []
    sources: list[str] = []
    for ident in identities:
        saved = folder / f"{ident.name}.txt"
        if ident.caption_file_text:
            captions.append(ident.caption_file_text)
            sources.append(f"{ident.path / 'caption.txt'}")
        elif saved.is_file() and saved.read_text(encoding="utf-8").strip():
            captions.append(saved.read_text(encoding="utf-8").strip())
            sources.append(f"{saved} (written earlier)")
        else:
            captions.append(None)
            sources.append("")
    todo = [i for i, c in enumerate(captions) if c is None]
    if todo:
        from ..core.identity.captioning import MAX_CAPTION_PHOTOS, write_caption

        say(f"Qwen3-VL is describing {len(todo)} identit{'y' if len(todo) == 1 else 'ies'} without caption.txt")
        bundle = models.qwen3vl()
        bar = progress("captions")
        done = [0]

        def one(_, i):
            text = write_caption(bundle.model, bundle.processor, identities[i].load_images(MAX_CAPTION_PHOTOS),
                                 name=str(identities[i].path))
            done[0] += 1
            bar(done[0], len(todo))
            return text

        written = shard_map(dist, todo, one)
        for i, text in zip(todo, written):
            captions[i] = text
            saved = folder / f"{identities[i].name}.txt"
            sources[i] = f"{saved} (written by {cfg.qwen3_vl_model})"
            if dist.is_main:
                with ckpt.reporting_write_errors(saved):
                    atomic_write_text(saved, text + "\n")
    return [c or "" for c in captions], sources


def _dtype(cfg: TrainConfig, device):
    from ..core.runtime.devices import resolve_dtype

    return resolve_dtype(cfg.dtype, device)


def _features(cfg: TrainConfig, identities: list[Identity], models: _Models, dist, progress: ProgressFactory,
              say: Callable[[str], None]) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Per-identity per-image features [n_i, D] (cached) and the features' metadata."""
    from ..core.identity.features import FeatureSettings, extract_features, load_feature_cache, save_feature_cache

    settings = FeatureSettings(**cfg.feature_settings)
    path = cfg.out_dir / "cache" / "features.safetensors"
    cached = load_feature_cache(path) if path.is_file() else {}
    keys = [feature_key(cfg.qwen3_vl_model, settings, ident.photo_hashes, _dtype(cfg, models.device),
                        models._search("qwen3_vl")) for ident in identities]
    if cfg.features_file:
        _adopt_extracted(cfg, settings, identities, keys, cached, say)
    todo = [i for i, k in enumerate(keys) if k not in cached]
    if todo:
        say(f"extracting Qwen3-VL features of {sum(len(identities[i].photos) for i in todo)} photos "
            f"({len(todo)} identities; cached afterwards)")
        bundle = models.qwen3vl()
        bar = progress("features")
        done = [0]

        def one(_, i):
            feats = extract_features(bundle, identities[i].load_images(), settings,
                                     names=[str(p) for p in identities[i].photos])
            feats.per_image, feats.combined = feats.per_image.cpu(), feats.combined.cpu()
            done[0] += 1
            bar(done[0], len(todo))
            return feats

        for i, feats in zip(todo, shard_map(dist, todo, one)):
            cached[keys[i]] = feats
        if dist.is_main:
            with ckpt.reporting_write_errors(path):
                save_feature_cache(path, cached)
    out = [cached[k].per_image.float() for k in keys]
    meta = dict(cached[keys[0]].meta)
    meta.pop("n_images", None)
    return out, meta


def _adopt_extracted(cfg: TrainConfig, settings, identities: list[Identity], keys: list[str], cached: dict,
                     say: Callable[[str], None]) -> None:
    """Take features from a `qwen-identity extract` file: its entries carry the same content keys, so an
    entry is used exactly when it was made from the same photos, model, settings and dtype."""
    from ..core.identity.features import load_feature_cache

    extracted = load_feature_cache(cfg.features_file)
    used = 0
    for ident, key in zip(identities, keys):
        if key in cached:
            continue
        if key in extracted:
            cached[key] = extracted[key]
            used += 1
        else:
            say(f"not using {cfg.features_file} for {ident.path}: no entry for these photos with this model, "
                "these settings and this dtype; extracting again")
    say(f"using features of {used} identit{'y' if used == 1 else 'ies'} from {cfg.features_file}")


def _targets(cfg: TrainConfig, identities: list[Identity], captions: list[str], models: _Models, dist,
             say: Callable[[str], None]) -> Targets:
    if cfg.target == "zero":
        return zero_targets(len(identities), cfg.tokens, _text_encoder_hidden(models.qwen_image_dir()),
                            cfg.base_prompt)
    prompts = [compose_prompt(cfg.base_prompt, c) for c in captions]
    key = target_key(cfg.qwen_image_model, cfg.base_prompt, prompts, cfg.tokens, POLICY_NAME,
                     _dtype(cfg, models.device), models._search("diffusers"))
    path = cfg.out_dir / "cache" / f"targets-{key}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
            if t["residuals"].shape[0] == len(identities) and "text_token_rms" in t:
                return Targets(t["residuals"], t["mask"].bool(), prompts, float(t["text_token_rms"][0]))
        except Exception:  # a damaged cache is recomputed
            pass
    say(f"encoding {len(prompts) + 1} prompts with Qwen-Image's text encoder (cached afterwards)")
    te, tok = models.text_encoder()
    targets = caption_targets(te, tok, cfg.base_prompt, captions, cfg.tokens)
    if dist.is_main:
        ckpt.save_tensors(path, {"residuals": targets.residuals.contiguous(), "mask": targets.mask.to(torch.uint8),
                                 "text_token_rms": torch.tensor([targets.text_token_rms], dtype=torch.float64)},
                          {"prompts": json.dumps(prompts)})
    return targets


def _stack(ids: list[int], feats: list[torch.Tensor], targets: Targets) -> TensorData:
    if not ids:
        d, (k, h) = feats[0].shape[-1], targets.residuals.shape[1:]
        return TensorData(torch.zeros(0, d), torch.zeros(0, k, h), torch.zeros(0, k, dtype=torch.bool))
    f = torch.cat([feats[i] for i in ids])
    counts = [feats[i].shape[0] for i in ids]
    t = torch.cat([targets.residuals[i].expand(n, -1, -1) for i, n in zip(ids, counts)])
    m = torch.cat([targets.mask[i].expand(n, -1) for i, n in zip(ids, counts)])
    return TensorData(f.contiguous(), t.contiguous(), m.contiguous())


def _finite_or_none(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def run_training(cfg: TrainConfig, progress: ProgressFactory | None = None,
                 say: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) a head; returns the metrics written to metrics.json."""
    validate_config(cfg)
    device, dist, say, warn, progress = start_run(cfg, say, warn, progress)
    identities = load_identities(cfg.seed_dirs, single_view=cfg.single_view, warn=warn,
                                 progress=progress("photos"))
    train_ids, val_ids = split_identities(len(identities), cfg.val_fraction, cfg.loop.seed)
    with writer_lock(dist, cfg.out_dir):
        return _train(cfg, identities, train_ids, val_ids, device, dist, progress, say)


def start_run(cfg: TrainConfig, say, warn, progress):
    """What every training objective sets up first: default say/warn/progress, the device (the launcher's
    for this process under accelerate/torchrun), the data-parallel view, and one voice under a launcher.
    Returns (device, dist, say, warn, progress)."""
    from ..core.runtime.devices import resolve_device

    say = say or (lambda m: print(m, file=sys.stderr))
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    progress = progress or (lambda name: (lambda done, total: None))
    cfg.out_dir = Path(cfg.out_dir)
    device = resolve_device(cfg.device)
    dist = make_dist(device, cfg.distributed)
    if dist.device is not None and device.type != "cpu":
        device = dist.device
    if not dist.is_main:  # one voice under a multi-process launcher
        say, warn, progress = (lambda m: None), (lambda m: None), (lambda name: (lambda done, total: None))
    return device, dist, say, warn, progress


def writer_lock(dist, out_dir: Path):
    """The out-dir lock for the one writing process; other processes of a launcher only compute."""
    return OutDirLock(out_dir) if dist.is_main else contextlib.nullcontext()


def _train(cfg: TrainConfig, identities: list[Identity], train_ids: list[int], val_ids: list[int], device, dist,
           progress: ProgressFactory, say: Callable[[str], None]) -> dict:
    models = _Models(cfg, device)

    if cfg.target == "caption":
        captions, caption_sources = _captions(cfg, identities, models, dist, progress, say)
    else:
        captions, caption_sources = [""] * len(identities), [""] * len(identities)
    feats, feature_meta = _features(cfg, identities, models, dist, progress, say)
    targets = _targets(cfg, identities, captions, models, dist, say)
    models.release()
    d, (k, h) = int(feats[0].shape[-1]), targets.residuals.shape[1:]
    train, val = _stack(train_ids, feats, targets), _stack(val_ids, feats, targets)
    fingerprint = identities_fingerprint(identities, captions if cfg.target == "caption" else None)

    settings = {key: v for key, v in feature_meta.items() if key not in ("model_id", "feature_dim", "pack_version")}
    meta = HeadMeta(feature_dim=d, tokens=int(k), hidden_size=int(h), feature_settings=settings,
                    qwen3_vl_model=str(feature_meta.get("model_id") or cfg.qwen3_vl_model),
                    text_encoder_model=f"{Path(str(cfg.qwen_image_model)).name}/text_encoder",
                    base_prompt=cfg.base_prompt, target=cfg.target, length_policy=POLICY_NAME,
                    family=models.family_name(int(h)), training_args=cfg.training_args(), dataset_fingerprint=fingerprint, pack_version=__version__)
    run_identity = {"dataset_fingerprint": fingerprint, "D": d, "K": int(k), "H": int(h), "target": cfg.target,
                    "base_prompt": cfg.base_prompt, "qwen3_vl_model": meta.qwen3_vl_model,
                    "split": [train_ids, val_ids],
                    **{key: v for key, v in cfg.training_args().items() if key != "epochs"}}

    generator = seed_everything(cfg.loop.seed)
    head = ResidualHead(d, int(k), int(h), meta=meta)
    optimizer = make_optimizer(head, cfg.loop)
    ckpt_dir = cfg.out_dir / "checkpoints"
    state_path, head_path = ckpt_dir / ckpt.STATE_FILE, cards.head_path(cfg.out_dir)
    start_epoch, history = 0, History()
    if cfg.resume:
        tensors, start_epoch, info = ckpt.load_train_state(state_path)
        saved = info.get("run", {})
        diff = sorted(key for key in set(saved) | set(run_identity) if saved.get(key) != json.loads(
            json.dumps(run_identity.get(key), default=str)))
        if diff:
            raise UserInputError(f"--resume: the run in {cfg.out_dir} was trained with other settings or data "
                                 f"({', '.join(diff)} differ). Resume with the same arguments, or start over with "
                                 "--overwrite or another --out-dir.")
        ckpt.restore(head, optimizer, generator, tensors)
        history = History.from_dict(info.get("history", {}))
        if start_epoch >= cfg.loop.epochs:
            say(f"nothing to do: {state_path} already finished epoch {start_epoch} of --epochs {cfg.loop.epochs}. "
                "Raise --epochs to train longer.")
            metrics_file = cfg.out_dir / "metrics.json"
            return json.loads(metrics_file.read_text()) if dist.is_main and metrics_file.is_file() else {}
        say(f"resuming after epoch {start_epoch} of {cfg.loop.epochs}")

    n_train_views, n_val_views = len(train), len(val)

    def metrics_for(epoch: int, hist: History) -> dict:
        rho = {} if targets.text_token_rms is None else {REFERENCE_RMS_KEY: targets.text_token_rms}
        return {**rho, "epochs": epoch, "train_loss": hist.train_loss[-1] if hist.train_loss else None,
                "val_loss": _finite_or_none(hist.val_loss[-1]) if hist.val_loss else None,
                "train_identities": len(train_ids), "val_identities": len(val_ids),
                "train_identity_names": [identities[i].name for i in train_ids],
                "val_identity_names": [identities[i].name for i in val_ids],
                "train_photos": n_train_views, "val_photos": n_val_views,
                "history": {"train_loss": hist.train_loss, "val_loss": [_finite_or_none(v) for v in hist.val_loss]}}

    def on_epoch_end(epoch: int, hist: History) -> None:
        if not dist.is_main:
            return
        m = metrics_for(epoch, hist)
        head.meta.metrics = {key: v for key, v in m.items() if key != "history"}
        head.meta.training_args = {**cfg.training_args(), "epochs": epoch}
        ckpt.save_train_state(state_path, head, optimizer, generator, epoch,
                              {"run": run_identity, "history": hist.to_dict()})
        with ckpt.reporting_write_errors(head_path):
            cards.save_head_with_card(head, head_path, persons=len(identities))
        report = {**m, "identities": {ident.name: {"split": "train" if i in train_ids else "validation",
                                                   "photos": len(ident.photos), "caption": captions[i] or None,
                                                   "caption_source": caption_sources[i] or None}
                                      for i, ident in enumerate(identities)},
                  "head": str(head_path), "pack_version": __version__, "training_args": cfg.training_args()}
        with ckpt.reporting_write_errors(cfg.out_dir / "metrics.json"):
            atomic_write_json(cfg.out_dir / "metrics.json", report)
        with ckpt.reporting_write_errors(cfg.out_dir / "loss_curve.png"):
            write_loss_curve(cfg.out_dir / "loss_curve.png", hist.train_loss, hist.val_loss)
        say(f"epoch {epoch}/{cfg.loop.epochs}: train loss {m['train_loss']:.6g}"
            + (f", validation loss {m['val_loss']:.6g}" if m["val_loss"] is not None else ""))

    train_head(head, train, val if len(val) else None, cfg.loop, optimizer=optimizer, generator=generator,
               start_epoch=start_epoch, history=history, dist=dist, device=device,
               on_epoch_end=on_epoch_end, progress=progress("training"))
    dist.barrier()
    return metrics_for(cfg.loop.epochs, history) if dist.is_main else {}
