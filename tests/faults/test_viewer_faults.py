"""Faults of the slide viewer: bad flags and inputs end in one line and exit 2 with every file as it was; hostile or
broken requests get 4xx (a slide that breaks while served: 500) and the server keeps serving.

One server for the HTTP cases, on 127.0.0.1 with an access token, so the token's cases and the 404s run on one.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from fault_kit import sha_tree, tmpfs
from helpers import one_line_error, run_main
from slide_fixtures import cmu_crop, write_pyramid_tiff
from viewer_fixtures import SIDE, SLIDE_ID, HotCase, Server, build_hot_case, tile_coords

from pathotune.slides.geojson import tiles_geojson
from pathotune.viewer.app import resolve_token

TOKEN = "a-test-token-of-32-characters-xx"


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> HotCase:
    return build_hot_case(tmp_path_factory.mktemp("viewer_faults"))


@dataclass
class Ctx:
    case: HotCase
    root: Path  # this case's own folder
    busy: socket.socket | None = None  # a port held for the case


def other_size_slide(ctx: Ctx) -> Path:
    """A slide with the hot slide's id but another size: features made on the hot slide do not fit it."""
    folder = ctx.root / "other"
    folder.mkdir()
    write_pyramid_tiff(folder / f"{SLIDE_ID}.tif", cmu_crop(0, 0, 700, 500), mpp=0.5, levels=2, tile=64)
    return folder


def heat_folder(ctx: Ctx, shift: int = 0, text: str | None = None) -> Path:
    folder = ctx.root / "heat"
    folder.mkdir()
    if text is not None:
        (folder / f"{SLIDE_ID}.geojson").write_text(text)
    else:
        coords = tile_coords() + shift
        tiles_geojson(coords, SIDE, {"attention": np.ones(len(coords))}, folder / f"{SLIDE_ID}.geojson")
    return folder


def full_export(ctx: Ctx) -> Path:
    out = ctx.root / "export"
    out.mkdir()
    (out / "index.html").write_text("an earlier viewer")
    return out


def busy_port(ctx: Ctx) -> int:
    ctx.busy = socket.create_server(("127.0.0.1", 0))
    return ctx.busy.getsockname()[1]


@dataclass
class CliCase:
    name: str
    args: Callable[[Ctx], list]
    expect: tuple[str, ...]


