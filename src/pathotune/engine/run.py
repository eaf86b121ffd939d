"""A whole run: data -> model -> fit -> judged on held-out data -> metrics, report, bundle, log.

About 500 lines: the steps of one run, in order, each a short function; the pieces they call (probe, loop,
selection, cross-validation, cached features, judging, run folder) are their own modules.
"""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backbones import resolve_weights
from ..bundle import save_bundle
from ..card import run_card_extra
from ..core import runtime
from ..core.budget import plan_budget
from ..core.loop import FitState, fit
from ..core.metrics import METRIC_NAMES, aggregate_seeds
from ..data import PatchDataset, ScanReport, build_transforms, load_source, scan
from ..errors import ConfigError, DataError, note_interrupt
from ..methods import Recipe, get_method
from ..model import create_model
from ..prompts import prompt_texts
from ..records import read_marker, write_marker
from ..report import (
    atomic_write_json,
    atomic_write_text,
    csv_text,
    markdown_table,
    trainable_percent,
    write_run_report,
)
from ..task import Task
from ..text import text_encoding
from .cached import FeatureSet, HeadOnly, augmented_views, frozen_features
from .config import TrainConfig, dump_config
from .crossval import cv_select_and_fit
from .judge import headline, judged, kept_val_score, monitored, predictions_csv, split_probs, tta_probs
from .probe import check_probe_settings, fit_probe_head
from .runfolder import CHECKPOINT, RunFolder, check_resume_settings, final_outputs, open_run_folder
from .selection import drop_all_groups, select_prompt_groups

SUMMARY_KEYS = METRIC_NAMES
SPLITS_USED = ("train", "val", "test")
BAD_FILES = "bad_files.csv"  # every unreadable image of the scan, part of the run (swapped in with a replacement)


def write_bad_files(folder: Path, report: ScanReport, stops: bool, staged: bool) -> Path | None:
    """Where the scan's unreadable images are listed (written atomically), or None when there are none.

    ``folder/bad_files.csv`` goes with the run. A replacement that the scan stops (``stops``) never swaps in, and
    the folder still holds the old run, so its listing goes to a file in the system's temporary folder instead.
    """
    if not report.bad:
        return None
    if stops and staged:
        fd, name = tempfile.mkstemp(prefix="pathotune-bad_files-", suffix=".csv")
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(report.bad_files_csv())
        return Path(name)
    return atomic_write_text(Path(folder) / BAD_FILES, report.bad_files_csv())


def make_fabric(cfg: TrainConfig, log_dir: str | Path | None = None):
    """The shared Fabric (:func:`runtime.make_fabric`) for the config's accelerator, devices and precision,
    carrying the config's experiment loggers under ``log_dir`` (none without one)."""
    loggers = runtime.make_loggers(cfg.logger, log_dir, Path(cfg.out).name) if log_dir is not None else []
    return runtime.make_fabric(cfg.accelerator, cfg.devices, cfg.strategy, cfg.precision, cfg.num_nodes, loggers)


def log_hyperparams(fabric, cfg: TrainConfig) -> None:
    """The resolved config to every logger that records hyperparameters (Fabric's CSVLogger does not)."""
    for logger in getattr(fabric, "loggers", []):
        if runtime.records_hyperparams(logger):
            logger.log_hyperparams(cfg.model_dump(mode="json"))


def finalize_loggers(fabric, status: str) -> None:
    """Flush and close the loggers' files (before a staged run's folders are swapped in).

    After a failure the logs may already be gone with the staging folder: that must not hide the error.
    """
    for logger in getattr(fabric, "loggers", []):
        if status == "success":
            logger.finalize(status)
            continue
        with contextlib.suppress(OSError):
            logger.finalize(status)


def resolve_recipe(cfg: TrainConfig) -> Recipe:
    """The method's recipe with the config's overrides on top."""
    base = get_method(cfg.method).recipe
    picked = {
        "lr": cfg.lr,
        "head_lr": cfg.head_lr,
        "weight_decay": cfg.weight_decay,
        "min_steps": cfg.min_steps,
        "warmup_fraction": cfg.warmup_fraction,
        "head_init": cfg.head_init,
    }
    return replace(base, **{k: v for k, v in picked.items() if v is not None})


