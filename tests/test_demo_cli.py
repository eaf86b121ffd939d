"""`pathotune demo` end to end on the real bundled weights and images, at a tiny input size to stay fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # real weights at real size: `pytest -m 'not slow'` skips them


@pytest.mark.timeout(600)
def test_demo_runs_end_to_end(tmp_path):
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
