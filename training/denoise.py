"""The denoise objective's training loop on tensors: the head learns through the frozen Qwen-Image.

One sample is one photo x0 of person p. Its conditioning is the person's prompt embedding E_p plus
α_train · R, where R = head(combined Qwen3-VL features of p's OTHER photos): the head never sees the
photo it is asked to help denoise, so what lowers the loss is what the other photos share with this one
(the identity), not this photo's layout. The loss is the flow-matching velocity MSE
(`core/denoising/flow_matching.py`, diffusers' Qwen-Image recipe) with optional face-region token
weights, plus `reg_weight` · mean(R²) (a magnitude regulariser).

Determinism and resume: nothing random depends on state carried between steps. Epoch e's order is
`randperm` from a generator seeded by (seed, e); the σ and ε of optimizer step s come from a generator
seeded by (seed, s) and are drawn for the whole step (all processes draw the same and take their share).
With aspect buckets (`DenoiseData.shapes`), epoch e's batches come from `bucket_batches` (seeded by
(seed, e); a batch holds one bucket) and a step is grad_accum of them; ε is drawn per micro-batch at its
bucket's shape, still from the step's generator, so the same holds.
So a run resumed at any optimizer step continues bit-identically on the CPU, given the head and Adam
state from the checkpoint, and 1 or N processes compute the same step (gradients are summed over
processes, then divided by the step's sample count).

Gradient accumulation: an optimizer step covers batch_size · grad_accum photos, computed batch_size at
a time; the result equals one big batch up to float summation order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..core.denoising.flow_matching import (WEIGHTINGS, condition_with_residual, flow_matching_loss,
                                            loss_weighting, sample_sigmas)
from ..core.errors import UserInputError
from ..core.identity.features import combine_features


def _mix(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (2**63 - 1)
    return h


@dataclass
class DenoiseLoopConfig:
    epochs: int = 3
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-3
    seed: int = 123
    alpha_train: float = 1.0
    weighting: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    reg_weight: float = 0.0
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: at epoch ends only)

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserInputError(f"--epochs must be at least 1 (got {self.epochs}).")
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size must be at least 1 (got {self.batch_size}).")
        if self.grad_accum < 1:
            raise UserInputError(f"--grad-accum must be at least 1 (got {self.grad_accum}).")
        if not (self.lr > 0) or self.lr == float("inf"):
            raise UserInputError(f"--lr must be a positive number (got {self.lr}).")
        if self.weighting not in WEIGHTINGS:
            raise UserInputError(f"--weighting must be one of {', '.join(WEIGHTINGS)} (got {self.weighting!r}).")
        if not (self.alpha_train > 0) or self.alpha_train == float("inf"):
            raise UserInputError(f"--alpha-train must be a positive number (got {self.alpha_train}).")
        if not (self.logit_std > 0):
            raise UserInputError(f"--logit-std must be positive (got {self.logit_std}).")
        if not (self.shift > 0):
            raise UserInputError(f"--shift must be positive (got {self.shift}).")
        if not (self.reg_weight >= 0) or self.reg_weight == float("inf"):
            raise UserInputError(f"--reg-weight must be a non-negative number (got {self.reg_weight}).")
        if self.checkpoint_every < 0:
            raise UserInputError(f"--checkpoint-every must be 0 or more (got {self.checkpoint_every}).")

    def sigma_sampling(self) -> dict[str, Any]:
        return {"weighting": self.weighting, "logit_mean": self.logit_mean, "logit_std": self.logit_std,
                "mode_scale": self.mode_scale, "shift": self.shift, "table": "1000-step training table"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DenoiseData:
    """Packed latents of every photo, whom each shows, and per-person conditioning.

    One resolution: `latents` is one tensor [M, N, 4C] and `img_shape` every photo's shape. Aspect
    buckets: `latents` (and `token_weights`) are lists of per-photo tensors [N_i, 4C] and `shapes` holds
    each photo's (1, h/2, w/2); a batch only ever stacks photos of one shape (`bucket_of`)."""

    latents: torch.Tensor | list[torch.Tensor]  # [M, N, 4C] float32 normalised packed VAE latents, or per photo
    img_shape: tuple[int, int, int]    # (1, h/2, w/2) of every latent (one resolution; else the first photo's)
    person: list[int]                  # [M] index into features/embeds
    view: list[int]                    # [M] index of the photo within its person's features
    features: list[torch.Tensor]       # per person [n_p, D] per-photo Qwen3-VL features
    embeds: torch.Tensor               # [P, S, H] each person's prompt embedding (right-padded)
    mask: torch.Tensor                 # [P, S] 1 = real token
    token_weights: torch.Tensor | None = None  # [M, N] face-region weights or None
    names: list[str] = field(default_factory=list)
    shapes: list[tuple[int, int, int]] | None = None  # per photo (aspect buckets); None: all `img_shape`

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def bucketed(self) -> bool:
        return self.shapes is not None

    def shape_of(self, i: int) -> tuple[int, int, int]:
        return tuple(self.shapes[i]) if self.shapes is not None else tuple(self.img_shape)

    def bucket_of(self) -> list[tuple[int, int, int]]:
        """Each photo's latent shape (the key `bucket_batches` groups by)."""
        return [self.shape_of(i) for i in range(len(self))]

    def stack_latents(self, samples: list[int]) -> torch.Tensor:
        """x0 [b, N, 4C] of `samples` (all of one shape)."""
        return _rows(self.latents, samples)

    def stack_token_weights(self, samples: list[int]) -> torch.Tensor | None:
        return None if self.token_weights is None else _rows(self.token_weights, samples)

    def subset(self, photos: list[int]) -> "DenoiseData":
        pick = (lambda x: None if x is None else (x[photos] if torch.is_tensor(x) else [x[i] for i in photos]))
        return DenoiseData(pick(self.latents), self.shape_of(photos[0]) if photos else self.img_shape,
                           [self.person[i] for i in photos], [self.view[i] for i in photos], self.features,
                           self.embeds, self.mask, pick(self.token_weights), self.names,
                           None if self.shapes is None else [self.shapes[i] for i in photos])

    def other_view_features(self, i: int, person: int | None = None) -> torch.Tensor:
        """Combined features [D] of `person`'s photos other than photo i's (all of them for another person)."""
        p = self.person[i] if person is None else person
        f = self.features[p]
        if p == self.person[i]:
            keep = [j for j in range(f.shape[0]) if j != self.view[i]]
            if not keep:
                raise UserInputError(f"{self.names[p] if self.names else p}: only one photo, so there are no other "
                                     "views to condition on.")
            f = f[keep]
        return combine_features(f.float())


