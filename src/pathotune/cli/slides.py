"""`pathotune slides ...`: whole slides end to end: tile, extract features, train MIL, predict, heatmaps.

Commands parse flags, call one library function each and print its result; the library is imported inside each
command so that `pathotune --help` does not load torch and the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from .common import console, print_table

app = typer.Typer(
    name="slides",
    help="Whole-slide images: tiling, feature extraction, slide-level MIL, heatmaps and QuPath GeoJSON.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SlidesOpt = Annotated[str, typer.Option("--slides", help="Folder of slides, one slide, or a CSV with slide_path.")]
MppOpt = Annotated[float | None, typer.Option("--mpp", help="Microns per pixel for slides whose file lacks it.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


@app.command()
def tile(
    slides: SlidesOpt,
    out: Annotated[Path, typer.Option(help="Folder for QC thumbnails and tile coordinate CSVs.")],
    target_mpp: Annotated[float, typer.Option(help="Microns per pixel of the tiles.")] = 0.5,
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels at the target mpp.")] = 224,
    overlap: Annotated[int, typer.Option(help="Pixels shared by neighbouring tiles.")] = 0,
    min_tissue: Annotated[float, typer.Option(help="Keep tiles with at least this tissue fraction.")] = 0.5,
    mpp: MppOpt = None,
    thumb_size: Annotated[int, typer.Option(help="Longer side of the QC thumbnail.")] = 1024,
) -> None:
    """Plan tiles per slide: <id>_qc.png (tissue outline and tiles), <id>_tiles.csv (level-0 x, y, tissue)."""
    from ..slides import TilingConfig, tile_slides

    cfg = TilingConfig(target_mpp=target_mpp, tile_size=tile_size, overlap=overlap, min_tissue=min_tissue)
    summary = tile_slides(slides, out, cfg, mpp=mpp, thumb_size=thumb_size)
    shown = ("slide_id", "tiles", "candidates", "level", "read_size", "slide_mpp")
    print_table([{k: r[k] for k in shown} for r in summary], title=f"tiles at {target_mpp:g} mpp, {tile_size} px")
    console.print(f"QC thumbnails and tile lists written to {out}")


@app.command()
def extract(
    slides: SlidesOpt,
    out: Annotated[Path, typer.Option(help="Folder for <slide_id>.h5 feature files.")],
    backbone: Annotated[str | None, typer.Option(help="Backbone id (see `pathotune backbones`).")] = None,
    weights: Annotated[str | None, typer.Option(help="Local weights file/folder, 'bundled' or 'random'.")] = None,
    bundle: Annotated[Path | None, typer.Option(help="Prompt bundle (or run folder): its prompted model.")] = None,
    target_mpp: Annotated[float, typer.Option(help="Microns per pixel of the tiles.")] = 0.5,
    tile_size: Annotated[int | None, typer.Option(help="Tile side at the target mpp (default: model input).")] = None,
    overlap: Annotated[int, typer.Option(help="Pixels shared by neighbouring tiles.")] = 0,
    min_tissue: Annotated[float, typer.Option(help="Keep tiles with at least this tissue fraction.")] = 0.5,
    image_size: Annotated[int | None, typer.Option(help="Model input size (default: the backbone's).")] = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    num_workers: Annotated[int | None, typer.Option(help="Tile-decoding processes (default min(4, CPUs)).")] = None,
    mpp: MppOpt = None,
    devices: Annotated[str, typer.Option(help="Devices per node: a count or 'auto'.")] = "1",
    accelerator: Annotated[str, typer.Option(help="auto, cpu, gpu...")] = "auto",
    strategy: Annotated[str, typer.Option(help="auto, ddp...; slides are shared out across ranks.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 autocast on GPU), 32-true...")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute slides that have features.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Tile features per slide into <out>/<slide_id>.h5; finished slides are skipped on a rerun."""
    from ..engine.runtime import make_fabric
    from ..slides import TilingConfig, find_slides
    from ..slides.extract import extract_slides
    from ..slides.extractor import load_extractor

    paths = find_slides(slides)
    ex = load_extractor(backbone=backbone, weights=weights, bundle=bundle, image_size=image_size)
    cfg = TilingConfig(
        target_mpp=target_mpp, tile_size=tile_size or ex.image_size, overlap=overlap, min_tissue=min_tissue
    )
    fabric = make_fabric(accelerator, _devices(devices), strategy, precision)
    results = extract_slides(
        ex,
        paths,
        out,
        tiling=cfg,
        mpp_override=mpp,
        batch_size=batch_size,
        num_workers=num_workers,
        fabric=fabric,
        overwrite=overwrite,
        progress=not quiet,
    )
    if fabric.global_rank != 0:
        return
    rows = [
        {
            "slide_id": r.slide_id,
            "status": r.status,
            "tiles": r.n_tiles,
            "seconds": r.seconds if r.status == "extracted" else None,
            "tiles/s": r.tiles_per_s if r.status == "extracted" else None,
        }
        for r in results
    ]
    model = f"bundle {ex.bundle_path}" if ex.bundle_path else ex.backbone
    print_table(rows, title=f"{model}: {ex.feature_dim}-d features, {cfg.tile_size} px tiles at {target_mpp:g} mpp")
    if fabric.world_size > 1:
        console.print(f"rank 0's share shown; extract_log.csv lists the slides of all {fabric.world_size} ranks")
    console.print(f"features written to {out} (extract_log.csv has per-slide timing)")


