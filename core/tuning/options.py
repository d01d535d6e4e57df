"""The settings of one personal tuning run (validated here once, for the CLI and the node alike)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..denoising.flow_matching import WEIGHTINGS
from ..errors import UserInputError

SCHEDULES = ("warmup_cosine", "constant")
HELD_OUT_AUTO, HELD_OUT_NONE = "auto", "none"


@dataclass
class TuneOptions:
    steps: int = 200                   # optimizer steps (a budget, not epochs)
    lr: float = 1e-3                   # Adam learning rate (peak, after warm-up)
    schedule: str = "warmup_cosine"    # warmup_cosine: linear warm-up then cosine to 0; constant
    warmup_fraction: float = 0.05      # share of the steps spent warming up (warmup_cosine only)
    tokens: int | None = None          # K; None: the init head's K, else 1
    alpha_train: float = 1.0           # α the residual is added with while tuning
    pull_back: float = 0.0             # weight of ‖R − R_init‖² / ‖R_init‖² (needs an init head)
    face_weight: float = 0.0           # 0 off; else the loss weight inside the face map (1 outside)
    seed: int = 0
    held_out: str = HELD_OUT_AUTO      # auto (one photo, by seed, when there are ≥ 3), none, or a photo's name
    batch_size: int = 1                # photos per step (all of one aspect bucket)
    eval_every: int = 0                # steps between held-out evaluations (0: steps // 20, at least 1)
    eval_pairs: int = 4                # fixed (σ, ε) pairs per held-out photo
    weighting: str = "logit_normal"    # σ density / loss weighting (flow_matching.WEIGHTINGS)
    shift: float = 1.0

    def validate(self) -> None:
        def positive(name: str, v: float) -> None:
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UserInputError(f"{name} must be a positive number (got {v!r}).")

        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise UserInputError(f"steps must be a whole number of at least 1 (got {self.steps!r}): a few hundred "
                                 "is typical (200 by default).")
        positive("lr (learning rate)", self.lr)
        positive("alpha_train", self.alpha_train)
        positive("shift", self.shift)
        if self.schedule not in SCHEDULES:
            raise UserInputError(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r}).")
        if not (0 <= self.warmup_fraction < 1):
            raise UserInputError(f"warmup_fraction must be in [0, 1) (got {self.warmup_fraction!r}).")
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int)
                                        or self.tokens < 1):
            raise UserInputError(f"tokens (K) must be at least 1 (got {self.tokens!r}).")
        if not (math.isfinite(self.pull_back) and self.pull_back >= 0):
            raise UserInputError(f"pull_back must be 0 or a positive number (got {self.pull_back!r}).")
        if not math.isfinite(self.face_weight) or (self.face_weight != 0 and self.face_weight < 1):
            raise UserInputError(f"face_weight must be 0 (off) or a number >= 1 (got {self.face_weight!r}).")
        if self.batch_size < 1 or self.eval_pairs < 1 or self.eval_every < 0:
            raise UserInputError("batch_size and eval_pairs must be at least 1, eval_every 0 or more.")
        if self.weighting not in WEIGHTINGS:
            raise UserInputError(f"weighting must be one of {', '.join(WEIGHTINGS)} (got {self.weighting!r}).")
        if not isinstance(self.held_out, str) or not self.held_out:
            raise UserInputError("held_out must be 'auto', 'none' or a photo's name.")

    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 20)

    def warmup_steps(self) -> int:
        return int(self.steps * self.warmup_fraction) if self.schedule == "warmup_cosine" else 0

    def lr_factor(self, step: int) -> float:
        """Multiplier of lr for optimizer step `step` (0-based): linear warm-up, then cosine to 0 (or 1)."""
        if self.schedule == "constant":
            return 1.0
        warm = self.warmup_steps()
        if step < warm:
            return (step + 1) / (warm + 1)
        span = max(1, self.steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / span)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