@dataclass
class DenoiseHistory:
    train_loss: list[float] = field(default_factory=list)
    gain: list[dict | None] = field(default_factory=list)
    partial: float = 0.0  # the current epoch's loss sum so far (a mid-epoch checkpoint keeps it)

    def to_dict(self) -> dict[str, Any]:
        return {"train_loss": self.train_loss, "gain": self.gain, "partial": self.partial}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DenoiseHistory":
        return cls(list(d.get("train_loss", [])), list(d.get("gain", [])), float(d.get("partial", 0.0)))


def _rows(x, idx: list[int]) -> torch.Tensor:
    """x[idx] of a tensor, or the stacked rows of a per-photo list (which must share a shape)."""
    if torch.is_tensor(x):
        return x[idx]
    shapes = {tuple(x[i].shape) for i in idx}
    if len(shapes) > 1:
        raise ValueError(f"a batch mixes latent shapes {sorted(shapes)}: batches must be drawn per aspect bucket")
    return torch.stack([x[i] for i in idx])


def epoch_order(m: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(m, generator=torch.Generator().manual_seed(_mix(seed, 1, epoch)))


def steps_per_epoch(data: DenoiseData, cfg: DenoiseLoopConfig) -> int:
    """Optimizer steps in one epoch: batch_size · grad_accum photos a step at one resolution; with aspect
    buckets grad_accum batches a step, a batch holding up to batch_size photos of one bucket (the count of
    batches depends only on how many photos each bucket has, so it is the same every epoch)."""
    m = len(data)
    if not data.bucketed:
        per_step = cfg.batch_size * cfg.grad_accum
        return (m + per_step - 1) // per_step
    from collections import Counter

    batches = sum((n + cfg.batch_size - 1) // cfg.batch_size for n in Counter(data.bucket_of()).values())
    return (batches + cfg.grad_accum - 1) // cfg.grad_accum


def epoch_plan(data: DenoiseData, cfg: DenoiseLoopConfig, epoch: int) -> list[list[list[int]]]:
    """Epoch `epoch`'s (1-based) optimizer steps, each a list of micro-batches of photo indices. One
    resolution: `epoch_order` cut into steps of batch_size · grad_accum and micro-batches of batch_size.
    Aspect buckets: `bucket_batches` (each batch one bucket, order from (seed, epoch)), grad_accum a step."""
    if not data.bucketed:
        per_step = cfg.batch_size * cfg.grad_accum
        order = epoch_order(len(data), cfg.seed, epoch).tolist()
        chunks = [order[k:k + per_step] for k in range(0, len(order), per_step)]
        return [[c[j:j + cfg.batch_size] for j in range(0, len(c), cfg.batch_size)] for c in chunks]
    from ..core.denoising.aspect_buckets import bucket_batches

    batches = bucket_batches(data.bucket_of(), cfg.batch_size, cfg.seed, epoch)
    return [batches[k:k + cfg.grad_accum] for k in range(0, len(batches), cfg.grad_accum)]


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, 2, step))


