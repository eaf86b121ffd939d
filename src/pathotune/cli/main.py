"""`pathotune`: one entry point; each command group lives in its own module."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ..core.allocator import retain_freed_memory
from ..engine.config import DEFAULT_PRECISION, TrainConfig
from ..version import __version__
from .common import (
    PrecisionOpt,
    console,
    fmt,
    human_output,
    inference_runtime,
    parse_switches,
    print_json,
    print_table,
)
from .config_flags import config_flags, flag_names, overrides
from .errors import run_cli

app = typer.Typer(
    name="pathotune",
    help="Adapt frozen vision foundation models to pathology with multi-modal prompt tuning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _show_version(value: bool) -> None:
    if value:
        print(f"pathotune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_show_version, is_eager=True)
    ] = False,
) -> None:
    """Errors print one line and exit 2; --debug shows the traceback."""


# Options shared by the commands that run a model (train, eval, predict).
JsonOpt = Annotated[bool, typer.Option("--json", help="Results as JSON on stdout (everything else on stderr).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars (TQDM_DISABLE=1 does the same).")]
DevicesOpt = Annotated[str, typer.Option(help="Devices: a count, -1 (all), 'auto' or indices such as '0,1'.")]
AcceleratorOpt = Annotated[str, typer.Option(help="auto, cpu, gpu...")]
WorkersOpt = Annotated[int, typer.Option(help="Image-decoding loader processes.")]


@app.command()
@config_flags(TrainConfig, after="config")
def train(
    config: Annotated[Path | None, typer.Option(help="YAML config; flags override it.")] = None,
    seeds: Annotated[list[int] | None, typer.Option(help="Repeat over seeds: --seeds 0 1 2 3 4.")] = None,
    switch: Annotated[list[str] | None, typer.Option(help="Prompt switch KEY=VALUE (repeatable).")] = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    **flags: Any,
) -> None:
    """Train a method on a backbone; writes config, metrics, report, bundle, checkpoints and a CSV log.

    Every other option is a field of the run's config (engine/config.py), built by cli/config_flags.py."""
    from ..engine.config import load_config
    from ..engine.run import train_seeds
    from ..report import format_percent, trainable_percent

    names = {**flag_names(TrainConfig), "switches": "--switch"}
    cfg = load_config(
        config, flag_names=names, **overrides(TrainConfig, flags), switches=parse_switches(switch) or None
    )
    with human_output(json_out):
        result = train_seeds(cfg, seeds or [cfg.seed], progress=not quiet)
        keys = ["accuracy", "balanced_accuracy", "macro_f1", "auroc"]
        print_table([{"metric": k, "value": result.get(k)} for k in keys], title=f"{cfg.method} on {cfg.backbone}")
        trainable, total = result["trainable_params"], result["total_params"]
        console.print(
            f"trainable params: {trainable:,} of {total:,} ({format_percent(trainable_percent(trainable, total))})"
        )
        console.print(f"run written to {cfg.out} (report.md, metrics.json, bundle/)")
    if json_out:
        print_json({**result, "out": cfg.out})


