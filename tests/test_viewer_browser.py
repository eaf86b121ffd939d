"""The viewer end to end: `pathotune slides view` in a subprocess on 127.0.0.1, and its static export, in a real
headless Chromium driven by Playwright.

The slide is real H&E; its bundle scores are hot in one known 256 px square (viewer_fixtures), so the test can
say where the overlay's colour must appear on the screen. One browser for the module.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import run_main
from matplotlib import colormaps
from PIL import Image
from viewer_fixtures import CHROMIUM, CHROMIUM_ARGS, HOT, MPP, SIDE, SIZE, SLIDE_ID, HotCase, Server, build_hot_case

from pathotune.slides import open_slide

playwright = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)", allow_module_level=True)

VIEWPORT = {"width": 1200, "height": 800}
HOT_RGB = np.array(colormaps["RdBu_r"](1.0)[:3]) * 255  # class 'hot' at probability ~1
COLD_RGB = np.array(colormaps["RdBu_r"](0.0)[:3]) * 255


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> HotCase:
    return build_hot_case(tmp_path_factory.mktemp("viewer_browser"))


@pytest.fixture(scope="module")
def server(case: HotCase):
    s = Server(case.slides, "--features", case.features, "--bundle", case.bundle, "--tiles", case.tiles)
    yield s
    assert s.stop() == 0, s.proc.stderr.read() if s.proc.stderr else ""


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A viewer page with what it logged and fetched."""

    def __init__(self, browser, url: str, viewport: dict | None = None) -> None:
        self.page = browser.new_page(viewport=viewport or VIEWPORT)
        self.console: list[str] = []
        self.requests: list[str] = []
        self.failed: list[str] = []
        self.page.on(
            "console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
        )
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("requestfailed", lambda r: self.failed.append(r.url))
        self.page.goto(url)
        self.ready()

    def ready(self) -> None:
        self.page.wait_for_function("window.PathotuneViewer && PathotuneViewer.ready()", timeout=60_000)

    def to_page(self, x: float, y: float) -> tuple[float, float]:
        p = self.page.evaluate(f"PathotuneViewer.toPage({x}, {y})")
        return p["x"], p["y"]

    def screenshot(self) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.page.screenshot())).convert("RGB"), dtype=np.float64)

    def tile_levels(self) -> list[int]:
        return [int(m[1]) for u in self.requests if (m := re.search(r"_files/(\d+)/\d+_\d+\.jpeg", u))]

    def close(self) -> None:
        self.page.close()


def slide_rect(view: Page) -> tuple[int, int, int, int]:
    (x0, y0), (x1, y1) = view.to_page(0, 0), view.to_page(*SIZE)
    return round(x0), round(y0), round(x1), round(y1)