def make_optimizer(head, cfg: DenoiseLoopConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(head.parameters(), lr=cfg.lr)


def head_gain(head, transformer, data: DenoiseData, alpha: float, pairs: int = 4, seed: int = 0,
              device: torch.device | str = "cpu", batch_size: int = 8) -> dict | None:
    """The held-out denoising gain (`core/measurement/identity_gain.py`) of `head` on `data`'s photos;
    None when no person has two photos or there is no second person at all. Impostors are the other
    evaluated persons (the next one, cyclic) when there are at least two, else the next person among all
    persons `data.features` holds (training persons: their residual is just as foreign to the photo)."""
    from ..core.measurement.identity_gain import denoising_gain, impostors

    persons = sorted(set(data.person))
    usable = [i for i in range(len(data)) if data.features[data.person[i]].shape[0] > 1]
    if not usable or len(data.features) < 2:
        return None
    if len(persons) >= 2:
        imp_of = impostors(persons)
    else:
        imp_of = {p: (p + 1) % len(data.features) for p in persons}
    sub = data.subset(usable)
    param = next(head.parameters())
    cache: dict[tuple[int, int], torch.Tensor] = {}

    @torch.no_grad()
    def residual_of(i: int, p: int) -> torch.Tensor:
        key = (i if p == sub.person[i] else -1, p)
        if key not in cache:
            f = sub.other_view_features(i, p).to(device=param.device, dtype=param.dtype)
            cache[key] = head(f)[0].float().cpu()
        return cache[key]

    was_training = head.training
    head.eval()
    try:
        return denoising_gain(transformer, sub.latents, sub.shapes if sub.bucketed else sub.img_shape, sub.person,
                              sub.embeds[sub.person], sub.mask[sub.person], residual_of, alpha, pairs=pairs,
                              seed=seed, photo_ids=usable, token_weights=sub.token_weights,
                              names=data.names or None, batch_size=batch_size, device=device, impostor_of=imp_of)
    finally:
        head.train(was_training)


def _no_loss(head) -> torch.Tensor:
    return sum(p.sum() * 0.0 for p in head.parameters())


def step_loss(head, transformer, data: DenoiseData, samples: list[int], sigmas: torch.Tensor, noise: torch.Tensor,
              cfg: DenoiseLoopConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-sample objective, per-sample flow-matching losses) for `samples` with their σ and ε."""
    param = next(head.parameters())
    feats = torch.stack([data.other_view_features(i) for i in samples]).to(device=param.device, dtype=param.dtype)
    residual = head(feats).float()                                     # [b, K, H]
    persons = [data.person[i] for i in samples]
    embeds = data.embeds[persons].to(device)
    mask = data.mask[persons].to(device)
    cond = condition_with_residual(embeds, mask, residual.to(device), cfg.alpha_train)
    x0 = data.stack_latents(samples).to(device)
    tw = data.stack_token_weights(samples)
    tw = None if tw is None else tw.to(device)
    weights = loss_weighting(sigmas, cfg.weighting).to(device)
    losses = flow_matching_loss(transformer, x0, noise.to(device), sigmas.to(device), cond, mask,
                                [data.shape_of(samples[0])] * len(samples), weights=weights, token_weights=tw)
    total = losses.sum()
    if cfg.reg_weight:
        total = total + cfg.reg_weight * residual.pow(2).mean(dim=(1, 2)).sum().to(total.device)
    return total, losses.detach()


def train_denoise(head, transformer, train: DenoiseData, val: DenoiseData | None, cfg: DenoiseLoopConfig, *,
                  optimizer=None, start_step: int = 0, history: DenoiseHistory | None = None, dist=None,
                  device: torch.device | str = "cpu", gain_pairs: int = 4, micro_batch_hook=None,
                  on_checkpoint: Callable[[int, int, DenoiseHistory, bool], None] | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  stop_after_step: int | None = None) -> DenoiseHistory:
    """Train from optimizer step `start_step` to the end of cfg.epochs.

    on_checkpoint(step, epoch, history, epoch_end) is called after every `checkpoint_every` steps and at
    every epoch end (after the held-out gain of that epoch is in `history`). `stop_after_step` ends the run
    early (tests use it to simulate an interruption)."""
    cfg.validate()
    if len(train) == 0:
        raise UserInputError("no training photos for the denoise objective. Check the seed dirs and --val-fraction.")
    device = torch.device(device)
    head.to(device).train()
    optimizer = optimizer or make_optimizer(head, cfg)
    history = history or DenoiseHistory()
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    m = len(train)
    per_epoch = steps_per_epoch(train, cfg)
    total_steps = per_epoch * cfg.epochs
    step = start_step
    epoch_sum = history.partial if step % per_epoch else 0.0
    plan, plan_epoch = [], None
    while step < total_steps:
        epoch, inner = divmod(step, per_epoch)
        if plan_epoch != epoch:
            plan, plan_epoch = epoch_plan(train, cfg, epoch + 1), epoch
        micro = plan[inner]
        chunk = [i for mb in micro for i in mb]
        g = step_generator(cfg.seed, step)
        sigmas = sample_sigmas(len(chunk), g, cfg.weighting, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, cfg.shift)
        if train.bucketed:  # ε per micro-batch at its bucket's shape, all drawn up front (every process alike)
            noises = [torch.randn(len(mb), *train.latents[mb[0]].shape, generator=g) for mb in micro]
        else:
            noise = torch.randn(len(chunk), *train.latents.shape[1:], generator=g)
        optimizer.zero_grad(set_to_none=False)
        step_total = 0.0
        start = 0
        for b, mb in enumerate(micro):
            pos = list(range(start, start + len(mb)))
            mine = pos[rank::world]
            if mine:
                eps = noises[b][[j - start for j in mine]] if train.bucketed else noise[mine]
                total, losses = step_loss(head, transformer, train, [chunk[j] for j in mine], sigmas[mine],
                                          eps, cfg, device)
                (total / len(chunk)).backward()
                step_total += float(losses.sum())
            else:
                _no_loss(head).backward()
            start += len(mb)
            if micro_batch_hook:
                micro_batch_hook()
        if dist is not None:
            dist.reduce_grads(list(head.parameters()))
            if world > 1:
                step_total = sum(dist.gather(step_total))
        optimizer.step()
        step += 1
        epoch_sum += step_total
        if progress:
            progress(step, total_steps)
        epoch_end = step % per_epoch == 0
        if epoch_end:
            history.train_loss.append(epoch_sum / m)
            history.gain.append(head_gain(head, transformer, val, cfg.alpha_train, gain_pairs, cfg.seed, device)
                                if val is not None and len(val) else None)
            epoch_sum = 0.0
        history.partial = epoch_sum
        if on_checkpoint and (epoch_end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            on_checkpoint(step, step // per_epoch, history, epoch_end)
        if stop_after_step is not None and step >= stop_after_step:
            break
    head.eval()
    return history
