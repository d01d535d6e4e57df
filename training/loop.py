"""The training loop on tensors: features [M, D] -> targets [M, K, H], deterministic, resumable.

Each sample is one photo's feature vector with its identity's target (all views of a person share the
target). Batches come from a seeded `torch.Generator`; with the same seed and data two CPU runs produce
bit-identical weights. The optimizer is Adam. After every epoch `on_epoch_end` receives the state to
write (the head file and the resumable training state).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..core.errors import UserInputError
from .loss import per_sample_loss


@dataclass
class LoopConfig:
    epochs: int = 3
    batch_size: int = 2
    lr: float = 1e-3
    seed: int = 123
    mse_weight: float = 1.0
    cos_weight: float = 1.0

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserInputError(f"--epochs must be at least 1 (got {self.epochs}).")
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size must be at least 1 (got {self.batch_size}).")
        if not (self.lr > 0) or self.lr != self.lr or self.lr == float("inf"):
            raise UserInputError(f"--lr must be a positive number (got {self.lr}).")
        for name in ("mse_weight", "cos_weight"):
            v = getattr(self, name)
            if not (v >= 0) or v == float("inf"):
                raise UserInputError(f"--{name.replace('_', '-')} must be a non-negative number (got {v}).")
        if self.mse_weight == 0 and self.cos_weight == 0:
            raise UserInputError("--mse-weight and --cos-weight are both 0: nothing to learn. Set at least one > 0.")


@dataclass
class TensorData:
    features: torch.Tensor  # [M, D] float32
    targets: torch.Tensor   # [M, K, H] float32
    mask: torch.Tensor      # [M, K] bool

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"train_loss": self.train_loss, "val_loss": self.val_loss}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        return cls(list(d.get("train_loss", [])), list(d.get("val_loss", [])))


def seed_everything(seed: int) -> torch.Generator:
    """Python, NumPy, torch CPU/CUDA seeds and deterministic algorithms; returns the shuffling generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if hasattr(torch.backends, "cudnn"):
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@torch.no_grad()
def evaluate(head, data: TensorData, cfg: LoopConfig, device, batch_size: int = 256) -> float:
    if len(data) == 0:
        return float("nan")
    total = 0.0
    for i in range(0, len(data), batch_size):
        f = data.features[i:i + batch_size].to(device)
        pred = head(f).float()
        loss = per_sample_loss(pred, data.targets[i:i + batch_size].to(device), data.mask[i:i + batch_size].to(device),
                               cfg.mse_weight, cfg.cos_weight)
        total += float(loss.sum())
    return total / len(data)


def make_optimizer(head, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(head.parameters(), lr=cfg.lr)


def train_head(head, train: TensorData, val: TensorData | None, cfg: LoopConfig, *, optimizer=None,
               generator: torch.Generator | None = None, start_epoch: int = 0, history: History | None = None,
               dist=None, device: torch.device | str = "cpu",
               on_epoch_end: Callable[[int, History], None] | None = None,
               progress: Callable[[int, int], None] | None = None) -> History:
    """Train epochs start_epoch+1 .. cfg.epochs. Under several processes each takes its share of every batch
    and gradients are summed, so the step equals the single-process one."""
    cfg.validate()
    if len(train) == 0:
        raise UserInputError("no training samples: every identity went to validation. Lower --val-fraction.")
    device = torch.device(device)
    head.to(device).train()
    optimizer = optimizer or make_optimizer(head, cfg)
    generator = generator or seed_everything(cfg.seed)
    history = history or History()
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    m = len(train)
    steps_per_epoch = (m + cfg.batch_size - 1) // cfg.batch_size
    total_steps = steps_per_epoch * (cfg.epochs - start_epoch)
    done = 0
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        perm = torch.randperm(m, generator=generator)
        running = 0.0
        for s in range(steps_per_epoch):
            batch = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            mine = batch[rank::world]
            optimizer.zero_grad(set_to_none=False)
            if len(mine):
                pred = head(train.features[mine].to(device)).float()
                losses = per_sample_loss(pred, train.targets[mine].to(device), train.mask[mine].to(device),
                                         cfg.mse_weight, cfg.cos_weight)
                loss = losses.sum() / len(batch)
            else:  # more processes than samples in this batch
                loss = sum(p.sum() * 0.0 for p in head.parameters())
                losses = torch.zeros(0)
            loss.backward()
            if dist is not None:
                dist.reduce_grads(list(head.parameters()))
            optimizer.step()
            running += float(losses.detach().sum())
            done += 1
            if progress:
                progress(done, total_steps)
        if dist is not None and world > 1:
            running = sum(dist.gather(running))
        history.train_loss.append(running / m)
        history.val_loss.append(evaluate(head.eval(), val, cfg, device) if val is not None and len(val) else None)
        head.train()
        if on_epoch_end:
            on_epoch_end(epoch, history)
    head.eval()
    return history
