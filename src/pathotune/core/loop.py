"""The training loop on Lightning Fabric: one code path for a CPU process, DDP on GPUs, and many nodes.

Everything counts optimizer steps (see ``budget.py``): warm-up and cosine decay, evaluations, checkpoints and
early stopping. The model is judged on validation before the first step too (step 0), so a method that starts
at the linear probe can never end below it on validation. Which evaluation is kept is the ``selection`` rule:
``best`` keeps the best score (ties to the lower validation loss); ``significant`` keeps the best score (ties to
the earlier step) only when its gain over step 0 beats the validation noise (``significance.gain_bounds``, a
max-T bound over every evaluated step), else step 0. A checkpoint can fall mid-epoch: the sampler restarts at
the right batch and augmentation is seeded per sample, so a resumed run is the uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ..errors import PathoTuneError
from ..report import progress_bar
from . import runtime
from .budget import Budget
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .metrics import classification_metrics
from .significance import gain_bounds

VAL_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


class TrainingError(PathoTuneError):
    """Training cannot go on (a non-finite or exploding loss); the last good checkpoint is kept.

    ``reason``, ``kept`` (what survives) and ``advice`` are kept apart so that a caller that discards the
    checkpoint (a failed ``--overwrite`` rerun) can say what survives instead.
    """

    def __init__(self, reason: str, kept: str = "", advice: str = "") -> None:
        self.reason, self.kept, self.advice = reason, kept, advice
        super().__init__("; ".join(p for p in (reason, kept, advice) if p))


# Divergence: a loss that ends this far above where it started (and above an absolute floor) is an explosion,
# not noise. Cross-entropy above 10 means the true class gets p < 5e-5 on average.
EXPLODE_FACTOR = 100.0
EXPLODE_FLOOR = 10.0


@dataclass
class FitState:
    step: int = 0  # optimizer steps completed
    evaluated: bool = False  # whether the evaluation at ``step`` is in ``history``
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_loss: float | None = None
    best_step: int = -1
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    smoothed: float | None = None  # EMA of the monitored score, what early stopping watches
    best_smoothed: float | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    train_images: int = 0
    first_loss: float | None = None  # training loss of the first batch, what divergence is judged against
    first_val_loss: float | None = None  # validation loss at step 0
    val_probs: list[torch.Tensor] = field(default_factory=list)  # validation probabilities at every evaluation
    start_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the trainable tensors at step 0
    selection: dict | None = None  # how the kept step was chosen (rule "significant": the test)


def param_groups(model: nn.Module, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """The model's own optimiser groups when it defines them (PathoTuneModel does); otherwise one group at ``lr``
    with no decay on biases and norms (a MIL aggregator)."""
    if hasattr(model, "param_groups"):
        return model.param_groups(lr, head_lr, weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse a checkpoint whose trainable tensors are not this model's (another method or class count)."""
    want = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    got = {n: tuple(v.shape) for n, v in state.items()}
    if want == got:
        return
    extra, lack = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    if extra or lack:
        what = f"tensor '{(extra or lack)[0]}' that this run {'lacks' if extra else 'needs but it lacks'}"
    else:
        name = next(n for n in want if want[n] != got[n])
        what = f"'{name}' of shape {got[name]}, where this run has {want[name]}"
    raise TrainingError(
        f"checkpoint {source} was written for another model ({what}): another method, backbone or class count",
        advice="resume with the settings it was written with, or pass --overwrite to start over",
    )


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


class EpochSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way through, at the batch a checkpoint was taken."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0  # samples of this rank's share to skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def sharded_loader(fabric, dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int) -> DataLoader:
    """Each rank reads its share. With shuffle, global batch k is the same set of samples at any world size.

    The loader is not wrapped by Fabric, so ``sampler.set_epoch`` stays under our control (a resumed run must
    replay epoch e's order); batches are moved with ``fabric.to_device``. Its own generator keeps the global
    RNG untouched when an iterator starts, so where an epoch begins never shifts the model's random draws.
    """
    sampler = EpochSampler(dataset, num_replicas=fabric.world_size, rank=fabric.global_rank, shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=fabric.device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )


