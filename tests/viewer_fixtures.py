"""A slide whose model map is hot in one known square, its scores, regions and a running viewer, for viewer tests.

The slide is real H&E (a crop of the vendored CMU slide) as a 3-level pyramidal TIFF, 1536 x 1024 px at 0.5 mpp,
tiled in 128 px tiles (12 x 8). A tiny linear bundle reads one feature: +4 in the 2 x 2 tiles of ``HOT``
(level-0 x 768..1024, y 256..512), -4 elsewhere, so its class ``hot`` has probability 0.9997 there and 0.0003
everywhere else. The scores reach the viewer through the real path: a feature file read by
``BundleHead`` (``--features`` + ``--bundle``).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from helpers import TINY2, TINY_NAME, cli_cmd, cli_env
from PIL import Image
from slide_fixtures import cmu_crop, write_pyramid_tiff

from pathotune import Task, create_model, save_bundle
from pathotune.bundle import read_manifest
from pathotune.features import write_feature_file
from pathotune.slides.geojson import tissue_geojson

SIZE = (1536, 1024)  # level-0 width, height
MPP = 0.5
SIDE = 128  # tile side, level-0 px
HOT = (768, 256, 1024, 512)  # x0, y0, x1, y1 of the hot square, level-0 px
CLASSES = ("cold", "hot")
SLIDE_ID = "hot"
# Chromium as Debian ships it (Playwright's own download is not reachable), flags that keep it off the network.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class HotCase:
    root: Path
    slides: Path  # folder with hot.tif and plain.png
    slide: Path
    features: Path
    bundle: Path
    tiles: Path  # a `slides tile`-like folder: tissue, pen and (empty) blur GeoJSON
    rgb: np.ndarray  # level 0 of the slide


def tile_coords() -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(0, SIZE[0], SIDE), np.arange(0, SIZE[1], SIDE))
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def is_hot(coords: np.ndarray) -> np.ndarray:
    x, y = coords[:, 0], coords[:, 1]
    return (x >= HOT[0]) & (x < HOT[2]) & (y >= HOT[1]) & (y < HOT[3])


def hot_bundle(path: Path) -> Path:
    """A linear bundle on the tiny backbone whose head reads feature 0 only: class 'hot' when it is positive."""
    task = Task(classes=CLASSES)
    model = create_model(TINY_NAME, "linear", 2, task=task, image_size=32, backbone_kwargs=dict(TINY2))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[0, 0], model.head.weight[1, 0] = -1.0, 1.0
    return save_bundle(model, path)


def hot_features(path: Path, slide: Path, bundle: Path, noise_seed: int | None = None) -> Path:
    """The hot slide's feature file (``noise_seed``: plus unit Gaussian noise, a stand-in for another slide)."""
    coords = tile_coords()
    dim = 32  # TINY2's embedding
    feats = np.zeros((len(coords), dim), dtype=np.float32)
    feats[:, 0] = np.where(is_hot(coords), 4.0, -4.0)
    if noise_seed is not None:
        feats += np.random.default_rng(noise_seed).normal(0.0, 1.0, feats.shape).astype(np.float32)
    attrs = {
        "backbone": TINY_NAME,
        "backbone_fingerprint": "0" * 32,
        "bundle_fingerprint": read_manifest(bundle)["sha256"],
        "bundle_path": str(bundle),
        "target_mpp": MPP,
        "tile_size": SIDE,
        "image_size": 32,
        "overlap": 0,
        "min_tissue": 0.0,
        "feature_dim": dim,
        "mpp": MPP,
        "level": 0,
        "downsample": 1.0,
        "read_size": SIDE,
        "stride": SIDE,
        "tile_size_level0": float(SIDE),
        "dimensions": np.array(SIZE, dtype=np.int64),
        "n_tiles": len(coords),
        "n_candidates": len(coords),
        "slide_id": path.stem,
        "slide_path": str(slide),
        "slide_backend": "openslide",
        "norm_mean": np.array([0.5, 0.5, 0.5]),
        "norm_std": np.array([0.5, 0.5, 0.5]),
        "normalization": "x / 255",
        "precision": "32-true",
        "tissue_config": "{}",
    }
    with write_feature_file(path, coords, np.ones(len(coords)), dim, attrs) as w:
        w.write(0, feats)
    return path


def region_files(folder: Path) -> Path:
    """Tissue as `slides tile` writes it (a mask with a hole), one pen stroke, and a blur file that found nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((64, 96), dtype=bool)
    mask[8:56, 8:88] = True
    mask[24:40, 40:56] = False  # a hole
    tissue_geojson(mask, SIZE, folder / f"{SLIDE_ID}_tissue.geojson")
    pen = [[100, 700], [400, 700], [400, 900], [100, 900], [100, 700]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [pen]}, "properties": {}}
    (folder / f"{SLIDE_ID}_pen.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    (folder / f"{SLIDE_ID}_blur.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    return folder


def build_hot_case(root: Path) -> HotCase:
    slides = root / "slides"
    slides.mkdir(parents=True)
    rgb = cmu_crop(300, 300, SIZE[0], SIZE[1])
    slide = slides / f"{SLIDE_ID}.tif"
    write_pyramid_tiff(slide, rgb, mpp=MPP, levels=3, tile=128)
    Image.fromarray(cmu_crop(1200, 1600, 600, 400)).save(slides / "plain.png")  # a second slide, no scores
    bundle = hot_bundle(root / "bundle")
    features = root / "features"
    hot_features(features / f"{SLIDE_ID}.h5", slide, bundle)
    return HotCase(root, slides, slide, features, bundle, region_files(root / "tiles"), rgb)


class Server:
    """`pathotune slides view ... --port 0` in a subprocess on 127.0.0.1; its URL read from what it prints."""

    def __init__(self, *args: str | Path, timeout: float = 180.0) -> None:
        self.proc = subprocess.Popen(
            cli_cmd("slides", "view", *args, "--port", "0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+/)(\?token=\S+)?", line)
            if m:
                self.url = m[1]
                return
        self.stop()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        raise RuntimeError(f"the viewer did not start: {''.join(self.lines)} {err}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
