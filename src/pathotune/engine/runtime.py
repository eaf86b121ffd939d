"""What every engine path shares: the one Fabric factory, where a model runs, and the one inference loop.

- :func:`make_fabric` builds the Lightning Fabric for training, slide extraction and MIL alike.
- :class:`Runtime` is device, rank, world size, autocast and barrier, from a Fabric or from a bare device (an
  ``eval`` or ``predict`` on the CPU needs no Fabric).
- :func:`infer_batches` (and :func:`infer`, which concatenates) runs ``fn(x)`` over a DataLoader on the
  runtime's device under inference mode and autocast, and hands outputs back as float32 on the CPU. Training's
  validation uses :func:`engine.loop.predict`, its labelled variant that also gathers across ranks.
- :func:`guarded` and :func:`collate` bring a dataset's :class:`~pathotune.errors.PathoTuneError` raised in a
  loader worker back to the main process as itself (one line, its own type), not as the worker's traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from ..errors import ConfigError, PathoTuneError, one_line

__all__ = ["LoaderFailure", "Runtime", "collate", "guarded", "infer", "infer_batches", "make_fabric"]

# Precisions under which autocast changes nothing, so none is entered (a CPU run at 32-true needs none).
FULL_PRECISION = frozenset({"32-true", "32", "64-true", "64"})


def auto_precision(accelerator: str) -> str:
    """``precision="auto"``: bf16 autocast (fp16 where bf16 is missing) on a CUDA GPU, else 32-bit."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def make_fabric(
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    precision: str = "auto",
    num_nodes: int = 1,
) -> Any:
    """A launched Fabric; anything it cannot do here fails on one line naming the settings."""
    # lightning_fabric takes about a second to import; eval, predict and the feature readers never need it.
    from lightning_fabric import Fabric

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"accelerator '{accelerator}' was asked for, but no CUDA GPU is visible to torch "
            "(torch.cuda.is_available() is False); use --accelerator cpu or auto"
        )
    if precision == "auto":
        precision = auto_precision(accelerator)
    try:
        fabric = Fabric(
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision
        )
    except (ValueError, TypeError, RuntimeError, ImportError) as e:
        detail = one_line(e).replace("`", "'")
        raise ConfigError(
            f"accelerator '{accelerator}', devices {devices!r}, strategy '{strategy}', precision "
            f"'{precision}' cannot run here: {detail}"
        ) from e
    fabric.launch()
    return fabric


@dataclass
class Runtime:
    """Where a model runs: device, this process's rank among ``world_size``, its autocast and barrier."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast: Callable[[], AbstractContextManager] = nullcontext
    barrier: Callable[[], None] = field(default=lambda: None)
    precision: str = "32-true"

    @classmethod
    def of(cls, fabric: Any = None, device: str | torch.device | None = None) -> Runtime:
        """From a Fabric (its device, rank, precision), else a single process on ``device`` (default CPU)."""
        if fabric is None:
            return cls(torch.device(device or "cpu"))
        plugin = getattr(getattr(fabric, "strategy", None), "precision", None)
        precision = str(getattr(plugin, "precision", "32-true"))
        return cls(
            fabric.device,
            int(fabric.global_rank),
            int(fabric.world_size),
            nullcontext if precision in FULL_PRECISION else fabric.autocast,
            fabric.barrier,
            precision,
        )


@dataclass(frozen=True)
class LoaderFailure:
    """What a guarded dataset hands the loader instead of an item whose reading raised a PathoTuneError."""

    error: type[PathoTuneError]
    message: str

    def throw(self) -> None:
        raise self.error(self.message)


class _Guarded(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except PathoTuneError as e:
            return LoaderFailure(type(e), str(e))


def guarded(dataset: Dataset) -> Dataset:
    """``dataset`` with its PathoTuneErrors returned as :class:`LoaderFailure` items; load it with :func:`collate`.

    An error raised in a worker would reach the main process as DataLoader's re-raise, the worker's whole
    traceback as its message, held in a reference cycle that keeps the worker pool alive until a later garbage
    collection. Returned as an item instead, it ends the loop through :func:`infer_batches` like any error.
    """
    return _Guarded(dataset)


def collate(items: list) -> Any:
    """``default_collate``, but a batch with a :class:`LoaderFailure` is that failure."""
    failure = next((it for it in items if isinstance(it, LoaderFailure)), None)
    return failure if failure is not None else default_collate(items)


def _to_cpu(y: Any) -> Any:
    return tuple(t.float().cpu() for t in y) if isinstance(y, (tuple, list)) else y.float().cpu()


def infer_batches(
    runtime: Runtime,
    loader: DataLoader,
    fn: Callable[[torch.Tensor], Any],
    progress: bool = False,
    desc: str | None = None,
    unit: str = "img",
    file: Any = None,
) -> Iterator[tuple[Any, list]]:
    """``(fn(x), rest)`` per batch ``(x, *rest)``: ``x`` moved to the device, ``fn`` under inference mode and the
    runtime's autocast, its output (a tensor or a tuple of them) as float32 on the CPU.

    The loader's iterator is dropped as soon as the loop ends, also on an error or when the caller stops early,
    so a worker pool shuts down then rather than at a later garbage collection.
    """
    with tqdm(
        total=len(loader.dataset),  # type: ignore[arg-type]
        desc=desc,
        unit=unit,
        leave=False,
        disable=not progress,
        dynamic_ncols=True,
        file=file,
    ) as bar:
        batches = iter(loader)
        try:
            for batch in batches:
                if isinstance(batch, LoaderFailure):
                    batch.throw()
                x, *rest = batch
                with torch.inference_mode(), runtime.autocast():
                    y = _to_cpu(fn(x.to(runtime.device, non_blocking=True)))
                bar.update(len(x))
                yield y, rest
        finally:
            del batches


def infer(runtime: Runtime, loader: DataLoader, fn: Callable[[torch.Tensor], torch.Tensor], **kw: Any) -> torch.Tensor:
    """:func:`infer_batches` concatenated over the batches (an empty tensor for an empty loader)."""
    parts = [y for y, _ in infer_batches(runtime, loader, fn, **kw)]
    return torch.cat(parts) if parts else torch.empty(0)
