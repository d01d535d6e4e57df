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
    """Packed latents of every photo (one resolution), whom each shows, and per-person conditioning."""

    latents: torch.Tensor              # [M, N, 4C] float32, normalised VAE latents, packed
    img_shape: tuple[int, int, int]    # (1, h/2, w/2) of every latent
    person: list[int]                  # [M] index into features/embeds
    view: list[int]                    # [M] index of the photo within its person's features
    features: list[torch.Tensor]       # per person [n_p, D] per-photo Qwen3-VL features
    embeds: torch.Tensor               # [P, S, H] each person's prompt embedding (right-padded)
    mask: torch.Tensor                 # [P, S] 1 = real token
    token_weights: torch.Tensor | None = None  # [M, N] face-region weights or None
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def subset(self, photos: list[int]) -> "DenoiseData":
        tw = None if self.token_weights is None else self.token_weights[photos]
        return DenoiseData(self.latents[photos], self.img_shape, [self.person[i] for i in photos],
                           [self.view[i] for i in photos], self.features, self.embeds, self.mask, tw, self.names)

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


def epoch_order(m: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(m, generator=torch.Generator().manual_seed(_mix(seed, 1, epoch)))


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
        return denoising_gain(transformer, sub.latents, sub.img_shape, sub.person,
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
    x0 = data.latents[samples].to(device)
    tw = None if data.token_weights is None else data.token_weights[samples].to(device)
    weights = loss_weighting(sigmas, cfg.weighting).to(device)
    losses = flow_matching_loss(transformer, x0, noise.to(device), sigmas.to(device), cond, mask,
                                [data.img_shape] * len(samples), weights=weights, token_weights=tw)
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
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = (m + per_step - 1) // per_step
    total_steps = steps_per_epoch * cfg.epochs
    step = start_step
    n_latent = train.latents.shape[1:]
    epoch_sum = history.partial if step % steps_per_epoch else 0.0
    while step < total_steps:
        epoch, inner = divmod(step, steps_per_epoch)
        order = epoch_order(m, cfg.seed, epoch + 1)
        chunk = order[inner * per_step:(inner + 1) * per_step].tolist()
        g = step_generator(cfg.seed, step)
        sigmas = sample_sigmas(len(chunk), g, cfg.weighting, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, cfg.shift)
        noise = torch.randn(len(chunk), *n_latent, generator=g)
        optimizer.zero_grad(set_to_none=False)
        step_total = 0.0
        for mb in range(0, len(chunk), cfg.batch_size):
            pos = list(range(mb, min(len(chunk), mb + cfg.batch_size)))
            mine = pos[rank::world]
            if mine:
                total, losses = step_loss(head, transformer, train, [chunk[j] for j in mine], sigmas[mine],
                                          noise[mine], cfg, device)
                (total / len(chunk)).backward()
                step_total += float(losses.sum())
            else:
                _no_loss(head).backward()
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
        epoch_end = step % steps_per_epoch == 0
        if epoch_end:
            history.train_loss.append(epoch_sum / m)
            history.gain.append(head_gain(head, transformer, val, cfg.alpha_train, gain_pairs, cfg.seed, device)
                                if val is not None and len(val) else None)
            epoch_sum = 0.0
        history.partial = epoch_sum
        if on_checkpoint and (epoch_end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            on_checkpoint(step, step // steps_per_epoch, history, epoch_end)
        if stop_after_step is not None and step >= stop_after_step:
            break
    head.eval()
    return history
