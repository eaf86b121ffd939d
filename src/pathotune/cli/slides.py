"""`pathotune slides ...`: whole slides end to end: tile, extract features, train MIL, predict, heatmaps.

Commands parse flags, call one library function each and print its result; the library is imported inside each
command so that `pathotune --help` does not load torch and the models.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..engine.config import DEFAULT_PRECISION
from ..errors import ConfigError
from .common import PrecisionOpt, cohort_exit, console, human_output, print_json, print_table

app = typer.Typer(
    name="slides",
    help="Whole-slide images: tiling, feature extraction, slide-level MIL, heatmaps and QuPath GeoJSON.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SlidesOpt = Annotated[
    str, typer.Option("--slides", help="Folder of slides, one slide, or a CSV with slide_path (optional mpp column).")
]
MppOpt = Annotated[
    float | None,
    typer.Option(
        "--mpp", help="Microns per level-0 pixel for every slide (over its metadata); a slide list's mpp column wins."
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Results as JSON on stdout (everything else on stderr).")]
SkipErrorsOpt = Annotated[
    bool,
    typer.Option(
        "--skip-errors",
        help="Go on past slides that fail (listed in OUT/errors.csv; exit code 3); a rerun retries only those.",
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace what OUT holds, once the new outputs are complete.")
]
RepairGeojsonOpt = Annotated[
    bool,
    typer.Option(
        "--repair-geojson", help="Repair invalid tissue polygons with shapely's make_valid instead of refusing."
    ),
]

# -- tiling and tissue options, shared by `slides tile` and `slides extract` -------------------------------------
TargetMppOpt = Annotated[
    float | None, typer.Option(help="Microns per pixel of the tiles; default 0.5 (20x). Or give --mag.")
]
MagOpt = Annotated[
    float | None,
    typer.Option(
        "--mag", help="Tile magnification instead of --target-mpp: mpp = 10 / mag (40x = 0.25, 20x = 0.5, 10x = 1)."
    ),
]
OverlapOpt = Annotated[int | None, typer.Option(help="Pixels shared by neighbouring tiles; default 0.")]
MinTissueOpt = Annotated[
    float | None,
    typer.Option(help="Keep tiles with at least this tissue fraction; default 0.5 (0 with --coords: keep all)."),
]
CoordsOpt = Annotated[
    Path | None,
    typer.Option(
        help="TRIDENT or CLAM output folder (<slide>_patches.h5 or patches/<slide>.h5): use its tiles instead of a "
        "grid, at their size and scale (so no --target-mpp, --mag, --tile-size, --overlap)."
    ),
]
TissueGeojsonOpt = Annotated[
    Path | None,
    typer.Option(
        help="Folder of <slide_id>.geojson (QuPath or TRIDENT polygons with holes, level-0 pixels; or one file for "
        "one slide): the tissue mask, instead of Otsu's."
    ),
]
TissueMethodOpt = Annotated[
    str, typer.Option(help="Otsu mask: 'otsu' picks a threshold per slide, 'fixed' uses --tissue-threshold.")
]
TissueChannelOpt = Annotated[
    str, typer.Option(help="'saturation' (HSV S, stained tissue) or 'darkness' (1 - grey, unstained or grey).")
]
TissueThresholdOpt = Annotated[
    float | None, typer.Option(help="A fixed cut on the channel's 0..1 scale; when given it replaces Otsu's.")
]
TissueMinThresholdOpt = Annotated[
    float, typer.Option(help="Otsu never cuts below this, so blank glass gives no tissue instead of split noise.")
]
TissueCloseOpt = Annotated[
    int, typer.Option(help="Closing radius (mask pixels): joins nearby fragments, bridges pale gaps; 0 = off.")
]
TissueOpenOpt = Annotated[int, typer.Option(help="Opening radius (mask pixels): removes dust and specks; 0 = off.")]
FillHolesOpt = Annotated[bool, typer.Option(help="Fill holes enclosed by tissue (pale, nuclei-poor areas).")]
MaxHoleFracOpt = Annotated[
    float, typer.Option(help="Holes above this fraction of the mask stay open (lumen, tears); 1 fills every hole.")
]
MinAreaFracOpt = Annotated[
    float, typer.Option(help="Drop tissue pieces below this fraction of the mask (debris, dirt); 0 keeps all.")
]
MaskSizeOpt = Annotated[
    int, typer.Option(help="Longer side (px) of the thumbnail the tissue mask is found on, or a GeoJSON drawn on.")
]
# -- artifact flags (pen, blur, fold), shared by `slides tile` and `slides extract` -----------------------------
DropArtifactsOpt = Annotated[
    str,
    typer.Option(help="Drop tiles flagged as any of these (comma-separated: pen, blur, fold; or all, none)."),
]
MaxArtifactOpt = Annotated[
    float, typer.Option(help="A tile is dropped when more than this fraction of it is flagged by a dropped kind.")
]
BlurThresholdOpt = Annotated[
    float,
    typer.Option(help="Blur: tissue whose fine detail (|Laplacian|) is below this fraction of the slide's median."),
]
FoldThresholdOpt = Annotated[
    float, typer.Option(help="Fold: tissue darker than this grey level (0..1; HistoQC's dark-tissue 0.15).")
]


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _target_mpp(
    target_mpp: float | None, mag: float | None, tile_size: int | None, overlap: int | None, coords: Path | None
) -> float | None:
    """The tiles' resolution from --target-mpp or --mag (default 0.5); None with --coords, whose files give the
    tiles' size and scale, so flags that set them too are refused."""
    from ..slides.tiling import resolve_target_mpp

    if coords is None:
        return resolve_target_mpp(target_mpp, mag)
    flags = (("--target-mpp", target_mpp), ("--mag", mag), ("--tile-size", tile_size), ("--overlap", overlap))
    given = [f for f, v in flags if v is not None]
    if given:
        raise ConfigError(f"--coords takes the tiles' size and scale from {coords}; drop {', '.join(given)}")
    return None


