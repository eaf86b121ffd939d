"""The training loop on Lightning Fabric: one code path for a CPU process, DDP on GPUs, and many nodes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import PathoTuneError
from ..methods import Recipe
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .metrics import classification_metrics

NO_DECAY = ("tvp.tokens", "ttp.context", "queries")


class TrainingError(PathoTuneError):
    """Training cannot go on (for instance a non-finite loss); the last good checkpoint is kept."""


@dataclass
class FitState:
    epoch: int = -1  # last completed epoch
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    bad_epochs: int = 0
    train_seconds: float = 0.0
    train_images: int = 0


def param_groups(model: nn.Module, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """Head and the rest get their own learning rate; biases, norms and prompt tokens get no weight decay."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name.startswith(("head.", "model.head."))
        decay = p.ndim > 1 and not any(k in name for k in NO_DECAY)
        groups.setdefault((is_head, decay), []).append(p)
    return [
        {"params": ps, "lr": head_lr if is_head else lr, "weight_decay": weight_decay if decay else 0.0}
        for (is_head, decay), ps in groups.items()
    ]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def sharded_loader(fabric, dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int) -> DataLoader:
    """Each rank reads its share. With shuffle, global batch k is the same set of samples at any world size.

    The loader is not wrapped by Fabric, so ``sampler.set_epoch`` stays under our control (a resumed run must
    replay epoch e's order); batches are moved with ``fabric.to_device``.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=fabric.world_size, rank=fabric.global_rank, shuffle=shuffle, seed=seed
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=fabric.device.type == "cuda",
    )


@torch.no_grad()
def predict(fabric, model: nn.Module, loader: DataLoader, n: int) -> tuple[np.ndarray, float]:
    """Probabilities for all ``n`` samples, gathered across ranks and ordered by dataset index."""
    model.eval()
    idx_parts, prob_parts, loss_parts = [], [], []
    for batch in loader:
        x, y, idx = fabric.to_device(batch)
        with fabric.autocast():
            logits = model(x).float()
        loss_parts.append(F.cross_entropy(logits, y, reduction="none"))
        idx_parts.append(idx)
        prob_parts.append(logits.softmax(-1))
    idx, probs, losses = torch.cat(idx_parts), torch.cat(prob_parts), torch.cat(loss_parts)
    if fabric.world_size > 1:
        idx = fabric.all_gather(idx).reshape(-1)
        probs = fabric.all_gather(probs).reshape(-1, probs.shape[-1])
        losses = fabric.all_gather(losses).reshape(-1)
    # DistributedSampler pads with repeats: they land on the same rows, so each sample counts once.
    out = torch.zeros(n, probs.shape[-1])
    out[idx.cpu()] = probs.cpu()
    per_sample = torch.zeros(n)
    per_sample[idx.cpu()] = losses.float().cpu()
    return out.numpy(), float(per_sample.sum()) / max(n, 1)


def _kept(ckpt_path: Path) -> str:
    if ckpt_path.is_file():
        return f"the last good checkpoint is kept at {ckpt_path}"
    return "no epoch had finished, so there is no checkpoint yet"


def fit(
    fabric,
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    recipe: Recipe,
    epochs: int,
    batch_size: int,
    ckpt_path: Path,
    seed: int,
    class_names: list[str],
    grad_accum: int = 1,
    monitor: str = "balanced_accuracy",
    patience: int = 10,
    workers: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> FitState:
    """Train ``model``'s trainable parameters; keep the best epoch on ``monitor`` (validation only).

    Datasets yield ``(input, label, index)`` and expose ``labels``. ``model`` may be a PathoTuneModel or a
    head over cached features: anything whose forward maps inputs to logits.
    """
    from tqdm.auto import tqdm

    if batch_size % fabric.world_size:
        raise PathoTuneError(f"batch_size {batch_size} must divide evenly over {fabric.world_size} processes")
    per_rank = batch_size // fabric.world_size
    train_loader = sharded_loader(fabric, train_set, per_rank, True, seed, workers)
    val_loader = sharded_loader(fabric, val_set, per_rank, False, seed, workers)
    steps_per_epoch = math.ceil(len(train_loader) / grad_accum)
    optimizer = torch.optim.AdamW(param_groups(model, recipe.lr, recipe.head_lr, recipe.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch)
    )
    state = FitState()
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        load_trainable_state(model, ck["trainable"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        state = FitState(**{k: ck["fit"][k] for k in FitState.__dataclass_fields__})
    ddp_model, optimizer = fabric.setup(model, optimizer)
    lower_better = monitor == "loss"
    show = progress and fabric.is_global_zero

    for epoch in range(state.epoch + 1, epochs):
        ddp_model.train()
        train_loader.sampler.set_epoch(epoch)
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{epochs}", disable=not show, leave=False)
        for step, batch in enumerate(train_loader):
            x, y, _ = fabric.to_device(batch)
            is_update = (step + 1) % grad_accum == 0 or step + 1 == len(train_loader)
            # Weight by samples, so a short last accumulation group counts like one big batch of its size.
            group_start = (step // grad_accum) * grad_accum * per_rank
            group_size = min(grad_accum * per_rank, len(train_loader.sampler) - group_start)
            with fabric.no_backward_sync(ddp_model, enabled=not is_update):
                loss = F.cross_entropy(ddp_model(x).float(), y)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"non-finite loss ({loss.item()}) at epoch {epoch + 1} step {step + 1}; "
                        f"{_kept(ckpt_path)}; lower --lr or check the data"
                    )
                fabric.backward(loss * (len(y) / group_size))
            if is_update:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        bar.close()
        state.train_seconds += time.perf_counter() - t0
        state.train_images += seen * fabric.world_size
        train_loss = float(fabric.all_reduce(torch.tensor(loss_sum / max(seen, 1), device=fabric.device)))

        probs, val_loss = predict(fabric, model, val_loader, len(val_set))
        if not (np.isfinite(probs).all() and math.isfinite(val_loss)):
            raise TrainingError(
                f"non-finite validation outputs after epoch {epoch + 1} (the weights overflowed); "
                f"{_kept(ckpt_path)}; lower --lr or check the data"
            )
        labels = np.asarray(val_set.labels)
        m = classification_metrics(labels, probs, class_names)
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            **{f"val_{k}": m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")},
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        state.history.append(row)
        score = val_loss if lower_better else (m[monitor] if m[monitor] is not None else -math.inf)
        improved = state.best_score is None or (score < state.best_score if lower_better else score > state.best_score)
        if improved:
            state.best_score, state.best_epoch, state.bad_epochs = score, epoch + 1, 0
            state.best_state = trainable_state(model)
        else:
            state.bad_epochs += 1
        state.epoch = epoch
        if show:
            tqdm.write(
                f"epoch {epoch + 1}/{epochs}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
                f"val_{monitor if monitor != 'loss' else 'balanced_accuracy'} "
                f"{row.get('val_' + monitor, m['balanced_accuracy']):.4f}" + ("  *" if improved else "")
            )
        if fabric.is_global_zero:
            save_checkpoint(
                ckpt_path,
                {
                    "trainable": trainable_state(model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                    "fit": {k: getattr(state, k) for k in FitState.__dataclass_fields__},
                },
            )
        fabric.barrier()
        if state.bad_epochs >= patience:
            if show:
                tqdm.write(f"early stop: no {monitor} improvement for {patience} epochs")
            break
    if state.best_state:
        load_trainable_state(model, state.best_state)
    return state