def blocks(a: np.ndarray, k: int = 8) -> np.ndarray:
    """(H, W, C) -> (H/k, k, W/k, k, C): k x k blocks, whose means are colours without the finest detail."""
    return a[: a.shape[0] // k * k, : a.shape[1] // k * k].reshape(a.shape[0] // k, k, a.shape[1] // k, k, -1)


def off_navigator(view: Page, shape: tuple[int, ...]) -> np.ndarray:
    """True off the navigator's minimap (top right, over the slide, its outline drawn in red)."""
    nav = view.page.evaluate("PathotuneViewer.state.viewer.navigator.element.getBoundingClientRect().toJSON()")
    keep = np.ones(shape[:2], dtype=bool)
    keep[: round(nav["bottom"]) + 2, max(0, round(nav["left"]) - 2) :] = False
    return keep


def check_slide_pixels(view: Page, case: HotCase) -> None:
    """With the overlays off, the screen shows the slide: its pixels match the slide's thumbnail."""
    view.page.uncheck("#show-heatmap")
    for region in ("tissue", "pen", "blur"):
        view.page.uncheck(f"#show-region-{region}")
    view.ready()
    x0, y0, x1, y1 = slide_rect(view)
    assert x1 - x0 > 600 and y1 - y0 > 400, (x0, y0, x1, y1)  # the home view shows the whole slide, large
    full = view.screenshot()
    shot = full[y0:y1, x0:x1]
    with open_slide(case.slide) as reader:
        thumb = np.asarray(reader.thumbnail(SIZE[0]).resize((x1 - x0, y1 - y0), Image.Resampling.BOX), dtype=np.float64)
    keep = off_navigator(view, full.shape)[y0:y1, x0:x1]
    assert shot[keep].std() > 20  # real tissue on the screen, not a blank page
    # colours, block by block (8 px blocks: resampling may move fine detail by a pixel, not colours)
    mask = blocks(keep[..., None].astype(float)).min(axis=(1, 3))[..., 0] > 0
    diff = np.abs(blocks(shot).mean(axis=(1, 3)) - blocks(thumb).mean(axis=(1, 3)))[mask]
    assert diff.mean() < 3.0 and np.percentile(diff, 99) < 12, (diff.mean(), np.percentile(diff, 99))
    view.page.check("#show-heatmap")
    for region in ("tissue", "pen", "blur"):
        view.page.check(f"#show-region-{region}")


def check_hot_square(view: Page) -> None:
    """At full opacity the hot colour covers the hot square, within one tile, and the cold colour the rest."""
    view.page.uncheck("#show-region-tissue")
    view.page.uncheck("#show-region-pen")
    view.page.select_option("#layer-select", "prob_hot")
    view.page.locator("#opacity").fill("100")
    assert view.page.input_value("#opacity") == "100"
    view.ready()
    shot = view.screenshot()
    x0, y0, x1, y1 = slide_rect(view)
    scale = (x1 - x0) / SIZE[0]  # screen px per level-0 px
    hot = np.linalg.norm(shot - HOT_RGB, axis=2) < 25
    inside = np.zeros_like(hot)  # the slide's rectangle only: the legend's colour ramp holds the hot colour too
    inside[y0:y1, x0:x1] = True
    hot &= inside & off_navigator(view, hot.shape)
    ys, xs = np.nonzero(hot)
    assert len(xs) > 0.8 * (256 * scale) ** 2, f"only {len(xs)} hot pixels"
    found = ((xs.min() - x0) / scale, (ys.min() - y0) / scale, (xs.max() + 1 - x0) / scale, (ys.max() + 1 - y0) / scale)
    assert all(abs(f - h) <= SIDE for f, h in zip(found, HOT, strict=True)), (found, HOT)
    assert all(abs(f - h) <= 3 / scale for f, h in zip(found, HOT, strict=True)), (found, HOT)  # in fact to 3 px
    cx, cy = view.to_page(200, 900)  # a cold tile
    np.testing.assert_allclose(shot[round(cy), round(cx)], COLD_RGB, atol=3)
    view.page.locator("#opacity").fill("50")
    view.page.check("#show-region-tissue")
    view.page.check("#show-region-pen")


def check_zoom_fetches_deeper_tiles(browser, url: str) -> None:
    """In a small window the whole slide needs only coarse levels; zooming in on the hot square fetches the
    full-resolution level, from the server or the folder."""
    view = Page(browser, url, viewport={"width": 640, "height": 480})
    try:
        before = max(view.tile_levels())
        assert before < 11
        cx, cy = view.to_page((HOT[0] + HOT[2]) / 2, (HOT[1] + HOT[3]) / 2)
        view.page.mouse.move(cx, cy)
        for _ in range(6):
            view.page.mouse.wheel(0, -400)
            view.page.wait_for_timeout(150)
        view.ready()
        levels = view.tile_levels()
        assert max(levels) == 11  # asked for only after the zoom
        zoom = view.page.evaluate("PathotuneViewer.state.viewer.viewport.getZoom(true)")
        assert zoom > 2.5, zoom
        assert not view.failed and view.console == [], (view.failed, view.console)
    finally:
        view.close()


def test_served_viewer_shows_the_slide_and_its_map(browser, server: Server, case: HotCase) -> None:
    view = Page(browser, server.url)
    try:
        assert view.page.title() == "PathoTune viewer"
        assert view.page.locator("#slide-list li").all_inner_texts() == ["hot.tif\n96 tiles", "plain.png"]
        check_slide_pixels(view, case)
        check_hot_square(view)
        assert view.console == [], view.console
    finally:
        view.close()
    check_zoom_fetches_deeper_tiles(browser, server.url)


def test_hover_click_grid_regions_and_scale_bar(browser, server: Server) -> None:
    view = Page(browser, server.url)
    try:
        x, y = view.to_page(896 + 64, 384 + 64)  # the centre of a hot tile
        view.page.mouse.move(x, y)
        hover = view.page.locator("#hover-info")
        hover.wait_for(state="visible")
        assert hover.text_content() == "predicted: hot  ·  cold: 3.35e-4  ·  hot: 1.00"
        view.page.mouse.click(x, y)
        info = view.page.locator("#tile-info")
        info.wait_for(state="visible")
        rows = [r.split("\t") for r in info.inner_text().splitlines()]
        assert rows[:3] == [["tile", "43"], ["level-0 x, y", "896, 384"], ["predicted", "hot"]]
        view.page.mouse.move(5, 5)
        view.ready()
        before = view.screenshot()
        view.page.check("#show-grid")  # the tile grid adds lines between tiles
        view.ready()
        after = view.screenshot()
        assert np.abs(after - before).max(axis=2).astype(bool).sum() > 1000
        view.page.uncheck("#show-region-pen")  # the pen stroke's outline goes
        view.ready()
        px, py = view.to_page(100, 800)  # on the pen polygon's left edge
        near = np.abs(view.screenshot() - after)[round(py) - 3 : round(py) + 4, round(px) - 3 : round(px) + 4]
        assert near.max() > 30
        label = view.page.inner_text("#scalebar-label")
        width = view.page.evaluate("document.getElementById('scalebar-bar').getBoundingClientRect().width")
        (x0, _), (x1, _) = view.to_page(0, 0), view.to_page(SIZE[0], 0)
        um_per_px = MPP * SIZE[0] / (x1 - x0)
        number, unit = label.split()
        shown = float(number) * (1000 if unit == "mm" else 1)
        assert unit in ("µm", "mm") and shown == pytest.approx(width * um_per_px, rel=0.02)
        view.page.click("#slide-list li:nth-child(2)")  # the second slide: no scores, no scale bar (no mpp)
        view.page.wait_for_function("PathotuneViewer.state.slide.id === 'plain' && PathotuneViewer.ready()")
        assert view.page.is_hidden("#scalebar") and view.page.is_hidden("#heatmap-controls")
        assert view.page.url.endswith("#slide=plain") and view.console == [], view.console
    finally:
        view.close()


def test_static_export_works_from_file_url(browser, case: HotCase, tmp_path_factory, monkeypatch, capsys) -> None:
    out = tmp_path_factory.mktemp("export") / "viewer"
    args = ["--features", case.features, "--bundle", case.bundle, "--tiles", case.tiles, "--out", out, "--quiet"]
    code, _, err = run_main(monkeypatch, capsys, "slides", "export-viewer", case.slides, *args)
    assert code == 0, err
    view = Page(browser, (out / "index.html").as_uri())
    try:
        assert all(u.startswith("file://") for u in view.requests), [
            u for u in view.requests if not u.startswith("file")
        ]
        check_slide_pixels(view, case)
        check_hot_square(view)
        assert view.console == [], view.console
    finally:
        view.close()
    check_zoom_fetches_deeper_tiles(browser, (out / "index.html").as_uri())


def test_server_tiles_equal_the_exported_ones(server: Server, case: HotCase, tmp_path: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        catalog = client.get("/data/catalog.js")
        assert catalog.status_code == 200 and catalog.text.startswith("PathotuneViewer.catalog({")
        dzi = client.get(f"/slides/{SLIDE_ID}.dzi").text
        assert 'TileSize="254" Overlap="1" Format="jpeg"' in dzi and '<Size Width="1536" Height="1024" />' in dzi
        tile = client.get(f"/slides/{SLIDE_ID}_files/11/3_2.jpeg")
        assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(tile.content)).size == (256, 256)
        assert client.get("/static/openseadragon/LICENSE.txt").text.startswith("Copyright (C) 2009 CodePlex")
    from pathotune.viewer import build_catalog, export_viewer

    rows = export_viewer(build_catalog(case.slide), tmp_path / "e", progress=False)
    assert rows[0].tiles > 0
    assert (tmp_path / "e" / "slides" / f"{SLIDE_ID}_files" / "11" / "3_2.jpeg").read_bytes() == tile.content