def _min_tissue(min_tissue: float | None, coords: Path | None) -> float:
    """--min-tissue, by default 0.5 on a grid and 0 on another tool's tiles (which that tool already chose)."""
    return min_tissue if min_tissue is not None else 0.0 if coords is not None else 0.5


def _artifacts(qc: str | None, drop: str, max_artifact: float, blur_threshold: float, fold_threshold: float) -> Any:
    """The ArtifactConfig of the --qc / --drop-artifacts flags; without --qc (extract) only the dropped kinds run."""
    from ..slides.artifacts import ArtifactConfig, parse_kinds

    dropped = parse_kinds(drop, "--drop-artifacts")
    kinds = dropped if qc is None else parse_kinds(qc, "--qc")
    return ArtifactConfig(
        kinds=kinds,
        drop=dropped,
        max_fraction=max_artifact,
        blur_threshold=blur_threshold,
        fold_threshold=fold_threshold,
    )


def _tissue(
    method: str,
    channel: str,
    threshold: float | None,
    min_threshold: float,
    close: int,
    open_: int,
    fill_holes: bool,
    max_hole_frac: float,
    min_area_frac: float,
) -> Any:
    """The TissueConfig of the --tissue-* flags (the Otsu mask; unused for slides with a tissue GeoJSON)."""
    from ..slides.tissue import TissueConfig

    return TissueConfig(
        method=method,
        channel=channel,
        threshold=threshold,
        min_threshold=min_threshold,
        close_radius=close,
        open_radius=open_,
        fill_holes=fill_holes,
        max_hole_frac=max_hole_frac,
        min_area_frac=min_area_frac,
    )


