"""`tune_head`: a personal residual head from one person's photos, through a frozen Denoiser.

The objective is the denoise objective's (training/denoise.py), written against the Denoiser contract
so that every model family tunes through the same code: for a photo x0 of the person, the conditioning is
its prompt embedding E plus α_train·R with R = head(combined features of the person's OTHER photos) - the
head never sees the photo it denoises, so what lowers the loss is what the photos share (the person),
not this photo's layout or lighting. The loss is the flow-matching velocity MSE (σ from the training
density, SD3 loss weighting), optionally face-weighted, plus, when tuning starts from a universal head,
a pull-back ‖R − R_init‖² / ‖R_init‖² that keeps the residual near what the universal head gives.

Held out: with ≥ 3 photos one (all its views) is never trained on; every `eval_every` steps its denoising
loss is measured at fixed (σ, ε) pairs (core/measurement/identity_gain.py's stratified σ and per-photo
seeded ε), and the head kept is the one of the lowest held-out loss. The own gain is that loss's drop
against the prompt alone; with impostors (other people's photos), the impostor gain is what the same
residual does to their photos: a head that carries this person helps their photo more than others'.

Deterministic for a seed on the CPU: the batch order, σ and ε of step s come from generators seeded by
(seed, epoch) and (seed, s), drawn on the CPU.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..denoising.aspect_buckets import bucket_batches
from ..denoising.flow_matching import condition_with_residual, loss_weighting, sample_sigmas
from ..errors import ModelMismatchError, UserInputError
from ..identity.features import combine_features
from ..measurement.identity_gain import fixed_noise, fixed_sigmas
from ..residual.head import HeadMeta, ResidualHead, check_head_hidden, describe_feature_width
from ..residual.injection import REFERENCE_RMS_KEY
from ..residual.length_policy import POLICY_NAME
from .data import PersonalData
from .objective import denoiser_losses, position_weights
from .options import HELD_OUT_AUTO, HELD_OUT_NONE, TuneOptions

OBJECTIVE = "personal"
MIN_PHOTOS_FOR_HELD_OUT = 3
IMPOSTOR_PHOTO_ID = 1_000_000  # fixed-noise ids of impostor photos (apart from the person's)


@dataclass
class TuneResult:
    head: ResidualHead                    # the kept head (lowest held-out loss), metadata objective "personal"
    metrics: dict[str, Any]
    history: list[float] = field(default_factory=list)   # training loss per step


def _mix(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (2**63 - 1)
    return h


def _generator(seed: int, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, *parts))


def _text_rms(data: PersonalData) -> float:
    """The mean RMS of the valid prompt tokens (the head's reference scale for InjectResidual's relative
    mode; computed as core/denoising/prompt_cache.py does)."""
    valid = torch.cat([e.float()[m.bool()] for e, m in zip(data.embeds, data.masks)])
    return float(valid.pow(2).mean(-1).sqrt().mean())


def _start_head(data: PersonalData, options: TuneOptions, init_head: ResidualHead | None) -> ResidualHead:
    d, h = data.feature_dim, data.hidden_size
    if init_head is None:
        return ResidualHead(d, options.tokens or 1, h, meta=HeadMeta(feature_dim=d, tokens=options.tokens or 1,
                                                                     hidden_size=h))
    if init_head.feature_dim != d:
        raise ModelMismatchError(
            f"the init head takes features of width D={init_head.feature_dim} "
            f"({describe_feature_width(init_head.feature_dim)}) but the photos' features have D={d} "
            f"({describe_feature_width(d)}): start from a head trained on this Qwen3-VL model, or from zero.")
    check_head_hidden(init_head, h)
    if options.tokens is not None and options.tokens != init_head.tokens:
        raise UserInputError(f"tokens K={options.tokens} differs from the init head's K={init_head.tokens}: leave "
                             "tokens unset (the init head's K is used) or start from zero.")
    head = ResidualHead(d, init_head.tokens, h, meta=copy.deepcopy(init_head.meta))
    head.load_state_dict({k: v.detach().float().cpu() for k, v in init_head.state_dict().items()})
    return head


def _held_out_photos(data: PersonalData, options: TuneOptions) -> list[int]:
    sources = data.source_ids()
    if options.held_out == HELD_OUT_NONE or (options.held_out == HELD_OUT_AUTO
                                             and len(sources) < MIN_PHOTOS_FOR_HELD_OUT):
        return []
    if options.held_out == HELD_OUT_AUTO:
        pick = sources[int(torch.randint(len(sources), (1,), generator=_generator(options.seed, 3)))]
    else:
        named = [i for i in range(len(data)) if data.name(i) == options.held_out]
        if not named:
            raise UserInputError(f"held-out photo {options.held_out!r} is not among the photos "
                                 f"({', '.join(data.names[:6])}{' ...' if len(data) > 6 else ''}).")
        if len(sources) < 2:
            raise UserInputError("a held-out photo needs at least two photos (one to train on).")
        pick = data.sources[named[0]]
    return [i for i in range(len(data)) if data.sources[i] == pick]


def _batches(train: list[int], data: PersonalData, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch: the training photos in seeded batches that never mix latent shapes (aspect buckets)."""
    shapes = [tuple(data.latents[i].shape) for i in train]
    return [[train[j] for j in b] for b in bucket_batches(shapes, batch_size, seed, epoch)]


