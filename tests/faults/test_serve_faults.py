"""Faults of `pathotune serve`: bad requests end in one status and a one-line JSON error, the server stays up and
answers the next good request, and the bundle folder is byte-identical afterwards; bad settings end the command
on one line with exit code 2 before anything is served.

Two real servers in subprocesses on free 127.0.0.1 ports: one with tight limits and a token (every request
fault), one with a queue of four images that never fills a batch (429 and the request timeout).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import one_line_error, run_main
from PIL import Image
from serve_kit import IVP_EARLY, png_bytes, serving, tiny_bundle, tiny_weights
from test_fault_corpus import sha_tree

from pathotune.serve import BundleStore, RequestError, ServeMetrics

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_UPLOAD = int(0.05 * 2**20)  # --max-upload-mb 0.05
GOOD = png_bytes(40, 0)


def crafted_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` with almost no pixel data: inflating it is the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is patched to claim another size."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@dataclass(frozen=True)
class Site:
    root: Path
    folder: Path
    fingerprint: str
    other_fingerprint: str


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    root = tmp_path_factory.mktemp("serve_faults")
    weights = tiny_weights(root / "backbone.safetensors", seed=3)
    other = tiny_weights(root / "other.safetensors", seed=4)
    folder = root / "bundles"
    folder.mkdir()
    a = tiny_bundle(folder / "alpha", weights, "pathotune", 3, seed=1, **IVP_EARLY)
    b = tiny_bundle(folder / "other", other, "vpt-deep", 2, seed=5)
    fp = [json.loads((p / "manifest.json").read_text())["provenance"]["fingerprint"] for p in (a, b)]
    return Site(root, folder, fp[0], fp[1])


@pytest.fixture(scope="module")
def strict(site):
    limits = ["--max-pixels", "4096", "--max-upload-mb", "0.05", "--max-images", "3", "--max-queue", "16"]
    with serving(site.root, "--bundles", site.folder, "--token", TOKEN, "--max-wait-ms", "20", *limits) as s:
        yield s


def files(*parts: tuple[str, bytes, str]) -> dict:
    return {"files": [("files", p) for p in parts]}


def chunked(data: bytes):
    for i in range(0, len(data), 8192):
        yield data[i : i + 8192]


@dataclass(frozen=True)
class HttpCase:
    name: str
    request: Callable[[Site], dict]  # httpx.request keyword arguments (method, url, body, headers)
    status: int
    message: Callable[[Site], str]  # the exact error line
    headers: tuple[str, ...] = ()  # headers the answer must carry


def post(task: str, auth: dict | None = AUTH, **kw) -> Callable[[Site], dict]:
    return lambda s: {"method": "POST", "url": f"/v1/tasks/{task}/predict", "headers": auth, **kw}


def fixed(text: str) -> Callable[[Site], str]:
    return lambda s: text


ALLOWED = "send PNG, JPEG or TIFF (image/png, image/jpeg, image/tiff)"
TOO_LARGE = f"the request body is over {MAX_UPLOAD:,} bytes (--max-upload-mb); send fewer or smaller images"
CASES = [
    HttpCase(
        "missing_token",
        post("alpha", auth=None, **files(("a.png", GOOD, "image/png"))),
        401,
        fixed("missing or wrong bearer token; send 'Authorization: Bearer <token>'"),
        ("WWW-Authenticate",),
    ),
    HttpCase(
        "wrong_token",
        post("alpha", auth={"Authorization": "Bearer nope"}, **files(("a.png", GOOD, "image/png"))),
        401,
        fixed("missing or wrong bearer token; send 'Authorization: Bearer <token>'"),
        ("WWW-Authenticate",),
    ),
    HttpCase(
        "metrics_need_the_token",
        lambda s: {"method": "GET", "url": "/metrics"},
        401,
        fixed("missing or wrong bearer token; send 'Authorization: Bearer <token>'"),
    ),
    HttpCase(
        "unknown_task",
        post("nope", **files(("a.png", GOOD, "image/png"))),
        404,
        fixed("no task 'nope'; GET /v1/tasks lists the tasks"),
    ),
    HttpCase(
        "hidden_task_name",
        post("%2E%2E", **files(("a.png", GOOD, "image/png"))),
        404,
        fixed("no task '..'; GET /v1/tasks lists the tasks"),
    ),
    HttpCase(
        "bundle_of_another_backbone",
        post("other", **files(("a.png", GOOD, "image/png"))),
        409,
        lambda s: (
            f"task 'other' was trained on 'vit_small_patch16_224' (weights {s.other_fingerprint[:12]}, 32 px, "
            f"default pooling), but this server runs 'vit_small_patch16_224' (weights {s.fingerprint[:12]}, 32 px, "
            "default pooling); serve it from a server on its own backbone"
        ),
    ),
    HttpCase(
        "part_of_wrong_content_type",
        post("alpha", **files(("notes.txt", b"hello", "text/plain"))),
        415,
        fixed(f"notes.txt has content type text/plain; {ALLOWED}"),
    ),
    HttpCase(
        "body_of_wrong_content_type",
        post("alpha", content=b"hello", **{"headers": {**AUTH, "Content-Type": "text/plain"}}),
        415,
        fixed(
            "content type 'text/plain' is not accepted; send multipart/form-data, application/json (base64 images) "
            "or one image/png, image/jpeg or image/tiff body"
        ),
    ),
    HttpCase(
        "not_an_image",
        post("alpha", **files(("a.png", b"GIF89a not really", "image/png"))),
        415,
        fixed(f"a.png is not a PNG, JPEG or TIFF file (by its first bytes); {ALLOWED}"),
    ),
    HttpCase(
        "declared_png_holds_jpeg",
        post("alpha", **files(("a.png", png_bytes(20, 1, fmt="JPEG"), "image/png"))),
        415,
        fixed("a.png is declared image/png but holds JPEG data; send its true type"),
    ),
    HttpCase(
        "truncated_png",
        post("alpha", **files(("cut.png", GOOD[:200], "image/png"))),
        422,
        fixed("cut.png cannot be decoded as PNG: image file is truncated"),
    ),
    HttpCase(
        "empty_part",
        post("alpha", **files(("empty.png", b"", "image/png"))),
        422,
        fixed(f"empty.png is empty; {ALLOWED}"),
    ),
    HttpCase(
        "more_pixels_than_allowed",
        post("alpha", **files(("big.png", png_bytes(70, 2), "image/png"))),
        413,
        fixed(
            "big.png would decode to 73 x 70 = 5,110 pixels, over the limit of 4,096 (--max-pixels); send smaller tiles"
        ),
    ),
    HttpCase(
        "png_decompression_bomb",
        post("alpha", **files(("bomb.png", crafted_png(50_000, 50_000), "image/png"))),
        413,
        fixed(
            "bomb.png is refused as a decompression bomb: Image size (2500000000 pixels) exceeds limit of 8192 "
            "pixels, could be decompression bomb DOS attack."
        ),
    ),
    HttpCase(
        "jpeg_decompression_bomb",
        post("alpha", **files(("bomb.jpg", jpeg_claiming(65_000, 65_000), "image/jpeg"))),
        413,
        fixed(
            "bomb.jpg is refused as a decompression bomb: Image size (4225000000 pixels) exceeds limit of 8192 "
            "pixels, could be decompression bomb DOS attack."
        ),
    ),
    HttpCase(
        "oversized_upload",
        post("alpha", **files(("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_UPLOAD, "image/png"))),
        413,
        fixed(TOO_LARGE),
    ),
    HttpCase(
        "oversized_upload_without_length",
        post(
            "alpha",
            content=chunked(b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * MAX_UPLOAD)),
            headers={**AUTH, "Content-Type": "image/png"},
        ),
        413,
        fixed(TOO_LARGE),
    ),
    HttpCase(
        "too_many_images",
        post("alpha", **files(*[(f"{i}.png", GOOD, "image/png") for i in range(4)])),
        413,
        fixed("the request holds 4 images, over the limit of 3 (--max-images)"),
    ),
    HttpCase(
        "form_field_not_a_file",
        post("alpha", data={"note": "x"}, **files(("a.png", GOOD, "image/png"))),
        422,
        fixed("form field 'note' is not a file; send every image as a file part"),
    ),
    HttpCase(
        "no_images",
        post("alpha", json={"images": []}),
        422,
        fixed("the request holds no image; send at least one"),
    ),
    HttpCase(
        "invalid_json",
        post("alpha", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}),
        400,
        fixed('the body is not valid JSON; send {"images": ["<base64>", ...]}'),
    ),
    HttpCase(
        "json_without_images",
        post("alpha", json={"image": "abc"}),
        422,
        fixed('the JSON body needs a list under \'images\': {"images": ["<base64>", ...]}'),
    ),
    HttpCase(
        "invalid_base64",
        post("alpha", json={"images": ["!!!"]}),
        422,
        fixed("image 0 is not valid base64; encode the file's bytes with base64"),
    ),
    HttpCase(
        "json_image_not_a_string",
        post("alpha", json={"images": [3]}),
        422,
        fixed("image 0 is a JSON int; send each image as a base64 string"),
    ),
    HttpCase(
        "malformed_multipart",
        post("alpha", content=b"--x\r\nnonsense", headers={**AUTH, "Content-Type": "multipart/form-data"}),
        400,
        fixed("the multipart body was refused: Missing boundary in multipart."),
    ),
    HttpCase(
        "wrong_method",
        lambda s: {"method": "GET", "url": "/v1/tasks/alpha/predict", "headers": AUTH},
        405,
        fixed("Method Not Allowed"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_request_fails_alone(case: HttpCase, strict, site):
    before = sha_tree(site.folder)
    with strict.client() as c:
        r = c.request(**case.request(site))
        assert r.status_code == case.status, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"error": case.message(site)}
        assert "\n" not in r.json()["error"]
        for header in case.headers:
            assert header in r.headers
        good = c.post("/v1/tasks/alpha/predict", headers=AUTH, files=[("files", ("ok.png", GOOD, "image/png"))])
    assert good.status_code == 200, good.text
    assert strict.alive()
    assert sha_tree(site.folder) == before


def test_a_full_queue_answers_429_and_a_slow_request_503(site, tmp_path):
    args = ["--max-queue", "4", "--max-images", "4", "--max-batch", "8", "--max-wait-ms", "4000"]
    with serving(tmp_path, "--bundles", site.folder, *args, "--request-timeout", "2") as s:
        four = [("files", (f"{i}.png", GOOD, "image/png")) for i in range(4)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, f"{s.url}/v1/tasks/alpha/predict", files=four, timeout=60)
            deadline = time.monotonic() + 30
            while s.metric("pathotune_queue_images") < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            full = httpx.post(f"{s.url}/v1/tasks/alpha/predict", files=four[:1], timeout=60)
            slow = waiting.result()
        assert full.status_code == 429
        assert full.json() == {"error": "the queue holds 4 of 4 images (--max-queue); retry later"}
        assert int(full.headers["Retry-After"]) >= 1
        assert slow.status_code == 503
        assert slow.json() == {"error": "the request took longer than 2 s (--request-timeout); retry later"}
        assert int(slow.headers["Retry-After"]) >= 1
        deadline = time.monotonic() + 30
        while s.metric("pathotune_queue_images") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.metric("pathotune_queue_images") == 0
        assert s.metric("pathotune_images_total") == 0  # the timed-out images never ran
        assert s.alive() and httpx.get(f"{s.url}/readyz").status_code == 200
        assert s.metric('pathotune_requests_total{status="429",task="alpha"}') == 1


def free_port_in_use() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    "case",
    [
        "not_loopback_without_token",
        "port_in_use",
        "no_such_folder",
        "empty_folder",
        "queue_smaller_than_a_request",
        "unknown_reference",
    ],
)
def test_bad_settings_end_on_one_line(case, site, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PATHOTUNE_SERVE_TOKEN", raising=False)
    args: list = ["serve", "--bundles", site.folder, "--port", "0"]
    busy = None
    if case == "not_loopback_without_token":
        args += ["--host", "0.0.0.0"]  # refused before anything binds
        expect = (
            "error: --host 0.0.0.0 is reachable from other machines, so requests must carry a bearer token: pass "
            "--token or set PATHOTUNE_SERVE_TOKEN (or bind 127.0.0.1)"
        )
    elif case == "port_in_use":
        busy = free_port_in_use()
        port = busy.getsockname()[1]
        args = ["serve", "--bundles", site.folder, "--port", str(port)]
        expect = f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pick another --port or --host"
    elif case == "no_such_folder":
        args[2] = tmp_path / "missing"
        expect = f"error: --bundles {tmp_path / 'missing'} is not a folder; pass a folder of bundle folders or a bundle"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args[2] = tmp_path / "empty"
        expect = f"error: no bundles found in {tmp_path / 'empty'}; put each bundle in a sub-folder (<folder>/<task>/)"
    elif case == "unknown_reference":
        args += ["--reference", "nope"]
        expect = "error: --reference nope is not a task here; the tasks are alpha, other"
    else:
        args += ["--max-images", "10", "--max-queue", "5"]
        expect = (
            "error: --max-images 10 exceeds --max-queue 5: such a request could never be admitted; raise --max-queue "
            "or lower --max-images"
        )
    before = sha_tree(site.folder)
    try:
        code, _, err = run_main(monkeypatch, capsys, *args)
    finally:
        if busy is not None:
            busy.close()
    assert code == 2
    assert one_line_error(err) == expect
    assert sha_tree(site.folder) == before


def test_a_task_larger_than_the_whole_cache_is_refused(site):
    store = BundleStore([str(site.folder)], cache_bytes=4096, metrics=ServeMetrics())
    alpha = store.task("alpha")
    with pytest.raises(RequestError) as e:
        store.model(alpha)
    assert e.value.status == 507
    assert str(e.value).startswith("task 'alpha' needs ")
    assert str(e.value).endswith(
        "bytes, more than the whole bundle cache (4,096 bytes, --cache-mb); restart the server with a larger cache"
    )
    assert store.cached_bytes == 0 and not store.cache
    with pytest.raises(RequestError, match=r"^task 'other' was trained on .* serve it from a server on its own"):
        store.task("other")