@app.command()
def tile(
    slides: SlidesOpt,
    out: Annotated[
        Path, typer.Option(help="Folder for QC thumbnails, tile lists, TRIDENT <id>_patches.h5 and tissue GeoJSON.")
    ],
    target_mpp: TargetMppOpt = None,
    mag: MagOpt = None,
    tile_size: Annotated[int | None, typer.Option(help="Tile side in pixels at the target mpp; default 224.")] = None,
    overlap: OverlapOpt = None,
    min_tissue: MinTissueOpt = None,
    mpp: MppOpt = None,
    thumb_size: Annotated[int, typer.Option(help="Longer side of the QC thumbnail.")] = 1024,
    coords: CoordsOpt = None,
    tissue_geojson: TissueGeojsonOpt = None,
    repair_geojson: RepairGeojsonOpt = False,
    tissue_method: TissueMethodOpt = "otsu",
    tissue_channel: TissueChannelOpt = "saturation",
    tissue_threshold: TissueThresholdOpt = None,
    tissue_min_threshold: TissueMinThresholdOpt = 0.05,
    tissue_close: TissueCloseOpt = 2,
    tissue_open: TissueOpenOpt = 1,
    fill_holes: FillHolesOpt = True,
    max_hole_frac: MaxHoleFracOpt = 0.02,
    min_area_frac: MinAreaFracOpt = 0.0005,
    mask_size: MaskSizeOpt = 1024,
    qc: Annotated[
        str,
        typer.Option(
            "--qc", help="Artifact flags to compute and write (comma-separated: pen, blur, fold; or all, none)."
        ),
    ] = "pen,blur,fold",
    drop_artifacts: DropArtifactsOpt = "none",
    max_artifact: MaxArtifactOpt = 0.25,
    blur_threshold: BlurThresholdOpt = 0.2,
    fold_threshold: FoldThresholdOpt = 0.15,
    skip_errors: SkipErrorsOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> int | None:
    """Plan tiles per slide: <id>_qc.png (tissue outline, artifacts and tiles), <id>_tiles.csv (level-0 x, y,
    tissue and artifact fractions), <id>_patches.h5 (TRIDENT's layout, for `extract --coords`),
    <id>_tissue.geojson (QuPath annotations, for `--tissue-geojson`), and per --qc flag <id>_<flag>.png and
    <id>_<flag>.geojson (pen, blur, fold). A rerun does only the slides not done yet."""
    from ..slides.inputs import slide_inputs
    from ..slides.qc import tile_slides
    from ..slides.tiling import TilingConfig

    with human_output(json_out):
        artifacts = _artifacts(qc, drop_artifacts, max_artifact, blur_threshold, fold_threshold)
        target = _target_mpp(target_mpp, mag, tile_size, overlap, coords)
        cfg = TilingConfig(target, tile_size or 224, overlap or 0, _min_tissue(min_tissue, coords), mask_size)
        tissue = _tissue(
            tissue_method,
            tissue_channel,
            tissue_threshold,
            tissue_min_threshold,
            tissue_close,
            tissue_open,
            fill_holes,
            max_hole_frac,
            min_area_frac,
        )
        inputs = slide_inputs(
            slides, mpp=mpp, coords=coords, tissue_geojson=tissue_geojson, repair_geojson=repair_geojson
        )
        rows = tile_slides(
            inputs,
            out,
            cfg,
            thumb_size=thumb_size,
            tissue=tissue,
            artifacts=artifacts,
            skip_errors=skip_errors,
            overwrite=overwrite,
        )
        shown = ("slide_id", "status", "tiles", "candidates", "level", "read_size", "slide_mpp", *artifacts.kinds)
        shown += ("dropped",) if artifacts.drop else ()
        what = f"tiles of {coords}" if coords else f"tiles at {cfg.target_mpp:g} mpp, {cfg.tile_size} px"
        print_table([{k: r.get(k) for k in shown} for r in rows], title=what)
        flags = f"; {', '.join(artifacts.kinds)}: fraction of the tissue flagged" if artifacts.kinds else ""
        console.print(f"QC thumbnails, tile lists, patches.h5, tissue and artifact GeoJSON in {out}{flags}")
        code = cohort_exit(rows, out)
    if json_out:
        print_json({"out": str(out), "slides": rows})
    return code


@app.command()
def extract(
    slides: SlidesOpt,
    out: Annotated[Path, typer.Option(help="Folder for <slide_id>.h5 feature files.")],
    backbone: Annotated[str | None, typer.Option(help="Backbone id (see `pathotune backbones`).")] = None,
    weights: Annotated[str | None, typer.Option(help="Local weights file/folder, 'bundled' or 'random'.")] = None,
    bundle: Annotated[Path | None, typer.Option(help="Prompt bundle (or run folder): its prompted model.")] = None,
    target_mpp: TargetMppOpt = None,
    mag: MagOpt = None,
    tile_size: Annotated[int | None, typer.Option(help="Tile side at the target mpp (default: model input).")] = None,
    overlap: OverlapOpt = None,
    min_tissue: MinTissueOpt = None,
    image_size: Annotated[int | None, typer.Option(help="Model input size (default: the backbone's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 32,
    num_workers: Annotated[
        int | None,
        typer.Option(
            help="Tile-decoding processes (default: min(4, CPUs) beside a GPU; on the CPU, the cores that the "
            "model's threads leave free)."
        ),
    ] = None,
    chunk_tiles: Annotated[
        int,
        typer.Option(
            min=1, help="Tiles kept per chunk while a slide runs (whole batches): an interrupted slide resumes there."
        ),
    ] = 1024,
    mpp: MppOpt = None,
    coords: CoordsOpt = None,
    tissue_geojson: TissueGeojsonOpt = None,
    repair_geojson: RepairGeojsonOpt = False,
    tissue_method: TissueMethodOpt = "otsu",
    tissue_channel: TissueChannelOpt = "saturation",
    tissue_threshold: TissueThresholdOpt = None,
    tissue_min_threshold: TissueMinThresholdOpt = 0.05,
    tissue_close: TissueCloseOpt = 2,
    tissue_open: TissueOpenOpt = 1,
    fill_holes: FillHolesOpt = True,
    max_hole_frac: MaxHoleFracOpt = 0.02,
    min_area_frac: MinAreaFracOpt = 0.0005,
    mask_size: MaskSizeOpt = 1024,
    drop_artifacts: DropArtifactsOpt = "none",
    max_artifact: MaxArtifactOpt = 0.25,
    blur_threshold: BlurThresholdOpt = 0.2,
    fold_threshold: FoldThresholdOpt = 0.15,
    devices: Annotated[str, typer.Option(help="Devices per node: a count or 'auto'.")] = "1",
    num_nodes: Annotated[int, typer.Option(min=1, help="Machines (SLURM: one srun task per device).")] = 1,
    accelerator: Annotated[str, typer.Option(help="auto, cpu, gpu...")] = "auto",
    strategy: Annotated[str, typer.Option(help="auto, ddp...; slides are shared out across ranks.")] = "auto",
    precision: PrecisionOpt = DEFAULT_PRECISION,
    skip_errors: SkipErrorsOpt = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Recompute every slide; the old features stay until the new set is done."),
    ] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> int | None:
    """Tile features per slide into <out>/<slide_id>.h5; finished slides are skipped on a rerun, and a slide that
    was interrupted resumes from its last finished chunk."""
    from ..core.runtime import make_fabric
    from ..slides.extract import extract_slides
    from ..slides.extractor import load_extractor
    from ..slides.inputs import slide_inputs
    from ..slides.tiling import TilingConfig

    with human_output(json_out):
        artifacts = _artifacts(None, drop_artifacts, max_artifact, blur_threshold, fold_threshold)
        target = _target_mpp(target_mpp, mag, tile_size, overlap, coords)
        tissue = _tissue(
            tissue_method,
            tissue_channel,
            tissue_threshold,
            tissue_min_threshold,
            tissue_close,
            tissue_open,
            fill_holes,
            max_hole_frac,
            min_area_frac,
        )
        inputs = slide_inputs(
            slides, mpp=mpp, coords=coords, tissue_geojson=tissue_geojson, repair_geojson=repair_geojson
        )
        ex = load_extractor(backbone=backbone, weights=weights, bundle=bundle, image_size=image_size)
        cfg = TilingConfig(target, tile_size or ex.image_size, overlap or 0, _min_tissue(min_tissue, coords), mask_size)
        fabric = make_fabric(accelerator, _devices(devices), strategy, precision, num_nodes=num_nodes)
        results = extract_slides(
            ex,
            inputs,
            out,
            tiling=cfg,
            tissue=tissue,
            batch_size=batch_size,
            num_workers=num_workers,
            fabric=fabric,
            overwrite=overwrite,
            progress=not quiet,
            skip_errors=skip_errors,
            chunk_tiles=chunk_tiles,
            artifacts=artifacts,
        )
        if fabric.global_rank != 0:
            return None
        rows = [
            {
                "slide_id": r.slide_id,
                "status": r.status,
                "tiles": r.n_tiles,
                "seconds": r.seconds if r.status == "extracted" else None,
                "tiles/s": r.tiles_per_s if r.status == "extracted" else None,
                "reason": r.reason or None,
                "slide_path": r.slide_path,
                "features": str(r.path) if r.status != "failed" else None,
            }
            for r in results
        ]
        model = f"bundle {ex.bundle_path}" if ex.bundle_path else ex.backbone
        tiles = f"the tiles of {coords}" if coords else f"{cfg.tile_size} px tiles at {cfg.target_mpp:g} mpp"
        shown = ("slide_id", "status", "tiles", "seconds", "tiles/s")
        print_table([{k: r[k] for k in shown} for r in rows], title=f"{model}: {ex.feature_dim}-d features, {tiles}")
        if fabric.world_size > 1:
            console.print(f"rank 0's share shown; extract_log.csv lists the slides of all {fabric.world_size} ranks")
        console.print(f"features written to {out} (extract_log.csv has per-slide timing)")
        code = cohort_exit(rows, out)
    if json_out:
        print_json({"out": str(out), "backbone": ex.backbone, "feature_dim": ex.feature_dim, "slides": rows})
    return code


@app.command()
def train(
    features: Annotated[
        str,
        typer.Option(help="Folder of <slide_id>.h5 from `slides extract` or TRIDENT, or CLAM's features (.h5/.pt)."),
    ],
    labels: Annotated[str, typer.Option(help="CSV with slide_id and label (optional split or fold column).")],
    aggregator: Annotated[str, typer.Option(help="MIL aggregator (abmil, ...).")] = "abmil",
    folds: Annotated[int, typer.Option(help="Cross-validation folds when the CSV has no split/fold column.")] = 5,
    epochs: Annotated[int | None, typer.Option(help="Epochs per fold (default 20).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (default 2e-4).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the folds, the validation parts and the models.")] = 0,
    cache_mb: Annotated[
        float | None, typer.Option(help="Bag features kept in memory across epochs and folds (MiB; 0: reread).")
    ] = None,
    logger: Annotated[
        list[str] | None,
        typer.Option(help="Experiment logger: csv (default), tensorboard, mlflow, wandb, none; repeat or a,b."),
    ] = None,
    out: Annotated[str, typer.Option(help="Run folder.")] = "runs/mil",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Slide-level MIL on extracted features; prints each fold and the mean ± std over folds."""
    from ..core.metrics import METRIC_NAMES
    from ..mil import load_mil_config, train_mil

    with human_output(json_out):
        cfg = load_mil_config(
            None,
            features=features,
            labels=labels,
            aggregator=aggregator,
            folds=folds,
            epochs=epochs,
            lr=lr,
            seed=seed,
            cache_mb=cache_mb,
            logger=logger,
            out=out,
            overwrite=overwrite,
        )
        m = train_mil(cfg, progress=not quiet)
        keys = [k for k in METRIC_NAMES if k in m and k != "weighted_f1"]
        per_fold = m.get("per_fold", [])
        rows = [{"fold": r.get("fold"), "n_test": r.get("n_test"), **{k: r.get(k) for k in keys}} for r in per_fold]
        rows.append({"fold": "mean ± std", "n_test": None, **{k: m.get(k) for k in keys}})
        print_table(rows, title=f"MIL {aggregator}: {m.get('n_slides', '?')} slides, classes {m.get('classes')}")
        for key, reasons in (m.get("undefined") or {}).items():
            console.print(f"{key} undefined in {len(reasons)} fold(s): {'; '.join(reasons)}")
        console.print(f"run written to {out} (metrics.json, report.md, fold models)")
    if json_out:
        print_json(m)


@app.command()
def predict(
    model: Annotated[str, typer.Option("--model", help="Run folder from `slides train` (or one fold).")],
    features: Annotated[str, typer.Option(help="Folder of <slide_id>.h5 (ours, TRIDENT's, CLAM's) or .pt, or a file.")],
    out: Annotated[Path, typer.Option(help="CSV of slide-level predictions.")] = Path("slide_predictions.csv"),
    skip_errors: SkipErrorsOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> int | None:
    """Slide-level class probabilities (averaged over fold models) as CSV; a rerun predicts only the slides the
    CSV lacks."""
    from ..mil import predict_cohort

    with human_output(json_out):
        rows = predict_cohort(model, features, out, skip_errors=skip_errors, overwrite=overwrite)
        done = sum(r["status"] != "failed" for r in rows)
        console.print(f"{done} slide predictions in {out}")
        code = cohort_exit(rows, out.parent, f"{out.stem}_errors.csv")
    if json_out:
        print_json({"out": str(out), "slides": rows})
    return code


@app.command()
def heatmap(
    features: Annotated[str, typer.Option(help="Folder of <slide_id>.h5 (ours, TRIDENT's, CLAM's), or one file.")],
    out: Annotated[Path, typer.Option(help="Folder for heatmap PNGs and GeoJSON.")],
    model: Annotated[str | None, typer.Option("--model", help="MIL run folder: paints attention.")] = None,
    bundle: Annotated[Path | None, typer.Option(help="Patch bundle: paints its per-tile class probabilities.")] = None,
    slides: Annotated[str | None, typer.Option(help="Slides (folder/CSV); default: paths in the features.")] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Backbone weights for --bundle (a local path or hf-hub:owner/repo[:file]), if not where it says."
        ),
    ] = None,
    max_size: Annotated[int, typer.Option(help="Longer side of the heatmap thumbnail.")] = 1024,
    alpha: Annotated[float, typer.Option(help="Opacity of the colours over the slide.")] = 0.5,
    skip_errors: SkipErrorsOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> int | None:
    """Per slide: heatmap PNG(s) over the thumbnail and <id>.geojson of tile scores (QuPath: import objects); a
    rerun paints only the slides not painted yet."""
    from ..heatmaps import bundle_heatmaps, mil_heatmaps

    if (model is None) == (bundle is None):
        raise ConfigError("pass exactly one of --model (a MIL run) or --bundle (a patch bundle)")
    options = {"slides": slides, "max_size": max_size, "alpha": alpha, "skip_errors": skip_errors}
    options["overwrite"] = overwrite
    with human_output(json_out):
        if model is not None:
            done = mil_heatmaps(model, features, out, **options)
            rows = [
                {
                    "slide_id": d["slide_id"],
                    "status": d["status"],
                    "pred": d.get("pred"),
                    "tiles": d.get("n_tiles"),
                    "heatmaps": ", ".join(Path(p).name for p in d.get("heatmaps", [])),
                    "reason": d.get("reason"),
                }
                for d in done
            ]
        else:
            done = bundle_heatmaps(bundle, features, out, weights=weights, **options)
            rows = [
                {
                    "slide_id": d["slide_id"],
                    "status": d["status"],
                    "tiles": d.get("n_tiles"),
                    **{f"% {c}": f"{100 * v:.1f}" for c, v in d.get("class_share", {}).items()},
                    "reason": d.get("reason"),
                }
                for d in done
            ]
        shown = [k for k in rows[0] if k != "reason"] if rows else []
        what = "MIL attention" if model else "tile class probabilities"
        print_table([{k: r.get(k) for k in shown} for r in rows], title=f"heatmaps ({what})")
        console.print(f"heatmaps and GeoJSON written to {out}")
        code = cohort_exit(rows, out)
    if json_out:
        print_json({"out": str(out), "slides": rows})
    return code


# -- the browser viewer: `slides view` (served) and `slides export-viewer` (a static folder) ---------------------
ViewSlidesArg = Annotated[str, typer.Argument(help="A slide, a folder of slides, or a CSV with slide_path (and mpp).")]
ViewFeaturesOpt = Annotated[
    str | None, typer.Option(help="Folder of <slide_id>.h5 to score, with --bundle or --model (as `slides heatmap`).")
]
ViewModelOpt = Annotated[str | None, typer.Option("--model", help="MIL run folder: shows its attention.")]
ViewBundleOpt = Annotated[Path | None, typer.Option(help="Patch bundle: shows its per-tile class probabilities.")]
ViewWeightsOpt = Annotated[str | None, typer.Option(help="Backbone weights for --bundle, if not where it says.")]
ViewHeatmapOpt = Annotated[
    Path | None, typer.Option(help="A `slides heatmap --out` folder: shows its tiles' scores, no model needed.")
]
ViewTilesOpt = Annotated[
    Path | None, typer.Option(help="A `slides tile --out` folder: tissue (and pen, blur, fold) polygons.")
]
QualityOpt = Annotated[int, typer.Option(help="JPEG quality of the slide tiles (1..95).")]


def _viewer_catalog(slides, features, bundle, model, weights, heatmap, tiles, mpp) -> Any:
    from ..viewer.catalog import build_catalog

    catalog = build_catalog(
        slides, mpp=mpp, features=features, bundle=bundle, model=model, heatmap=heatmap, tiles=tiles, weights=weights
    )
    scored = sum(e.overlay is not None for e in catalog.entries.values())
    if features is not None or heatmap is not None:
        console.print(f"scored tiles for {scored} of {len(catalog.entries)} slides", soft_wrap=True)
    if catalog.unmatched:
        console.print(f"no slide for the scores of: {', '.join(catalog.unmatched)}", soft_wrap=True)
    return catalog


@app.command()
def view(
    slides: ViewSlidesArg,
    features: ViewFeaturesOpt = None,
    model: ViewModelOpt = None,
    bundle: ViewBundleOpt = None,
    weights: ViewWeightsOpt = None,
    heatmap: ViewHeatmapOpt = None,
    tiles: ViewTilesOpt = None,
    mpp: MppOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; other than loopback, a token is required.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    token: Annotated[
        str | None, typer.Option(help="Access token (16+ characters); generated when --host is not loopback.")
    ] = None,
    quality: QualityOpt = 75,
    cache_tiles: Annotated[int, typer.Option(help="Slide tiles kept in memory (an LRU cache).")] = 1024,
) -> None:
    """Serve a browser viewer: pan and zoom the slides with the model's map over the tissue (Ctrl-C stops it)."""
    from ..listen import bind
    from ..viewer.app import resolve_token, serve
    from ..viewer.deepzoom import check_quality

    check_quality(quality)
    token = resolve_token(host, token)
    sock = bind(host, port)
    sock.listen()  # connections from now on wait for the server instead of being refused
    try:
        catalog = _viewer_catalog(slides, features, bundle, model, weights, heatmap, tiles, mpp)
    except BaseException:
        sock.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")
    console.print(f"viewer of {len(catalog.entries)} slide(s) at {url} (Ctrl-C stops it)", soft_wrap=True)
    sys.stdout.flush()
    serve(catalog, sock, token=token, quality=quality, cache_tiles=cache_tiles)
    console.print("viewer stopped")


@app.command("export-viewer")
def export_viewer(
    slides: ViewSlidesArg,
    out: Annotated[Path, typer.Option(help="New folder for the viewer: index.html, DZI pyramids, overlay data.")],
    features: ViewFeaturesOpt = None,
    model: ViewModelOpt = None,
    bundle: ViewBundleOpt = None,
    weights: ViewWeightsOpt = None,
    heatmap: ViewHeatmapOpt = None,
    tiles: ViewTilesOpt = None,
    mpp: MppOpt = None,
    max_level: Annotated[
        int | None,
        typer.Option(help="Finest Deep Zoom level written (level L is at most 2^L px wide); default: full size."),
    ] = None,
    quality: QualityOpt = 75,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Write the viewer as a static folder (opens from file:// or any web host, no Python) and report its size."""
    from ..viewer.export import check_export_options, folder_bytes
    from ..viewer.export import export_viewer as write_viewer

    check_export_options(out, max_level, quality, overwrite)
    catalog = _viewer_catalog(slides, features, bundle, model, weights, heatmap, tiles, mpp)
    rows = write_viewer(catalog, out, max_level=max_level, quality=quality, overwrite=overwrite, progress=not quiet)
    print_table(
        [
            {
                "slide_id": r.slide_id,
                "level": f"{r.max_level} of {r.full_level}",
                "size px": f"{r.width} x {r.height}",
                "tiles": r.tiles,
                "MB": f"{r.bytes / 1e6:.2f}",
            }
            for r in rows
        ],
        title="Deep Zoom pyramids written",
    )
    total = folder_bytes(out)
    console.print(
        f"viewer written to {out}: {total / 1e6:.2f} MB on disk ({total:,} bytes); open {out / 'index.html'}",
        soft_wrap=True,
    )