def _pad_prompts(data: PersonalData, photos: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    s = max(int(data.embeds[i].shape[0]) for i in photos)
    e = torch.zeros(len(photos), s, data.hidden_size)
    m = torch.zeros(len(photos), s, dtype=torch.long)
    for r, i in enumerate(photos):
        n = int(data.embeds[i].shape[0])
        e[r, :n], m[r, :n] = data.embeds[i].float(), data.masks[i].long()
    return e.to(device), m.to(device)


class _Evaluator:
    """Denoising loss of photos at fixed (σ, ε) pairs, with and without a residual."""

    def __init__(self, denoiser, data: PersonalData, options: TuneOptions, id_offset: int = 0):
        self.denoiser, self.data, self.options, self.offset = denoiser, data, options, id_offset
        self.sigmas = fixed_sigmas(options.eval_pairs)

    @torch.no_grad()
    def losses(self, photos: list[int], residuals: torch.Tensor | None) -> list[float]:
        """Per photo mean loss over the pairs; residuals [len(photos), K, H] or None (the prompt alone)."""
        dev, pairs, out = self.denoiser.device, self.options.eval_pairs, []
        for r, i in enumerate(photos):
            x0 = self.data.latents[i].float()
            eps = fixed_noise(self.offset + i, pairs, x0.shape, self.options.seed).to(dev)
            e, m = _pad_prompts(self.data, [i] * pairs, dev)
            if residuals is not None:
                e = condition_with_residual(e, m, residuals[r].to(dev).float().expand(pairs, -1, -1),
                                            self.options.alpha_train)
            w = position_weights(None if self.data.face_maps is None else [self.data.face_maps[i]] * pairs,
                                 tuple(x0.shape[-2:]), self.options.face_weight, dev)
            loss = denoiser_losses(self.denoiser, x0.to(dev).expand(pairs, -1, -1, -1), eps, self.sigmas.to(dev),
                                   e, m, w)
            out.append(float(loss.double().mean()))
        return out


def tune_head(data: PersonalData, denoiser, options: TuneOptions, *, init_head: ResidualHead | None = None,
              progress: Callable[[int, int, float], None] | None = None,
              should_stop: Callable[[], bool] | None = None,
              impostors: PersonalData | None = None) -> TuneResult:
    """Tune a head on one person's photos (see the module docstring). `denoiser(x_t, σ, embeds, mask) -> v`
    is the model family's Denoiser; `progress(step, total, loss)` is called after every step and
    `should_stop()` before every step (True ends the run; the best head so far is returned)."""
    options.validate()
    if options.pull_back and init_head is None:
        raise UserInputError("pull_back pulls the head toward the head it starts from: give an init head, or "
                             "set pull_back to 0.")
    if impostors is not None and (impostors.feature_dim != data.feature_dim
                                  or impostors.hidden_size != data.hidden_size):
        raise UserInputError("the impostors' features or prompt embeddings have other widths than the person's: "
                             "encode them with the same models.")
    device = torch.device(getattr(denoiser, "device", "cpu"))
    head = _start_head(data, options, init_head).to(device).float()
    init = None
    if init_head is not None:
        init = copy.deepcopy(head).eval().requires_grad_(False)

    held = _held_out_photos(data, options)
    train = [i for i in range(len(data)) if i not in held]
    if not train:
        raise UserInputError("every photo is held out: nothing left to tune on.")
    cond = {i: combine_features(data.features[data.conditioning_photos(i, train)].float())
            for i in range(len(data))}
    person_features = combine_features(data.features[train].float())   # what the user's features will be

    evaluator = _Evaluator(denoiser, data, options)
    loss_none = evaluator.losses(held, None) if held else []

    def residual_for(photos: list[int], h: ResidualHead) -> torch.Tensor:
        return h(torch.stack([cond[i] for i in photos]).to(device)).float()

    def held_out_loss() -> float | None:
        if not held:
            return None
        was = head.training
        head.eval()
        with torch.no_grad():
            v = evaluator.losses(held, residual_for(held, head))
        head.train(was)
        return sum(v) / len(v)

    optimizer = torch.optim.Adam(head.parameters(), lr=options.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, options.lr_factor)
    history: list[float] = []
    evals: list[dict[str, float]] = []
    best = {"step": 0, "loss": held_out_loss(), "state": copy.deepcopy(head.state_dict())}
    if held:
        evals.append({"step": 0, "held_out_loss": best["loss"]})
    interval = options.eval_interval()
    step, epoch, queue, interrupted = 0, 0, [], False
    head.train()
    while step < options.steps:
        if should_stop is not None and should_stop():
            interrupted = True
            break
        if not queue:
            epoch += 1
            queue = _batches(train, data, options.batch_size, options.seed, epoch)
        batch = queue.pop(0)
        g = _generator(options.seed, 2, step)
        x0 = torch.stack([data.latents[i].float() for i in batch])
        sigmas = sample_sigmas(len(batch), g, options.weighting, shift=options.shift)
        noise = torch.randn(x0.shape, generator=g)
        e, m = _pad_prompts(data, batch, device)
        r = residual_for(batch, head)
        c = condition_with_residual(e, m, r, options.alpha_train)
        w = position_weights(None if data.face_maps is None else [data.face_maps[i] for i in batch],
                             tuple(x0.shape[-2:]), options.face_weight, device)
        losses = denoiser_losses(denoiser, x0.to(device), noise.to(device), sigmas.to(device), c, m, w)
        total = (losses * loss_weighting(sigmas, options.weighting).to(device)).mean()
        if init is not None and options.pull_back:
            with torch.no_grad():
                r0 = residual_for(batch, init)
            total = total + options.pull_back * (r - r0).pow(2).mean() / r0.pow(2).mean().clamp_min(1e-12)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        loss = float(losses.detach().mean())
        if not math.isfinite(loss):
            raise UserInputError(f"the loss became {loss} at step {step}: lower the learning rate (lr={options.lr}).")
        history.append(loss)
        if held and (step % interval == 0 or step == options.steps):
            v = held_out_loss()
            evals.append({"step": step, "held_out_loss": v})
            if v < best["loss"]:
                best = {"step": step, "loss": v, "state": copy.deepcopy(head.state_dict())}
        if progress is not None:
            progress(step, options.steps, loss)
    if held and interrupted and (not evals or evals[-1]["step"] != step):
        v = held_out_loss()
        evals.append({"step": step, "held_out_loss": v})
        if v < best["loss"]:
            best = {"step": step, "loss": v, "state": copy.deepcopy(head.state_dict())}
    if held:
        head.load_state_dict(best["state"])
    else:
        best = {"step": step, "loss": None}
    head.eval().requires_grad_(False)

    metrics: dict[str, Any] = {
        "objective": OBJECTIVE, "steps": options.steps, "steps_done": step, "interrupted": interrupted,
        "best_step": best["step"], "train_loss": history[-1] if history else None,
        "photos": len(data), "train_photos": [data.name(i) for i in train],
        "held_out_photos": [data.name(i) for i in held], REFERENCE_RMS_KEY: _text_rms(data),
        "held_out_loss": best["loss"], "held_out_loss_none": (sum(loss_none) / len(loss_none)) if held else None,
        "held_out_evals": evals, "eval_pairs": options.eval_pairs,
        "sigmas": [round(float(s), 6) for s in evaluator.sigmas]}
    if held:
        metrics["own_gain"] = metrics["held_out_loss_none"] - best["loss"]
        metrics["own_gain_relative"] = metrics["own_gain"] / metrics["held_out_loss_none"]
    if impostors is not None:
        imp_eval = _Evaluator(denoiser, impostors, options, IMPOSTOR_PHOTO_ID)
        photos = list(range(len(impostors)))
        with torch.no_grad():
            r = head(person_features.to(device)[None]).float().expand(len(photos), -1, -1)
        none = imp_eval.losses(photos, None)
        withr = imp_eval.losses(photos, r)
        ln = sum(none) / len(none)
        metrics.update({"impostor_photos": len(photos), "impostor_loss_none": ln,
                        "impostor_loss": sum(withr) / len(withr), "impostor_gain": ln - sum(withr) / len(withr),
                        "impostor_gain_relative": (ln - sum(withr) / len(withr)) / ln})
        if held:
            metrics["identity_gain_relative"] = metrics["own_gain_relative"] - metrics["impostor_gain_relative"]
    head.meta = _meta(head, data, options, init_head, metrics)
    return TuneResult(head.cpu(), metrics, history)


def _meta(head: ResidualHead, data: PersonalData, options: TuneOptions, init_head: ResidualHead | None,
          metrics: dict[str, Any]) -> HeadMeta:
    meta = copy.deepcopy(head.meta)
    meta.feature_dim, meta.tokens, meta.hidden_size = head.feature_dim, head.tokens, head.hidden_size
    meta.target = OBJECTIVE
    meta.length_policy = POLICY_NAME
    init = None
    if init_head is not None:
        m = init_head.meta
        init = {"target": m.target, "dataset_fingerprint": m.dataset_fingerprint,
                "objective": (m.training_args or {}).get("objective", m.target)}
    meta.training_args = {"objective": OBJECTIVE, **options.to_dict(), "tokens": head.tokens, "init_head": init}
    meta.metrics = {k: v for k, v in metrics.items() if k not in ("held_out_evals",)}
    return meta
