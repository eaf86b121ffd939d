"""Training budgets in optimizer steps, so that dataset size does not decide how long a method trains.

Counting epochs starves small tasks (60 images at batch 32 is 2 steps an epoch) and runs large ones for days.
A budget is a number of optimizer steps; warm-up, cosine decay, evaluations, checkpoints and early stopping all
count steps. ``--epochs`` still works: it converts to steps and is raised to a floor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ConfigError

EVALUATIONS = 20  # evaluations over a budget, unless eval_every says otherwise


@dataclass(frozen=True)
class Budget:
    steps: int  # optimizer steps in all
    warmup_steps: int
    eval_every: int  # steps between validation passes (each also writes the checkpoint)
    patience: int  # evaluations without a better smoothed score before stopping early
    min_steps: int = 0  # early stopping never fires before this step
    smoothing: float = 0.0  # EMA factor on the monitored score that early stopping watches (0: none)
    source: str = ""  # how the step count was decided, for reports

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"the training budget must be at least 1 step, got {self.steps} ({self.source})")
        if self.eval_every < 1 or self.patience < 1 or self.warmup_steps < 0:
            raise ConfigError(
                f"eval_every and patience must be >= 1 and warmup >= 0, got {self.eval_every}, {self.patience}, "
                f"{self.warmup_steps}"
            )
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"early-stopping smoothing must be in [0, 1), got {self.smoothing}")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_budget(
    n_train: int,
    batch_size: int,
    grad_accum: int,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    default_steps: int,
    min_steps: int,
    warmup_fraction: float = 0.1,
    eval_every: int | None = None,
    patience: int = 5,
    smoothing: float = 0.6,
) -> Budget:
    """``steps`` if given; else ``epochs`` converted to steps and raised to ``min_steps``; else the default.

    Early stopping never fires in the first half of the budget, nor before ``min_steps``.
    """
    if steps is not None and epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    per_epoch = max(1, math.ceil(math.ceil(n_train / batch_size) / grad_accum))
    if steps is not None:
        total, source = steps, f"{steps} steps as given"
    elif epochs is not None:
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        total = epochs * per_epoch
        source = f"{epochs} epochs x {per_epoch} steps"
        if total < min_steps:
            total, source = min_steps, f"{source} = {epochs * per_epoch}, raised to the floor of {min_steps} steps"
    else:
        total, source = default_steps, f"the method's default of {default_steps} steps"
    every = eval_every or max(1, math.ceil(total / EVALUATIONS))
    return Budget(
        steps=total,
        warmup_steps=round(warmup_fraction * total),
        eval_every=min(every, total),
        patience=patience,
        min_steps=max(min(min_steps, total), total // 2),
        smoothing=smoothing,
        source=f"{source} ({total / per_epoch:.1f} epochs of {per_epoch} steps)",
    )


def epoch_budget(epochs: int, steps_per_epoch: int, warmup_epochs: int, patience: int) -> Budget:
    """An epoch-paced budget (evaluate every epoch, patience in epochs), for slide-level MIL training."""
    return Budget(
        steps=epochs * steps_per_epoch,
        warmup_steps=warmup_epochs * steps_per_epoch,
        eval_every=steps_per_epoch,
        patience=patience,
        source=f"{epochs} epochs x {steps_per_epoch} steps",
    )