@app.command("eval")
def evaluate(
    bundle: Annotated[str, typer.Argument(help="A bundle folder or a run folder.")],
    data: Annotated[str, typer.Option(help="Labelled data: folder, CSV or layout:<name>:<path>.")],
    split: Annotated[str, typer.Option(help="auto (test, else val, else all), test, val, train or all.")] = "auto",
    weights: Annotated[
        str | None,
        typer.Option(help="Backbone weights (a local path or hf-hub:owner/repo[:file]), if not where the bundle says."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    num_workers: WorkersOpt = 0,
    devices: DevicesOpt = "1",
    accelerator: AcceleratorOpt = "auto",
    precision: PrecisionOpt = DEFAULT_PRECISION,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Go on without unreadable files.")] = False,
    tta: Annotated[bool, typer.Option("--tta", help="Average the 8 rot90 x flip views of every image.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Write metrics.json and report.md here (into OUT/eval/<data>-<split>/ if OUT holds a run)."),
    ] = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Judge a trained bundle on labelled data."""
    from ..core.metrics import METRIC_NAMES
    from ..engine.infer import evaluate as run_eval
    from ..engine.infer import write_evaluation
    from ..engine.runfolder import check_out_usable

    if out is not None:
        check_out_usable(out)  # before any work
    with human_output(json_out):
        rt = inference_runtime(accelerator, devices, precision)
        m = run_eval(
            bundle,
            data,
            split=split,
            weights=weights,
            batch_size=batch_size,
            workers=num_workers,
            progress=not quiet,
            runtime=rt,
            skip_bad=skip_bad,
            tta=tta,
        )
        if not rt.main:
            return
        ci = m.get("ci") or {}
        note = m.get("ci_note")
        print_table(
            [{"metric": k, "value": m[k], "95% CI": note or ci.get(k)} for k in METRIC_NAMES],
            title=f"{bundle} on {data} ({m['split']}, n={m['n']})",
        )
        if out is not None:
            m["written_to"] = str(write_evaluation(out, m))
            console.print(f"written to {m['written_to']}")
    if json_out:
        print_json(m)


@app.command()
def predict(
    inputs: Annotated[list[str], typer.Argument(help="[BUNDLE] then image files or folders.")],
    bundle: Annotated[
        list[str] | None, typer.Option("--bundle", help="A bundle or run folder; repeat to serve several tasks.")
    ] = None,
    out: Annotated[Path, typer.Option(help="CSV of per-class probabilities.")] = Path("predictions.csv"),
    weights: Annotated[
        str | None,
        typer.Option(help="Backbone weights (a local path or hf-hub:owner/repo[:file]), if not where the bundle says."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images x tasks per forward pass.")] = 32,
    num_workers: WorkersOpt = 0,
    devices: DevicesOpt = "1",
    accelerator: AcceleratorOpt = "auto",
    precision: PrecisionOpt = DEFAULT_PRECISION,
    tta: Annotated[bool, typer.Option("--tta", help="Average the 8 rot90 x flip views of every image.")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Per-class probabilities for images, as CSV. Several --bundle share one backbone forward."""
    from ..engine.infer import check_output_file, predict_to_csv, settings
    from ..errors import ConfigError

    bundles = list(bundle or [])
    if not bundles:
        if len(inputs) < 2:
            raise ConfigError("predict needs a bundle and images: `pathotune predict BUNDLE IMAGES...`")
        bundles, inputs = [inputs[0]], inputs[1:]
    check_output_file(out)  # before Fabric starts
    with human_output(json_out):
        rt = inference_runtime(accelerator, devices, precision)
        files, results = predict_to_csv(
            bundles,
            inputs,
            out,
            weights=weights,
            batch_size=batch_size,
            workers=num_workers,
            progress=not quiet,
            runtime=rt,
            tta=tta,
        )
        if not rt.main:
            return
        console.print(f"{len(files)} images x {len(results)} task(s) written to {out}")
    if json_out:
        rows = [
            {
                "path": str(path),
                "tasks": {
                    name: {
                        "pred": classes[int(probs[i].argmax())],
                        "probs": dict(zip(classes, probs[i].tolist(), strict=True)),
                    }
                    for name, (classes, probs) in results.items()
                },
            }
            for i, path in enumerate(files)
        ]
        print_json({"out": str(out), **settings(rt, batch_size, num_workers), "predictions": rows})


@app.command()
def backbones() -> None:
    """Registered backbones (any timm ViT name works too)."""
    from ..backbones import get_backbone_spec, list_backbones

    rows = []
    for name in list_backbones():
        s = get_backbone_spec(name)
        rows.append(
            {
                "id": name,
                "family": s.family,
                "timm arch": s.timm_name,
                "px": s.image_size,
                "pool": s.pool,
                "weights": "bundled" if s.bundled else s.weights_hint,
            }
        )
    print_table(rows, title="backbones")


@app.command()
def methods() -> None:
    """Methods: presets of prompt modules and what trains."""
    from ..methods import METHODS

    rows = [
        {
            "method": m.name,
            "switches": ", ".join(f"{k}={v}" for k, v in m.switches.items()) or "–",
            "trains by": "L-BFGS probe" if m.recipe.trainer == "probe" else f"{m.recipe.steps} AdamW steps",
            "head from": "–" if m.recipe.trainer == "probe" else m.recipe.head_init,
            "lr": "–" if m.recipe.trainer == "probe" else m.recipe.lr,
            "head lr": "–" if m.recipe.trainer == "probe" else m.recipe.head_lr,
            "description": m.description,
        }
        for m in METHODS.values()
    ]
    print_table(rows, title="methods")


@app.command()
def info(
    bundle: Annotated[str, typer.Argument(help="A bundle folder or a run folder.")],
    json_out: JsonOpt = False,
) -> None:
    """What a bundle holds and what it was trained on."""
    from ..bundle import TENSORS, read_manifest, resolve_bundle

    path = resolve_bundle(bundle)
    m = read_manifest(path)  # checked: every key below is there, and (format 2) unedited
    prov = m["provenance"]
    n = sum(int(math.prod(s)) for s in m["tensors"].values())
    size = (path / TENSORS).stat().st_size if (path / TENSORS).is_file() else 0
    extra = m.get("extra")
    metrics = extra.get("metrics") if isinstance(extra, dict) and isinstance(extra.get("metrics"), dict) else {}
    if json_out:
        print_json(
            {
                "path": str(path),
                "method": m["method"],
                "backbone": prov["backbone"],
                "image_size": prov["image_size"],
                "weights": prov["weights"],
                "fingerprint": prov["fingerprint"],
                "classes": m["class_names"],
                "task_text": m.get("task_text", ""),
                "tensors": len(m["tensors"]),
                "values": n,
                "bytes": size,
                "format_version": m["format_version"],
                "pathotune_version": m.get("pathotune_version"),
                "metrics": metrics,
            }
        )
        return
    rows = [
        {"field": "method", "value": m["method"]},
        {"field": "backbone", "value": f"{prov['backbone']} ({prov['image_size']} px)"},
        {"field": "weights", "value": str(prov["weights"])},
        {"field": "fingerprint", "value": prov["fingerprint"]},
        {"field": "classes", "value": ", ".join(m["class_names"])},
        {"field": "task text", "value": m.get("task_text", "")},
        {"field": "tensors", "value": f"{len(m['tensors'])} ({n:,} values, {size / 1024:.1f} KiB)"},
        {"field": "format", "value": f"{m['format_version']} (pathotune {m.get('pathotune_version', '?')})"},
    ]
    if metrics:  # rounded as every table shows them; --json gives the stored values
        rows.append({"field": "metrics", "value": ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items())})
    print_table(rows, title=str(path))


@app.command()
def push(
    bundle: Annotated[str, typer.Argument(help="A bundle folder or a run folder (its metrics and config go along).")],
    repo: Annotated[str, typer.Option(help="Hugging Face model repo, owner/name (created if it does not exist).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to (created from main if missing).")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
) -> None:
    """Share a bundle on the Hugging Face Hub with a generated model card (log in first: `hf auth login`)."""
    from ..bundle import push_bundle

    url = push_bundle(bundle, repo, private=True if private else None, revision=revision, create_pr=create_pr)
    console.print(f'pushed to {url}; load it with PathoTuneModel.from_pretrained("{repo}") or hf-hub:{repo}')


@app.command()
def bench(
    config: Annotated[Path, typer.Option(help="A benchmark grid, e.g. benchmarks/real_tasks.yaml.")],
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Train nothing: report the finished cells and name the missing ones.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check the grid starts: build its cells and data, list them; train nothing."),
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only", help="Train only this method's cells (repeatable); the report covers all finished cells."
        ),
    ] = None,
    splits: Annotated[
        list[int] | None, typer.Option("--splits", help="Train only this split's cells (repeatable).")
    ] = None,
) -> None:
    """Run (or resume) a grid of methods x datasets x splits x seeds; writes its section of BENCHMARKS.md."""
    from ..engine.bench import load_bench_config, plan_bench, run_bench

    cfg = load_bench_config(config)
    if dry_run:
        console.print(plan_bench(cfg, str(config)))
        return
    summary = run_bench(cfg, str(config), progress=not quiet, train=not report_only, only=only, splits=splits)
    console.print(summary.read_text())
    console.print(f"summary: {summary}; merged into {cfg.output}")


def _register_groups() -> None:
    from . import demo, serve, slides

    app.command(name="demo")(demo.demo)
    app.command(name="serve")(serve.serve)
    app.add_typer(slides.app, name="slides")


_register_groups()


def main() -> None:
    retain_freed_memory()  # a CLI process owns its allocator: keep freed buffers for reuse (core/allocator.py)
    run_cli(app)


if __name__ == "__main__":
    main()