def predict(fabric, model: nn.Module, loader: DataLoader, n: int) -> tuple[np.ndarray, float]:
    """Probabilities for all ``n`` samples, gathered across ranks and ordered by dataset index, and the mean loss.

    The forward pass is the one inference loop (``runtime.infer_batches``); batches are
    ``(input, label, index)``.
    """
    model.eval()
    outputs = list(runtime.infer_batches(runtime.Runtime.of(fabric), loader, model))
    logits = torch.cat([o for o, _ in outputs])
    labels = torch.cat([rest[0] for _, rest in outputs])
    idx = torch.cat([rest[1] for _, rest in outputs])
    probs, losses = logits.softmax(-1), F.cross_entropy(logits, labels, reduction="none")
    if fabric.world_size > 1:
        idx, probs, losses = (fabric.all_gather(t.to(fabric.device)).cpu() for t in (idx, probs, losses))
        idx, probs, losses = idx.reshape(-1), probs.reshape(-1, probs.shape[-1]), losses.reshape(-1)
    # DistributedSampler pads with repeats: they land on the same rows, so each sample counts once.
    out = torch.zeros(n, probs.shape[-1])
    out[idx] = probs
    per_sample = torch.zeros(n)
    per_sample[idx] = losses.float()
    return out.numpy(), float(per_sample.sum()) / max(n, 1)


def _kept(ckpt_path: Path) -> str:
    if ckpt_path.is_file():
        return f"the last good checkpoint is kept at {ckpt_path}"
    return "no evaluation had finished, so there is no checkpoint yet"


def _exploded(value: float, start: float | None) -> bool:
    return start is not None and value > max(EXPLODE_FLOOR, EXPLODE_FACTOR * start)