V, E = ["slides", "view"], ["slides", "export-viewer"]
CASES = [
    CliCase("bundle_without_features", lambda c: [*V, c.case.slides, "--bundle", c.case.bundle], ("pass --features",)),
    CliCase(
        "features_without_a_model",
        lambda c: [*V, c.case.slides, "--features", c.case.features],
        ("exactly one of --model", "--bundle"),
    ),
    CliCase(
        "heatmap_and_features",
        lambda c: [*E, c.case.slides, "--heatmap", c.root, "--features", c.case.features, "--out", c.root / "o"],
        ("either --heatmap", "--features"),
    ),
    CliCase("short_token", lambda c: [*V, c.case.slide, "--token", "abc"], ("--token", "at least 16")),
    CliCase("port_out_of_range", lambda c: [*V, c.case.slide, "--port", "70000"], ("--port 70000", "outside 0..65535")),
    CliCase(
        "port_in_use",
        lambda c: [*V, c.case.slide, "--port", str(busy_port(c))],
        ("cannot listen on 127.0.0.1:", "in use", "another --port"),
    ),
    CliCase(
        "missing_slides",
        lambda c: [*V, c.root / "nothing", "--port", "0"],
        ("nothing", "not found", "folder of slides"),
    ),
    CliCase(
        "features_of_another_slide",
        lambda c: [*V, other_size_slide(c), "--features", c.case.features, "--bundle", c.case.bundle, "--port", "0"],
        ("700x500 px", "made on a 1536x1024 slide", "pass the slides"),
    ),
    CliCase(
        "heat_map_past_the_slide",
        lambda c: [*V, c.case.slides, "--heatmap", heat_folder(c, shift=600), "--port", "0"],
        ("reach (2136, 1624)", "outside the 1536x1024 slide"),
    ),
    CliCase(
        "heat_map_of_other_slides",
        lambda c: [*V, c.case.slides / "plain.png", "--heatmap", heat_folder(c), "--port", "0"],
        ("none of the slides (plain)", "has scored tiles", "--heatmap"),
    ),
    CliCase(
        "heat_map_not_json",
        lambda c: [*E, c.case.slides, "--heatmap", heat_folder(c, text="{not json"), "--out", c.root / "o"],
        ("cannot read tiles GeoJSON", f"{SLIDE_ID}.geojson"),
    ),
    CliCase(
        "heat_map_of_points",
        lambda c: [
            *E,
            c.case.slides,
            "--heatmap",
            heat_folder(c, text=json.dumps({"type": "Point", "coordinates": [1, 2]})),
            "--out",
            c.root / "o",
        ],
        ("not an axis-aligned square tile",),
    ),
    CliCase(
        "tiles_folder_missing",
        lambda c: [*E, c.case.slides, "--tiles", c.root / "gone", "--out", c.root / "o"],
        ("tiles folder", "gone", "slides tile"),
    ),
    CliCase(
        "export_into_a_full_folder",
        lambda c: [*E, c.case.slide, "--out", full_export(c)],
        ("not empty", "--overwrite"),
    ),
    CliCase(
        "export_onto_a_file",
        lambda c: [*E, c.case.slide, "--out", c.case.slide],
        ("is a file", "pass a folder"),
    ),
    CliCase(
        "export_negative_level",
        lambda c: [*E, c.case.slide, "--out", c.root / "o", "--max-level", "-1"],
        ("--max-level",),
    ),
    CliCase(
        "export_quality_zero",
        lambda c: [*E, c.case.slide, "--out", c.root / "o", "--quality", "0"],
        ("--quality", "1..95"),
    ),
]


@pytest.mark.parametrize("cli_case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(
    cli_case: CliCase, case: HotCase, tmp_path: Path, monkeypatch, capsys
) -> None:
    ctx = Ctx(case, tmp_path)
    args = cli_case.args(ctx)
    before = sha_tree(tmp_path, case.root)
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2, f"exit {code}\n{out}\n{err}"
    line = one_line_error(err)
    for word in cli_case.expect:
        assert word in line, f"{word!r} not in: {line}"
    assert sha_tree(tmp_path, case.root) == before
    assert not (tmp_path / "o").exists()
    if ctx.busy is not None:
        ctx.busy.close()


def test_a_remote_address_gets_a_token_and_loopback_none() -> None:
    assert resolve_token("127.0.0.1", None) is None and resolve_token("::1", None) is None
    assert resolve_token("localhost", None) is None
    token = resolve_token("0.0.0.0", None)
    assert token is not None and len(token) >= 32 and resolve_token("0.0.0.0", None) != token
    assert resolve_token("192.0.2.1", TOKEN) == TOKEN  # given: kept (nothing is bound here)


def test_export_that_runs_out_of_disk_leaves_the_old_viewer(
    case: HotCase, tmp_path: Path, can_mount, monkeypatch, capsys
) -> None:
    if can_mount is not None:
        pytest.skip(can_mount)
    with tmpfs(tmp_path / "mnt", size="1m") as mnt:
        out = mnt / "viewer"
        code, _, err = run_main(
            monkeypatch, capsys, "slides", "export-viewer", case.slide, "--out", out, "--max-level", "8", "--quiet"
        )
        assert code == 0, err
        before = sha_tree(mnt)
        code, _, err = run_main(
            monkeypatch, capsys, "slides", "export-viewer", case.slide, "--out", out, "--overwrite", "--quiet"
        )
        assert code == 2
        line = one_line_error(err)
        assert str(out) in line and "space" in line
        assert sha_tree(mnt) == before  # the earlier viewer, whole; no half-built folder beside it
        assert sorted(p.name for p in mnt.iterdir()) == ["viewer"]