def build_task(cfg: TrainConfig, classes: list[str]) -> Task:
    """The task TTP encodes. ``text: ""`` encodes empty text; ``shuffle_classes`` mislabels the classes (a weak
    control: the sentence hardly changes); ``task.control`` replaces the encoding itself (text/controls.py)."""
    t = cfg.task
    if t.text is not None:
        escaped = t.text.replace("{", "{{").replace("}", "}}")
        task = Task(name=t.name, organ=t.organ, stain=t.stain, classes=tuple(classes), template=escaped,
                    class_descriptions=dict(t.class_descriptions))  # fmt: skip
    else:
        task = Task(name=t.name, organ=t.organ, stain=t.stain, classes=tuple(classes), description=t.description,
                    class_descriptions=dict(t.class_descriptions))  # fmt: skip
    if not t.shuffle_classes or len(classes) < 2:
        return task
    k = 1 + cfg.seed % (len(classes) - 1)  # a seeded rotation: every class is named after another one
    return replace(task, text_classes=tuple(classes[k:] + classes[:k]))


def peak_memory_mb(fabric) -> float:
    """Peak CUDA allocation on GPU; else this process's peak resident set (a cell runs in its own process)."""
    if fabric.device.type == "cuda":
        return torch.cuda.max_memory_allocated(fabric.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def task_text_features(cfg: TrainConfig, task: Task) -> tuple[tuple | None, dict | None]:
    """The text encodings TTP reads (the task text, or one per class) under the config's text control, and the
    record of what was encoded with its cosine to the real text; (None, None) for methods without TTP."""
    s = get_method(cfg.method).resolve(**cfg.switches)
    texts = prompt_texts(s, task)
    if texts is None:
        return None, None
    pooled, tokens, info = text_encoding(texts, s.text_encoder, s.text_weights, cfg.task.control, cfg.seed)
    return (pooled, tokens), info


def train_run(cfg: TrainConfig, fabric=None, progress: bool = True) -> dict:
    """Train one seed into ``cfg.out``; returns the metrics written to metrics.json.

    Every trained method starts from the strong probe (LP-FT): its head is the probe, its prompt groups are
    gated shut, so step 0 is the probe and model selection on validation includes it. What may happen to a
    folder that already holds a run (refused, resumed, or replaced once the new run finishes) is decided by
    :func:`pathotune.engine.runfolder.open_run_folder` before any work.
    """
    folder = open_run_folder(cfg.out, cfg.resume, cfg.overwrite)
    if folder.finished is not None:  # before Fabric starts: resuming a finished run costs nothing
        print(*folder.notes, sep="\n")
        return folder.finished
    own = fabric is None
    fabric = fabric or make_fabric(cfg, folder.workdir / "logs")
    try:
        metrics = _in_folder(folder, cfg, fabric, progress)
    except BaseException:
        if own:
            finalize_loggers(fabric, "failed")
        raise
    return metrics


def _in_folder(
    folder: RunFolder, cfg: TrainConfig, fabric, progress: bool, log_prefix: str = "", outer_staged: bool = False
) -> dict:
    """One run in its folder: resume checks, staging, the run, then the swap (or the clean-up on failure)."""
    main = fabric.is_global_zero
    if folder.finished is not None:  # a finished seed of a resumed multi-seed run
        if main:
            print(*folder.notes, sep="\n")
        return folder.finished
    if main and folder.notes:
        print(*folder.notes, sep="\n")
    if folder.resume:
        check_resume_settings(cfg, folder.workdir / CHECKPOINT, asdict(resolve_recipe(cfg)))
    if not log_prefix:
        log_hyperparams(fabric, cfg)
        note_interrupt(_kept_on_interrupt(folder))
    with folder.staged_run(main, fabric.barrier) as workdir:
        metrics = _train(cfg, workdir, fabric, progress, folder.resume, log_prefix, folder.staged or outer_staged)
        if not log_prefix:  # one run: its logs are complete (a multi-seed set closes them after the last seed)
            finalize_loggers(fabric, "success")
    return metrics


def _kept_on_interrupt(folder: RunFolder) -> str:
    """What Ctrl-C leaves of this run, and how to go on (printed on the interrupted line)."""
    if folder.staged:
        return f"nothing was replaced: {folder.out} still holds the previous run, unchanged"
    return f"{folder.out} keeps the run up to its last checkpoint; rerun the same command with --resume to continue"


def _train(
    cfg: TrainConfig, workdir: Path, fabric, progress: bool, resume: bool, log_prefix: str, staged: bool
) -> dict:
    """The run itself, written into ``workdir`` (``cfg.out``, or a staging folder that replaces it at the end).

    ``staged``: the run replaces another only once it finishes (see :func:`write_bad_files`).
    """
    out = workdir
    fabric.seed_everything(cfg.seed, verbose=False)
    # The split depends on split_seed alone (the data's own split when None; carved fractions use seed 0), never on
    # the initialisation seed: varying seeds and varying splits are separate sources of spread.
    source = load_source(
        cfg.data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=0, split_seed=cfg.split_seed
    )
    report = scan(source, progress=progress and fabric.is_global_zero)
    stops = bool(report.bad) and not cfg.skip_bad
    if fabric.is_global_zero:
        report.listing = write_bad_files(workdir, report, stops, staged)
    fabric.barrier()
    source, skipped = report.apply(source, skip_bad=cfg.skip_bad)
    if fabric.is_global_zero and progress:
        print(source.summary())
    if skipped and fabric.is_global_zero:
        print(f"skipped {skipped} unreadable file(s) (--skip-bad); listed in {Path(cfg.out) / BAD_FILES}")
    classes = list(source.classes)
    if len(classes) < 2:
        raise DataError(
            f"data {cfg.data} has {len(classes)} class ({', '.join(classes) or 'none'}); a classifier needs at "
            "least 2 classes with training images"
        )
    if not source.split("val"):
        raise ConfigError(f"data {cfg.data} has no validation samples; add val/ or raise --val-fraction")
    eval_split = "test" if source.split("test") else "val"

    recipe = resolve_recipe(cfg)
    check_probe_settings(cfg, recipe)
    task = build_task(cfg, classes)
    text_features, text_info = task_text_features(cfg, task)
    model = create_model(
        cfg.backbone,
        cfg.method,
        len(classes),
        task=task,
        weights=resolve_weights(cfg.backbone, cfg.weights),
        image_size=cfg.image_size,
        text_features=text_features,
        backbone_kwargs=cfg.backbone_kwargs,
        **cfg.switches,
    )
    if model.provenance.weights is None and fabric.is_global_zero:
        print(f"note: backbone '{cfg.backbone}' is randomly initialised (no --weights); fine for smoke tests only")
    if recipe.trainer == "steps" and fabric.is_global_zero:
        warning = zero_rate_warning(recipe.lr, recipe.head_lr, model.switches.train == "head")
        if warning:
            print(warning)
    spec = model.backbone.spec
    size = model.backbone.image_size
    train_tf = build_transforms(spec.mean, spec.std, size, train=True, augment=cfg.augment)
    eval_tf = build_transforms(spec.mean, spec.std, size, train=False, augment="none")
    plain = {split: PatchDataset(source.split(split), eval_tf) for split in dict.fromkeys(("train", "val", eval_split))}
    datasets = {**plain, "train": PatchDataset(source.split("train"), train_tf, seed=cfg.seed)}

    units = {split: [s.unit for s in source.split(split)] for split in SPLITS_USED}
    grouped = source.has_groups()
    head_only = model.switches.train == "head"
    cached = head_only and (recipe.trainer == "probe" or (cfg.cache_features and cfg.augment == "none"))
    cross_validated = recipe.trainer == "steps" and cfg.selection == "cv"
    feats: dict[str, FeatureSet] = {}
    probe = None
    if cached or (recipe.head_init == "probe" and not cross_validated):
        wanted = plain if cached else {k: plain[k] for k in ("train", "val")}
        feats = frozen_features(fabric, model, wanted, cfg, progress)
        for split, fs in feats.items():
            fs.groups = units.get(split)
    if (recipe.trainer == "probe" or recipe.head_init == "probe") and not cross_validated:
        refit = cfg.probe_refit and recipe.trainer == "probe"
        views = (
            augmented_views(fabric, model, source.split("train"), train_tf, cfg, progress) if cfg.probe.views else None
        )
        probe = fit_probe_head(model, feats, classes, cfg.monitor, refit, cfg.probe, views)

    if fabric.is_global_zero and not resume:  # a resumed run keeps its config.yaml until it has finished
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    if fabric.is_global_zero and not log_prefix and read_marker(out) is None:  # a seed is part of its set's record
        write_marker(out, "train")
    module: nn.Module = HeadOnly(model) if cached else model
    fit_sets = feats if cached else datasets
    t0 = time.perf_counter()
    budget, selection = None, None
    state = FitState(evaluated=True, best_step=0)
    params = model.trainable_parameters()
    if recipe.trainer == "steps":
        budget = plan_budget(
            len(fit_sets["train"]),
            cfg.batch_size,
            cfg.grad_accum,
            steps=cfg.steps,
            epochs=cfg.epochs,
            default_steps=recipe.steps,
            min_steps=recipe.min_steps,
            warmup_fraction=recipe.warmup_fraction,
            eval_every=cfg.eval_every,
            patience=cfg.patience,
        )
        if fabric.is_global_zero and progress:
            print(f"budget: {budget.steps} steps ({budget.source}), validation every {budget.eval_every}")
        extra = {"config": cfg.model_dump(mode="json"), "recipe": asdict(recipe)}
        if cross_validated:
            pool = source.split("train") + source.split("val")
            pool_feats = frozen_features(fabric, model, {"pool": PatchDataset(pool, eval_tf)}, cfg, progress)["pool"]
            state, _, probe = cv_select_and_fit(
                fabric, model, pool, pool_feats, train_tf, eval_tf, budget, recipe, cfg, classes,
                out / "checkpoints", resume, progress,
            )  # fmt: skip
        else:
            state = fit(
                fabric,
                module,
                fit_sets["train"],
                fit_sets["val"],
                budget,
                recipe.lr,
                recipe.head_lr,
                recipe.weight_decay,
                cfg.batch_size,
                out / "checkpoints" / "last.pt",
                cfg.seed,
                classes,
                grad_accum=cfg.grad_accum,
                monitor=cfg.monitor,
                workers=0 if cached else cfg.num_workers,
                resume=resume,
                progress=progress,
                checkpoint_extra=extra,
                log_prefix=log_prefix,
                selection="best" if cfg.selection == "best" else "significant",
                alpha=cfg.selection_alpha,
                val_groups=units["val"] if grouped else None,
            )
        params = model.trainable_parameters()  # what the method trained, before selection removes any group
        if cfg.select_groups and model.gates and not cross_validated:
            if cfg.selection == "significant" and state.best_step == 0:
                selection = drop_all_groups(model)  # step 0 kept: every gate shut, the model is the probe
            else:
                reference = state.val_probs[0].double().numpy() if state.val_probs else None
                groups = units["val"] if grouped else None
                selection = select_prompt_groups(fabric, model, fit_sets["val"], cfg, classes, reference, groups)
    fit_seconds = time.perf_counter() - t0

    eval_set = fit_sets[eval_split]
    t1 = time.perf_counter()
    probs, eval_loss = split_probs(fabric, module, eval_set, cfg)
    infer_seconds = time.perf_counter() - t1
    labels = np.asarray(eval_set.labels)
    eval_groups = units[eval_split] if grouped else None
    metrics = judged(labels, probs, classes, eval_groups, cfg)
    # The validation score of the model as kept: what chooses between variants (the strongest probe). None when
    # the model was fitted on validation too (a refit or UNI probe, cross-validated selection).
    honest_val = not cross_validated and (probe is None or probe.fit_on == "train")
    val_labels = np.asarray(fit_sets["val"].labels)
    val_score = None
    if honest_val:
        val_score = kept_val_score(state, selection, cfg.monitor) if recipe.trainer == "steps" else None
        if val_score is None and eval_split == "val":
            val_score = monitored(val_labels, probs, eval_loss, classes, cfg.monitor)
        elif val_score is None:
            val_probs, val_loss = split_probs(fabric, module, fit_sets["val"], cfg)
            val_score = monitored(val_labels, val_probs, val_loss, classes, cfg.monitor)
    tta, tta_rows = None, None
    if cfg.tta:
        tta_probs_eval = tta_probs(fabric, module, model, plain[eval_split], cfg, progress)
        tta = headline(judged(labels, tta_probs_eval, classes, eval_groups, cfg))
        tta["val_score"] = None
        if honest_val:
            vp = (
                tta_probs(fabric, module, model, plain["val"], cfg, progress) if eval_split != "val" else tta_probs_eval
            )
            tta["val_score"] = monitored(val_labels, vp, None, classes, cfg.monitor) if cfg.monitor != "loss" else None
        tta_rows = predictions_csv(datasets[eval_split], tta_probs_eval, classes)
    metrics.update(
        {
            "method": cfg.method,
            "backbone": cfg.backbone,
            "seed": cfg.seed,
            "split_seed": cfg.split_seed,
            "eval_split": eval_split,
            "val_score": val_score,
            "groups": {split: len(set(units[split])) for split in units} if grouped else None,
            "tta": tta,
            "text": text_info,
            "eval_loss": eval_loss,
            "n_train": len(datasets["train"]),
            "n_val": len(datasets["val"]),
            "n_test": len(eval_set),
            "trainable_params": params["trainable"],
            "total_params": params["total"],
            "kept_params": model.trainable_parameters()["trainable"],
            "trainable_percent": trainable_percent(params["trainable"], params["total"]),
            "image_size": size,
            "steps_run": state.step,
            "selected_step": state.best_step,
            "stopped_early": state.stopped_early,
            "budget": budget.to_dict() if budget else None,
            "probe": probe.summary() if probe else None,
            "prompt_groups": selection,
            "selection": state.selection or {"rule": cfg.selection if recipe.trainer == "steps" else None},
            "recipe": {
                "trainer": recipe.trainer,
                "head_init": recipe.head_init if recipe.trainer == "steps" else None,
                "lr": recipe.lr,
                "head_lr": recipe.head_lr,
                "weight_decay": recipe.weight_decay,
                "steps": budget.steps if budget else None,
                "monitor": cfg.monitor,
                "patience": cfg.patience,
                "augment": cfg.augment,
                "batch_size": cfg.batch_size,
                "cached_features": cached,
            },
            "train_seconds": fit_seconds,
            "train_images_per_second": state.train_images / state.train_seconds if state.train_seconds else None,
            "inference_images_per_second": (len(eval_set) / max(infer_seconds, 1e-9)) if not cached else None,
            "world_size": fabric.world_size,
            "precision": runtime.Runtime.of(fabric).precision,
            "skipped_files": skipped,
            "peak_memory_mb": peak_memory_mb(fabric),
        }
    )
    fabric.log_dict(
        {f"{log_prefix}{eval_split}_{k}": metrics[k] for k in SUMMARY_KEYS if metrics.get(k) is not None}, state.step
    )
    if fabric.is_global_zero:
        with final_outputs(out) as final:  # all of them appear together, metrics.json (a finished run) last
            bundle_extra = {**run_card_extra(metrics, SUMMARY_KEYS), "command": "pathotune train --config config.yaml"}
            if text_info and text_info["control"] != "none":
                bundle_extra["text_control"] = text_info  # the encoding the bundle carries is not its task text's
            save_bundle(model, final / "bundle", extra=bundle_extra)
            atomic_write_text(final / "log.csv", csv_text(state.history))
            atomic_write_text(final / "predictions.csv", predictions_csv(datasets[eval_split], probs, classes))
            if tta_rows is not None:
                atomic_write_text(final / "predictions_tta.csv", tta_rows)
            if resume:  # the resolved config differs from the checkpoint's in harmless keys only (num_workers...)
                atomic_write_text(final / "config.yaml", dump_config(cfg))
            title = f"{cfg.method} on {cfg.backbone}"
            write_run_report(final, metrics, state.history, classes, cfg.model_dump(mode="json"), title=title)
            atomic_write_json(final / "metrics.json", metrics)
    fabric.barrier()
    return metrics


def zero_rate_warning(lr: float, head_lr: float, head_only: bool) -> str | None:
    """One line when a learning rate of 0 freezes what a method would train."""
    if head_lr == 0 and (head_only or lr == 0):
        return "warning: every learning rate that applies is 0, so nothing trains; the run keeps its step-0 weights"
    if head_lr == 0:
        return "warning: head_lr is 0, so the head keeps the probe's weights; only the other parameters train"
    if lr == 0 and not head_only:
        return "warning: lr is 0, so prompts/adapters/backbone stay as initialised; only the head trains"
    return None


def train_seeds(cfg: TrainConfig, seeds: list[int], progress: bool = True) -> dict:
    """Repeat a run over seeds (one sub-folder each) and report mean ± std.

    The folder rules of a single run apply to the whole: ``--resume`` skips finished seeds and continues the
    unfinished one; ``--overwrite`` replaces the whole set once every seed has finished.
    """
    if len(set(seeds)) != len(seeds):
        twice = next(s for s in seeds if seeds.count(s) > 1)
        raise ConfigError(f"--seeds lists {twice} twice; each seed runs once (its folder is seed_{twice})")
    if len(seeds) <= 1:
        return train_run(cfg.model_copy(update={"seed": seeds[0] if seeds else cfg.seed}), progress=progress)
    folder = open_run_folder(cfg.out, cfg.resume, cfg.overwrite)
    if folder.finished is not None:
        print(*folder.notes, sep="\n")
        return folder.finished
    fabric = make_fabric(cfg, folder.workdir / "logs")
    try:
        return _seeds_in_folder(folder, cfg, seeds, fabric, progress)
    except BaseException:
        finalize_loggers(fabric, "failed")
        raise


def _seeds_in_folder(folder: RunFolder, cfg: TrainConfig, seeds: list[int], fabric, progress: bool) -> dict:
    """Every seed in its sub-folder of the run set's folder, then the mean ± std summary."""
    main = fabric.is_global_zero
    if folder.finished is not None:  # a finished seed of a resumed multi-seed run
        if main:
            print(*folder.notes, sep="\n")
        return folder.finished
    if main and folder.notes:
        print(*folder.notes, sep="\n")
    note_interrupt(_kept_on_interrupt(folder))
    with folder.staged_run(main, fabric.barrier) as workdir:
        runs = []
        for s in seeds:
            sub = cfg.model_copy(
                update={"seed": s, "out": os.path.join(cfg.out, f"seed_{s}"), "resume": False, "overwrite": False}
            )
            sub_folder = open_run_folder(workdir / f"seed_{s}", resume=folder.resume, overwrite=False)
            runs.append(_in_folder(sub_folder, sub, fabric, progress, f"seed_{s}/", folder.staged))
        agg = aggregate_seeds(runs, list(SUMMARY_KEYS))
        summary = {
            "method": cfg.method,
            "backbone": cfg.backbone,
            "seeds": seeds,
            **{k: agg[k] for k in SUMMARY_KEYS},
            "trainable_params": runs[0]["trainable_params"],
            "total_params": runs[0]["total_params"],
            "trainable_percent": trainable_percent(runs[0]["trainable_params"], runs[0]["total_params"]),
            "n_train": runs[0]["n_train"],
            "n_test": runs[0]["n_test"],
            "per_seed": [{k: r[k] for k in ("seed", *SUMMARY_KEYS)} for r in runs],
        }
        if main:
            table = markdown_table([{"metric": k, "mean ± std": agg[k]} for k in SUMMARY_KEYS])
            per_seed = markdown_table(summary["per_seed"])
            atomic_write_text(
                workdir / "report.md",
                f"# {cfg.method} on {cfg.backbone}: {len(seeds)} seeds\n\n{table}\n\n## Per seed\n\n{per_seed}\n\n"
                + "".join(f"- [seed {s}](seed_{s}/report.md)\n" for s in seeds),
            )
            if read_marker(workdir) is None:
                write_marker(workdir, "train")
            atomic_write_json(workdir / "metrics.json", summary)
        finalize_loggers(fabric, "success")
    return summary