@app.command()
def train(
    features: Annotated[str, typer.Option(help="Folder of <slide_id>.h5 from `slides extract`.")],
    labels: Annotated[str, typer.Option(help="CSV with slide_id and label (optional split or fold column).")],
    aggregator: Annotated[str, typer.Option(help="MIL aggregator (abmil, ...).")] = "abmil",
    folds: Annotated[int, typer.Option(help="Cross-validation folds when the CSV has no split/fold column.")] = 5,
    epochs: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[str, typer.Option(help="Run folder.")] = "runs/mil",
    quiet: QuietOpt = False,
) -> None:
    """Slide-level MIL on extracted features; prints each fold and the mean ± std over folds."""
    from ..mil import load_mil_config, train_mil

    cfg = load_mil_config(
        None,
        features=features,
        labels=labels,
        aggregator=aggregator,
        folds=folds,
        epochs=epochs,
        lr=lr,
        seed=seed,
        out=out,
    )
    m = train_mil(cfg, progress=not quiet)
    keys = [k for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc") if k in m]
    rows = [
        {"fold": r.get("fold"), "n_test": r.get("n_test"), **{k: r.get(k) for k in keys}} for r in m.get("per_fold", [])
    ]
    rows.append({"fold": "mean ± std", "n_test": None, **{k: m.get(k) for k in keys}})
    print_table(rows, title=f"MIL {aggregator}: {m.get('n_slides', '?')} slides, classes {m.get('classes')}")
    console.print(f"run written to {out} (metrics.json, report.md, fold models)")


@app.command()
def predict(
    model: Annotated[str, typer.Option("--model", help="Run folder from `slides train` (or one fold).")],
    features: Annotated[str, typer.Option(help="Folder of <slide_id>.h5 (or one file).")],
    out: Annotated[Path, typer.Option(help="CSV of slide-level predictions.")] = Path("slide_predictions.csv"),
) -> None:
    """Slide-level class probabilities (averaged over fold models) as CSV."""
    from ..mil import predict_slides, write_slide_predictions

    preds = predict_slides(model, features)
    write_slide_predictions(preds, out)
    console.print(f"{len(preds)} slide predictions written to {out}")


@app.command()
def heatmap(
    features: Annotated[str, typer.Option(help="Folder of <slide_id>.h5 (or one file).")],
    out: Annotated[Path, typer.Option(help="Folder for heatmap PNGs and GeoJSON.")],
    model: Annotated[str | None, typer.Option("--model", help="MIL run folder: paints attention.")] = None,
    bundle: Annotated[Path | None, typer.Option(help="Patch bundle: paints its per-tile class probabilities.")] = None,
    slides: Annotated[str | None, typer.Option(help="Slides (folder/CSV); default: paths in the features.")] = None,
    weights: Annotated[str | None, typer.Option(help="Backbone weights for --bundle, if not where it says.")] = None,
    max_size: Annotated[int, typer.Option(help="Longer side of the heatmap thumbnail.")] = 1024,
    alpha: Annotated[float, typer.Option(help="Opacity of the colours over the slide.")] = 0.5,
) -> None:
    """Per slide: heatmap PNG(s) over the thumbnail and <id>.geojson of tile scores (QuPath: import objects)."""
    from ..heatmaps import bundle_heatmaps, mil_heatmaps

    if (model is None) == (bundle is None):
        raise ConfigError("pass exactly one of --model (a MIL run) or --bundle (a patch bundle)")
    if model is not None:
        done = mil_heatmaps(model, features, out, slides=slides, max_size=max_size, alpha=alpha)
        rows = [
            {
                "slide_id": d["slide_id"],
                "pred": d["pred"],
                "tiles": d["n_tiles"],
                "heatmaps": ", ".join(p.name for p in d["heatmaps"]),
            }
            for d in done
        ]
    else:
        done = bundle_heatmaps(bundle, features, out, slides=slides, weights=weights, max_size=max_size, alpha=alpha)
        rows = [
            {
                "slide_id": d["slide_id"],
                "tiles": d["n_tiles"],
                **{f"% {c}": f"{100 * v:.1f}" for c, v in d["class_share"].items()},
            }
            for d in done
        ]
    print_table(rows, title=f"heatmaps ({'MIL attention' if model else 'tile class probabilities'})")
    console.print(f"heatmaps and GeoJSON written to {out}")
