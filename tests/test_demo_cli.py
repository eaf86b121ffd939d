"""`pathotune demo` end to end on the real bundled weights and images, at a tiny input size to stay fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real weights at real size: `pytest -m 'not slow'` skips them


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pathotune demo` once for the module; its --out folder."""
    tmp_path = tmp_path_factory.mktemp("demo_cli")
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pathotune.cli.main",
            "demo",
            "--out",
            str(out),
            "--steps",
            "2",
            "--image-size",
            "28",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "OMP_NUM_THREADS": "2",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),  # the source under test, where it is not installed
        },
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.timeout(600)
def test_demo_runs_end_to_end(demo: Path) -> None:
    out = demo
    for method in ("linear", "pathotune"):
        m = json.loads((out / method / "metrics.json").read_text())
        assert m["method"] == method and m["backbone"] == "dinov2_vits14" and m["n_test"] == 90
        assert (out / method / "bundle" / "manifest.json").is_file()
    # The frozen features separate pen / tissue / background even at 28 px: the probe must be far above chance.
    assert json.loads((out / "linear" / "metrics.json").read_text())["balanced_accuracy"] > 0.6
    report = (out / "report.md").read_text()
    assert "| linear |" in report and "| pathotune |" in report and "Whole slide" in report
    assert "PathoTune minus the probe:" in report and "paired bootstrap" in report
    # 4 test regions: too few for an interval, and the report says so instead of printing one
    assert "too few groups for an interval (4 groups; 5 needed)" in report and "no interval" in report
    # the slide step is judged where the truth is known, and the pen-free slide's pen tiles are called errors
    assert "## Where the truth is known" in report and "labels from HistoQC's pen masks" in report
    assert "has no pen marks" in report and "false positives" in report
    assert (out / "slide" / "pen_check" / "manifest.csv").is_file()
    pt = json.loads((out / "pathotune" / "metrics.json").read_text())
    assert pt["recipe"]["head_init"] == "probe" and pt["steps_run"] == 2
    heat = out / "slide" / "heatmaps"
    assert {p.name for p in heat.glob("*.png")} == {
        f"cmu_small_region_{c}.png" for c in ("background", "pen", "tissue")
    }
    geo = json.loads((heat / "cmu_small_region.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) > 10


@pytest.mark.timeout(600)
def test_viewer_opens_the_demo_slide_with_its_heat_map(demo: Path) -> None:
    """The README's command: `pathotune slides view <the demo slide> --heatmap runs/demo/slide/heatmaps`, in
    Chromium. With PATHOTUNE_SCREENSHOT_DIR set, the README's picture is saved there as viewer.png."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from viewer_fixtures import CHROMIUM, CHROMIUM_ARGS, Server

    from pathotune.slides import sample_slide

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    server = Server(sample_slide(), "--heatmap", demo / "slide" / "heatmaps")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url)
            page.wait_for_function("window.PathotuneViewer && PathotuneViewer.ready()", timeout=60_000)
            options = page.locator("#layer-select option").all_inner_texts()
            assert options == ["background", "pen", "tissue"]
            page.select_option("#layer-select", "prob_tissue")
            page.locator("#opacity").fill("45")
            page.wait_for_function("PathotuneViewer.ready()")
            assert page.inner_text("#legend-label") == "tissue" and errors == [], errors
            shots = os.environ.get("PATHOTUNE_SCREENSHOT_DIR")
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(shots) / "viewer.png"))
            browser.close()
    finally:
        assert server.stop() == 0