# -- the server -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(case: HotCase, tmp_path_factory: pytest.TempPathFactory):
    slides = tmp_path_factory.mktemp("served")
    for p in case.slides.iterdir():
        shutil.copy(p, slides / p.name)
    shutil.copy(case.slide, slides / "breaks.tif")  # cut short once the server runs
    s = Server(slides, "--heatmap", heat_folder(Ctx(case, tmp_path_factory.mktemp("heat"))), "--token", TOKEN)
    s.slides = slides  # type: ignore[attr-defined]
    yield s
    assert s.stop() == 0


def raw_get(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """A GET whose path goes out exactly as written (no dot-segment clean-up, no re-encoding)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_the_token_is_required_on_every_path(server: Server) -> None:
    paths = [
        "/",
        "/data/catalog.js",
        "/static/viewer.js",
        f"/slides/{SLIDE_ID}.dzi",
        f"/slides/{SLIDE_ID}_files/0/0_0.jpeg",
    ]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in paths:
            for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}):
                r = client.get(path, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
                assert r.json()["detail"].startswith("this viewer needs its access token")
            assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
        first = client.get("/", params={"token": TOKEN})
        assert first.status_code == 200 and "httponly" in first.headers["set-cookie"].lower()
    with httpx.Client(base_url=server.url, timeout=30, cookies=first.cookies) as browser_like:
        assert browser_like.get(f"/slides/{SLIDE_ID}_files/11/0_0.jpeg").status_code == 200  # the page's cookie


BAD_PATHS = [
    ("/slides/nope.dzi", 404, "no slide 'nope'"),
    ("/data/slides/nope.js", 404, "no slide 'nope'"),
    (f"/slides/{SLIDE_ID}_files/12/0_0.jpeg", 404, "levels 0..11, not 12"),
    (f"/slides/{SLIDE_ID}_files/11/7_0.jpeg", 404, "no tile 7_0"),
    (f"/slides/{SLIDE_ID}_files/11/0_0.png", 404, "tiles are named"),
    (f"/slides/{SLIDE_ID}_files/11/a_0.jpeg", 404, "tiles are named"),
    (f"/slides/{SLIDE_ID}_files/x/0_0.jpeg", 404, "tiles are named"),
    (f"/slides/{SLIDE_ID}_files/11/0000000000_0.jpeg", 404, "tiles are named"),
    ("/static/../../../../../../etc/passwd", 404, None),
    ("/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", 404, None),
    ("/static/..%2f..%2f..%2f..%2fetc%2fpasswd", 404, None),
    ("/slides/..%2f..%2f..%2fetc%2fpasswd.dzi", 404, None),
    (f"/slides/..%2f{SLIDE_ID}_files/0/0_0.jpeg", 404, None),
    ("/data/slides/..%2fcatalog.js", 404, None),
    ("/slides/%2e%2e.dzi", 404, "no slide '..'"),
]


@pytest.mark.parametrize("path,status,detail", BAD_PATHS, ids=[p for p, _, _ in BAD_PATHS])
def test_bad_paths_answer_404_and_never_leave_the_catalog(
    server: Server, path: str, status: int, detail: str | None
) -> None:
    code, body = raw_get(server.url, path, {"Authorization": f"Bearer {TOKEN}"})
    assert code == status, (path, code, body[:200])
    assert b"root:" not in body and b"[project]" not in body
    if detail is not None:
        assert detail in json.loads(body)["detail"]
    assert raw_get(server.url, f"/slides/{SLIDE_ID}_files/11/1_1.jpeg", {"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_a_slide_that_breaks_while_served_answers_500_and_the_rest_is_served(server: Server) -> None:
    broken = server.slides / "breaks.tif"  # type: ignore[attr-defined]
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=auth) as client:
        r = client.get("/slides/breaks_files/11/5_3.jpeg")
        assert r.status_code == 500 and "breaks.tif" in r.json()["detail"] and "\n" not in r.json()["detail"]
        assert client.get(f"/slides/{SLIDE_ID}_files/11/2_2.jpeg").status_code == 200
        assert client.get("/data/catalog.js").status_code == 200
    assert server.alive()
