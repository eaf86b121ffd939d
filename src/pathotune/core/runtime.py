"""What every run shares (patches, slides, MIL): the one Fabric factory, where a model runs, the one inference loop.

- :func:`make_fabric` builds the Lightning Fabric for training, ``eval``, ``predict``, slide extraction and MIL
  alike; :func:`make_loggers` the experiment loggers it carries (CSV and TensorBoard built in, MLflow and W&B
  when installed).
- :class:`Runtime` is device, rank, world size, autocast, barrier and gather, from a Fabric or from a bare device
  (a library call on the CPU needs no Fabric).
- :func:`infer_batches` (and :func:`infer`, which concatenates) runs ``fn(x)`` over a DataLoader on the
  runtime's device under inference mode and autocast, and hands outputs back as float32 on the CPU.
  :func:`infer_dataset` shards a dataset over the runtime's processes and gathers the outputs back in dataset
  order (``eval`` and ``predict``); training's validation uses :func:`core.loop.predict`, its labelled variant.
- :func:`guarded` and :func:`collate` bring a dataset's :class:`~pathotune.errors.PathoTuneError` raised in a
  loader worker back to the main process as itself (one line, its own type), not as the worker's traceback.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from ..errors import ConfigError, PathoTuneError, one_line
from ..report import progress_bar
from .config import LOGGERS, parse_loggers

__all__ = [
    "LOGGERS",
    "LoaderFailure",
    "Runtime",
    "collate",
    "guarded",
    "infer",
    "infer_batches",
    "infer_dataset",
    "make_fabric",
    "make_loggers",
    "parse_loggers",
]

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
    loggers: Sequence[Any] | None = None,
) -> Any:
    """A launched Fabric (carrying ``loggers``); anything it cannot do here fails on one line naming the settings."""
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
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            precision=precision,
            loggers=list(loggers or []),
        )
    except (ValueError, TypeError, RuntimeError, ImportError) as e:
        detail = one_line(e).replace("`", "'")
        raise ConfigError(
            f"accelerator '{accelerator}', devices {devices!r}, strategy '{strategy}', precision "
            f"'{precision}' cannot run here: {detail}"
        ) from e
    fabric.launch()
    return fabric


def make_loggers(names: Sequence[str], root: str | Path, run_name: str = "pathotune") -> list[Any]:
    """Fabric loggers writing under ``root`` (``root/csv/version_N/metrics.csv``, ``root/tensorboard/version_N``,
    ``root/mlruns``); MLflow and W&B honour their own environment (``MLFLOW_TRACKING_URI``, ``WANDB_MODE``).

    A logger whose package is missing fails on one line saying what to install.
    """
    from lightning_fabric.loggers import CSVLogger, TensorBoardLogger  # with make_fabric: Lightning's import cost

    root = Path(root)
    out: list[Any] = []
    for name in names:
        if name == "csv":
            out.append(CSVLogger(root, name="csv", flush_logs_every_n_steps=1))  # every row on disk as it comes
        elif name == "tensorboard":
            try:
                out.append(TensorBoardLogger(root, name="tensorboard", default_hp_metric=False, flush_secs=10))
            except ModuleNotFoundError as e:
                raise ConfigError(
                    "--logger tensorboard needs the tensorboard or tensorboardX package: pip install tensorboardX"
                ) from e
        elif name == "mlflow":
            out.append(_mlflow_logger(root, run_name))
        elif name == "wandb":
            out.append(_wandb_logger(root, run_name))
        else:
            raise ConfigError(f"unknown logger '{name}'; choose from {', '.join(LOGGERS)}")
    return out


def records_hyperparams(logger: Any) -> bool:
    """Whether ``logger`` stores a run's hyperparameters: Fabric's CSVLogger does not (config.yaml holds them)."""
    from lightning_fabric.loggers import CSVLogger  # with make_fabric: Lightning's import cost

    return not isinstance(logger, CSVLogger)


def _mlflow_logger(root: Path, run_name: str) -> Any:
    """Lightning's MLFlowLogger (optional: the mlflow and pytorch-lightning packages)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (root / "mlruns").resolve().as_uri()
    try:
        from pytorch_lightning.loggers import MLFlowLogger  # optional dependency: Lightning's MLflow logger

        return MLFlowLogger(experiment_name="pathotune", run_name=run_name, tracking_uri=uri)
    except ImportError as e:  # ModuleNotFoundError too: MLFlowLogger raises it when mlflow is missing
        raise ConfigError(
            "--logger mlflow needs the mlflow and pytorch-lightning packages: pip install mlflow pytorch-lightning"
        ) from e


def _wandb_logger(root: Path, run_name: str) -> Any:
    """W&B's own Fabric logger (optional: the wandb package)."""
    try:
        from wandb.integration.lightning.fabric import WandbLogger  # optional dependency
    except ImportError as e:
        raise ConfigError("--logger wandb needs the wandb package: pip install wandb") from e
    return WandbLogger(project=os.environ.get("WANDB_PROJECT", "pathotune"), name=run_name, save_dir=str(root))


@dataclass
class Runtime:
    """Where a model runs: device, this process's rank among ``world_size``, its autocast and barrier."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast: Callable[[], AbstractContextManager] = nullcontext
    barrier: Callable[[], None] = field(default=lambda: None)
    precision: str = "32-true"
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None  # (world, *shape) from every rank

    @property
    def main(self) -> bool:
        """Whether this is the process that prints and writes (rank 0)."""
        return self.rank == 0

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
            getattr(fabric, "all_gather", None),
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
    total = len(loader.dataset)  # type: ignore[arg-type]
    with progress_bar(total, desc, unit, enabled=progress and runtime.main, file=file) as bar:
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


def infer_dataset(
    runtime: Runtime,
    dataset: Dataset,
    fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 32,
    workers: int = 0,
    **kw: Any,
) -> torch.Tensor:
    """``fn`` over every item ``(x, *rest)`` of ``dataset``, outputs in dataset order, on every process.

    On one process this is :func:`infer` over a plain loader. On several, each rank reads its share
    (a ``DistributedSampler`` without shuffling) and the outputs are gathered with the sample indices, so the
    result is the same tensor on every rank, whatever the world size. ``kw`` goes to :func:`infer_batches`.
    """
    n = len(dataset)  # type: ignore[arg-type]
    pin = runtime.device.type == "cuda"
    if runtime.world_size <= 1 or runtime.all_gather is None:
        loader = DataLoader(guarded(dataset), batch_size, num_workers=workers, collate_fn=collate, pin_memory=pin)
        return infer(runtime, loader, fn, **kw)
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=False)
    order = torch.tensor(list(iter(sampler)), dtype=torch.long)
    loader = DataLoader(
        guarded(dataset), batch_size, sampler=sampler, num_workers=workers, collate_fn=collate, pin_memory=pin
    )
    mine = infer(runtime, loader, fn, **kw)
    with warnings.catch_warnings():  # torch deprecates the function Fabric's all_gather calls; nothing to act on
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather", FutureWarning)
        gathered = runtime.all_gather(mine.to(runtime.device)).cpu()
        idx = runtime.all_gather(order.to(runtime.device)).cpu().reshape(-1)
    flat = gathered.reshape(-1, *gathered.shape[2:])
    out = torch.zeros(n, *flat.shape[1:], dtype=flat.dtype)
    out[idx] = flat  # the sampler pads with repeats: they land on the same rows
    return out