class _Fit:
    """One call of ``fit``: the loaders, optimizer and state that its steps and evaluations share."""

    def __init__(self, fabric, model, train_set, val_set, budget: Budget, lr, head_lr, weight_decay, batch_size,
                 ckpt_path: Path, seed, class_names, grad_accum, monitor, workers, progress,
                 checkpoint_extra=None, log_prefix: str = "", selection: str = "best", alpha: float = 0.05,
                 val_groups=None, stop_at: int | None = None) -> None:  # fmt: skip
        if batch_size % fabric.world_size:
            raise PathoTuneError(f"batch_size {batch_size} must divide evenly over {fabric.world_size} processes")
        self.fabric, self.model, self.budget = fabric, model, budget
        self.val_set, self.class_names, self.monitor = val_set, class_names, monitor
        self.ckpt_path, self.seed, self.grad_accum = ckpt_path, seed, grad_accum
        self.per_rank = batch_size // fabric.world_size
        self.train_loader = sharded_loader(fabric, train_set, self.per_rank, True, seed, workers)
        self.val_loader = sharded_loader(fabric, val_set, self.per_rank, False, seed, workers) if val_set else None
        self.selection, self.alpha, self.val_groups = selection, alpha, val_groups
        self.stop = budget.steps if stop_at is None else min(stop_at, budget.steps)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / grad_accum)
        self.optimizer = torch.optim.AdamW(param_groups(model, lr, head_lr, weight_decay))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(budget.steps, budget.warmup_steps)
        )
        self.state = FitState()
        self.show = progress and fabric.is_global_zero
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.log_prefix = log_prefix

    def resume(self) -> None:
        ck = load_checkpoint(self.ckpt_path)
        missing = [k for k in ("trainable", "optimizer", "scheduler", "rng", "fit") if k not in ck]
        if missing:
            raise TrainingError(
                f"checkpoint {self.ckpt_path} lacks '{missing[0]}'; it was not written by this training loop",
                advice="pass --overwrite to start over",
            )
        check_trainable_state(self.model, ck["trainable"], self.ckpt_path)
        load_trainable_state(self.model, ck["trainable"])
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainingError(
                f"checkpoint {self.ckpt_path} holds the optimizer of another model ({' '.join(str(e).split())})",
                advice="resume with the settings it was written with, or pass --overwrite to start over",
            ) from e
        set_rng_state(ck["rng"])
        self.state = FitState(**{k: ck["fit"][k] for k in FitState.__dataclass_fields__ if k in ck["fit"]})

    def train(self) -> None:
        fabric, st = self.fabric, self.state
        self.ddp_model, self.optimizer = fabric.setup(self.model, self.optimizer)
        if not st.evaluated:
            self.evaluate()  # step 0 (or the step a killed run had not judged yet)
        # wiped on a terminal (also on an error, before its line prints); periodic plain lines in logs and pipes
        with progress_bar(self.stop, "steps", "step", enabled=self.show, initial=st.step) as bar:
            while st.step < self.stop and not st.stopped_early:
                self._epoch_from(st.step, bar)
        if self.val_set is None:
            return  # nothing judged: the model is the one at the last step
        if self.selection == "significant":
            self._significant_or_step0()
        if st.best_state:
            load_trainable_state(self.model, st.best_state)

    def _significant_or_step0(self) -> None:
        """Keep the best evaluation only if its gain over step 0 beats the validation noise; else step 0."""
        st = self.state
        steps = [row["step"] for row in st.history]
        later = [i for i, step in enumerate(steps) if step > 0]
        y = np.asarray(self.val_set.labels)
        pairs = [(st.val_probs[i].double().numpy(), st.val_probs[0].double().numpy()) for i in later]
        gains = gain_bounds(y, pairs, self.val_groups, self.monitor, self.alpha, simultaneous=True)
        best = steps.index(st.best_step)
        chosen = best if best in later and gains.significant(later.index(best)) else 0
        st.selection = {
            "rule": "significant",
            "best_step": st.best_step,
            "kept_step": steps[chosen],
            "best_gain": gains.gain[later.index(best)] if best in later else 0.0,
            "best_lower": (gains.lower[later.index(best)] if best in later and gains.lower else None),
            "units": gains.units,
            "unit": gains.unit,
            "alpha": self.alpha,
            "note": gains.note,
        }
        if chosen == 0 and st.best_step != 0:
            st.best_state, st.best_step = st.start_state, 0
            st.best_score, st.best_loss = self._score_at(0), st.history[0]["val_loss"]

    def _score_at(self, i: int) -> float:
        row = self.state.history[i]
        return -row["val_loss"] if self.monitor == "loss" else row[f"val_{self.monitor}"]

    def _epoch_from(self, step: int, bar) -> None:
        """Run optimizer steps from ``step`` to the end of its epoch (or of the budget, or an early stop)."""
        fabric, st, accum = self.fabric, self.state, self.grad_accum
        loader, epoch = self.train_loader, step // self.steps_per_epoch
        batches_done = (step % self.steps_per_epoch) * accum
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = batches_done * self.per_rank
        dataset = loader.dataset
        if hasattr(dataset, "epoch"):
            dataset.epoch = epoch  # per-sample augmentation seeds depend on (seed, epoch, index)
        n_batches = batches_done + len(loader)
        self.ddp_model.train()
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        for b, batch in enumerate(loader, start=batches_done):
            x, y, _ = fabric.to_device(batch)
            is_update = (b + 1) % accum == 0 or b + 1 == n_batches
            # Weight by samples, so a short last accumulation group counts like one big batch of its size.
            group_start = (b // accum) * accum * self.per_rank
            group_size = min(accum * self.per_rank, loader.sampler.num_samples - group_start)
            with fabric.no_backward_sync(self.ddp_model, enabled=not is_update):
                loss = F.cross_entropy(self.ddp_model(x).float(), y)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"non-finite loss ({loss.item()}) at step {st.step + 1} (epoch {epoch + 1})",
                        _kept(self.ckpt_path),
                        "lower --lr or check the data",
                    )
                fabric.backward(loss * (len(y) / group_size))
            if st.first_loss is None:
                st.first_loss = loss.item()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            if not is_update:
                continue
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            st.step += 1
            st.evaluated = False
            bar.update(1)
            if st.step % self.budget.eval_every == 0 or st.step in (self.budget.steps, self.stop):
                st.train_seconds += time.perf_counter() - t0
                st.train_images += seen * fabric.world_size
                self.evaluate(loss_sum / max(seen, 1))
                t0, loss_sum, seen = time.perf_counter(), 0.0, 0
                self.ddp_model.train()
                if st.stopped_early or st.step >= self.stop:
                    return
        st.train_seconds += time.perf_counter() - t0
        st.train_images += seen * fabric.world_size

    def evaluate(self, train_loss: float | None = None) -> None:
        """Judge on validation, keep the best state, update early stopping, write the checkpoint."""

        fabric, st, budget = self.fabric, self.state, self.budget
        if st.step == 0 and not st.start_state:
            st.start_state = trainable_state(self.model)
        if self.val_set is None:
            self._unjudged(train_loss)
            return
        t0 = time.perf_counter()
        probs, val_loss = predict(fabric, self.model, self.val_loader, len(self.val_set))
        if not (np.isfinite(probs).all() and math.isfinite(val_loss)):
            raise TrainingError(
                f"non-finite validation outputs at step {st.step} (the weights overflowed)",
                _kept(self.ckpt_path),
                "lower --lr or check the data",
            )
        m = classification_metrics(np.asarray(self.val_set.labels), probs, self.class_names)
        if train_loss is not None:
            train_loss = float(fabric.all_reduce(torch.tensor(train_loss, device=fabric.device)))
        if st.first_val_loss is None:
            st.first_val_loss = val_loss
        # Judged before this evaluation's checkpoint is written, so the kept checkpoint is the last good one.
        for name, value, start in (
            ("training loss", train_loss, st.first_loss),
            ("validation loss", val_loss, st.first_val_loss),
        ):
            if value is not None and _exploded(value, start):
                raise TrainingError(
                    f"training diverged: {name} {value:.4g} at step {st.step}, more than "
                    f"{EXPLODE_FACTOR:g}x its start ({start:.4g})",
                    _kept(self.ckpt_path),
                    "lower --lr / --head-lr",
                )
        row = {
            "step": st.step,
            "epoch": round(st.step / self.steps_per_epoch, 3),
            "train_loss": train_loss,
            "val_loss": val_loss,
            **{f"val_{k}": m[k] for k in VAL_KEYS},
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        st.history.append(row)
        st.val_probs.append(torch.as_tensor(probs, dtype=torch.float32))
        lower_better = self.monitor == "loss"
        raw = val_loss if lower_better else (m[self.monitor] if m[self.monitor] is not None else -math.inf)
        score = -raw if lower_better else raw  # higher is better from here on
        # Best: the monitored score; ties to the lower validation loss ("best") or to the earlier step.
        if self.selection == "significant":
            improved = st.best_score is None or score > st.best_score
        else:
            improved = st.best_score is None or (score, -val_loss) > (st.best_score, -(st.best_loss or 0.0))
        if improved:
            st.best_score, st.best_loss, st.best_step = score, val_loss, st.step
            st.best_state = trainable_state(self.model)
        a = budget.smoothing
        st.smoothed = score if st.smoothed is None else a * st.smoothed + (1 - a) * score
        if st.best_smoothed is None or st.smoothed > st.best_smoothed + 1e-12:
            st.best_smoothed, st.bad_evals = st.smoothed, 0
        elif st.step > 0:
            st.bad_evals += 1
        if budget.min_steps <= st.step < budget.steps and st.bad_evals >= budget.patience:
            st.stopped_early = True
        st.evaluated = True
        if self.show:
            name = "balanced_accuracy" if lower_better else self.monitor
            tqdm.write(
                f"step {st.step}/{budget.steps}  train_loss {'-' if train_loss is None else f'{train_loss:.4f}'}  "
                f"val_loss {val_loss:.4f}  val_{name} {m[name]:.4f}" + ("  *" if improved else "")
                + (f"\nearly stop: smoothed val {self.monitor} flat for {budget.patience} evaluations"
                   if st.stopped_early else "")
            )  # fmt: skip
        self._checkpoint(row)

    def _unjudged(self, train_loss: float | None) -> None:
        """No validation set (a final fit for a step chosen elsewhere): log the step, keep the latest state."""
        fabric, st = self.fabric, self.state
        if train_loss is not None:
            train_loss = float(fabric.all_reduce(torch.tensor(train_loss, device=fabric.device)))
            if _exploded(train_loss, st.first_loss):
                raise TrainingError(
                    f"training diverged: training loss {train_loss:.4g} at step {st.step}, more than "
                    f"{EXPLODE_FACTOR:g}x its start ({st.first_loss:.4g})",
                    _kept(self.ckpt_path),
                    "lower --lr / --head-lr",
                )
        row = {"step": st.step, "epoch": round(st.step / self.steps_per_epoch, 3), "train_loss": train_loss,
               "lr": self.optimizer.param_groups[0]["lr"]}  # fmt: skip
        st.history.append(row)
        st.best_step, st.evaluated = st.step, True
        self._checkpoint(row)

    def _checkpoint(self, row: dict) -> None:
        fabric, st = self.fabric, self.state
        if fabric.is_global_zero:
            save_checkpoint(
                self.ckpt_path,
                {
                    "trainable": trainable_state(self.model),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rng_state(),
                    "fit": {k: getattr(st, k) for k in FitState.__dataclass_fields__},
                    **self.checkpoint_extra,
                },
            )
        # the experiment loggers (Fabric's, rank 0 only) get the row once its checkpoint exists
        fabric.log_dict({f"{self.log_prefix}{k}": v for k, v in row.items() if v is not None and k != "step"}, st.step)
        fabric.barrier()


def fit(
    fabric,
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    budget: Budget,
    lr: float,
    head_lr: float,
    weight_decay: float,
    batch_size: int,
    ckpt_path: Path,
    seed: int,
    class_names: list[str],
    grad_accum: int = 1,
    monitor: str = "balanced_accuracy",
    workers: int = 0,
    resume: bool = False,
    progress: bool = True,
    checkpoint_extra: dict | None = None,
    log_prefix: str = "",
    selection: str = "best",
    alpha: float = 0.05,
    val_groups=None,
    stop_at: int | None = None,
) -> FitState:
    """Train ``model``'s trainable parameters for ``budget``; keep the evaluation the ``selection`` rule picks.

    Datasets yield ``(input, label, index)`` and expose ``labels``. ``model`` may be a PathoTuneModel or a
    head over cached features: anything whose forward maps inputs to logits. Selection uses validation only,
    and includes step 0. ``checkpoint_extra`` is stored in every checkpoint (the run's config, to compare on
    resume). Every evaluation row goes to the Fabric's loggers, its names prefixed by ``log_prefix``
    (``seed_1/``). Training stops with :class:`TrainingError` on a non-finite loss or one that explodes far above
    where it started; the checkpoint of the last evaluation before that is kept.

    ``selection``: ``best`` or ``significant`` (module docstring); ``val_groups`` are the validation samples'
    resampling units for that test. ``val_set=None`` judges nothing and keeps the last step; ``stop_at`` ends
    training at that step of the budget's schedule (a step chosen by cross-validation).
    """
    run = _Fit(fabric, model, train_set, val_set, budget, lr, head_lr, weight_decay, batch_size, ckpt_path, seed,
               class_names, grad_accum, monitor, workers, progress, checkpoint_extra, log_prefix, selection, alpha,
               val_groups, stop_at)  # fmt: skip
    if resume and ckpt_path.is_file():
        run.resume()
    run.train()
    return run.state
