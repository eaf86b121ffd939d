"""`pathotune serve` end to end: the real server in a subprocess on a free 127.0.0.1 port, spoken to over HTTP.

Answers equal `pathotune predict` on the same files; requests of different tasks share one forward; bundles are
found, replaced and dropped on disk without a restart; the LRU of task models stays within its bound; SIGTERM
lets every admitted request finish."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from helpers import cli_cmd, cli_env
from serve_kit import IVP_EARLY, copy_in, png_bytes, serving, tiny_bundle, tiny_weights
from test_hub import cache_repo

from pathotune.bundle import MANIFEST, TENSORS

TASKS = ("alpha", "beta", "delta", "gamma")
CACHE_MB = "0.3"  # two pathotune task models (136 KB each here) and the small ones: the LRU must evict


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """Four servable tasks of three token layouts, one on other backbone weights, a hub copy of beta, images."""
    root = tmp_path_factory.mktemp("serve")
    weights = tiny_weights(root / "backbone.safetensors", seed=3)
    folder = root / "bundles"
    folder.mkdir()
    tiny_bundle(folder / "alpha", weights, "pathotune", 3, seed=1, **IVP_EARLY)
    tiny_bundle(folder / "beta", weights, "pathotune", 2, seed=2, **IVP_EARLY)
    tiny_bundle(folder / "gamma", weights, "vpt-deep", 4, seed=3)
    tiny_bundle(folder / "delta", weights, "linear", 3, seed=4)
    other = tiny_weights(root / "other.safetensors", seed=4)
    tiny_bundle(folder / "other", other, "vpt-deep", 2, seed=5)
    spare = root / "spare"
    spare.mkdir()
    tiny_bundle(spare / "epsilon", weights, "pathotune", 2, seed=6, **IVP_EARLY)
    tiny_bundle(spare / "epsilon2", weights, "vpt-deep", 2, seed=7)
    hub = root / "hf-cache"
    cache_repo(hub, "lab/hubtask", {n: folder / "beta" / n for n in (MANIFEST, TENSORS)})
    images = root / "images"
    images.mkdir()
    for i, (mode, fmt, ext) in enumerate(
        [
            ("RGB", "PNG", "png"),
            ("RGBA", "PNG", "png"),
            ("L", "PNG", "png"),
            ("RGB", "JPEG", "jpg"),
            ("RGB", "TIFF", "tif"),
        ]
    ):
        (images / f"img{i}.{ext}").write_bytes(png_bytes(30 + 9 * i, i, mode, fmt))
    return {"root": root, "folder": folder, "spare": spare, "hub": hub, "images": sorted(images.iterdir())}


@pytest.fixture(scope="module")
def server(site):
    env = {"HF_HUB_CACHE": str(site["hub"]), "HF_HUB_OFFLINE": "1"}
    args = ["--bundles", site["folder"], "--bundles", "hf-hub:lab/hubtask", "--max-wait-ms", "1000"]
    with serving(site["root"], *args, "--max-batch", "64", "--cache-mb", CACHE_MB, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def offline(site) -> dict:
    """`pathotune predict` on the same files, every task: {task: {file name: probabilities}}."""
    bundles = [a for t in TASKS for a in ("--bundle", site["folder"] / t)]
    out = site["root"] / "preds.csv"
    done = subprocess.run(
        cli_cmd("predict", *bundles, *site["images"], "--out", out, "--json", "--quiet"),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict = {t: {} for t in TASKS}
    for row in json.loads(done.stdout)["predictions"]:
        for task, pred in row["tasks"].items():
            result[task][Path(row["path"]).name] = list(pred["probs"].values())
    return result


def multipart(files: list[Path]) -> list:
    kinds = {".png": "image/png", ".jpg": "image/jpeg", ".tif": "image/tiff"}
    return [("files", (f.name, f.read_bytes(), kinds[f.suffix])) for f in files]


def test_answers_equal_pathotune_predict_and_one_batch_serves_several_tasks(server, site, offline):
    with server.client() as c:
        for task in TASKS:  # load every task model first, so the next requests meet in one collection window
            assert c.post(f"/v1/tasks/{task}/predict", files=multipart(site["images"][:1])).status_code == 200
    before = server.metric("pathotune_batch_tasks_count")

    def ask(task: str) -> httpx.Response:
        with server.client() as c:
            return c.post(f"/v1/tasks/{task}/predict", files=multipart(site["images"]))

    with concurrent.futures.ThreadPoolExecutor(len(TASKS)) as pool:
        answers = dict(zip(TASKS, pool.map(ask, TASKS), strict=True))
    batches: dict[int, set[str]] = {}
    for task, r in answers.items():
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == task
        assert [p["name"] for p in body["predictions"]] == [f.name for f in site["images"]]
        for p in body["predictions"]:
            expected = offline[task][p["name"]]
            assert list(p["probs"]) == body["classes"]
            assert max(abs(a - b) for a, b in zip(p["probs"].values(), expected, strict=True)) <= 1e-5
            batches.setdefault(p["batch"]["id"], set()).add(task)
            assert p["batch"]["tasks"] >= len(batches[p["batch"]["id"]])
        assert r.headers["X-Pathotune-Batches"] == ",".join(
            str(b) for b in sorted({p["batch"]["id"] for p in body["predictions"]})
        )
    assert max(len(t) for t in batches.values()) >= 2, batches  # one forward served several tasks
    assert server.metric("pathotune_batch_tasks_count") > before
    shared = server.metric("pathotune_batch_tasks_count") - server.metric('pathotune_batch_tasks_bucket{le="1.0"}')
    assert shared >= 1  # the histogram saw a batch of more than one task


def test_json_base64_and_a_raw_body_give_the_same_answers(server, site, offline):
    files = site["images"]
    with server.client() as c:
        r = c.post(
            "/v1/tasks/gamma/predict", json={"images": [base64.b64encode(f.read_bytes()).decode() for f in files]}
        )
        assert r.status_code == 200, r.text
        for f, p in zip(files, r.json()["predictions"], strict=True):
            assert max(abs(a - b) for a, b in zip(p["probs"].values(), offline["gamma"][f.name], strict=True)) <= 1e-5
        url = "data:image/png;base64," + base64.b64encode(files[0].read_bytes()).decode()
        r = c.post("/v1/tasks/delta/predict", json={"images": [url]})
        raw = c.post("/v1/tasks/delta/predict", content=files[0].read_bytes(), headers={"Content-Type": "image/png"})
    assert r.status_code == raw.status_code == 200
    for body in (r.json(), raw.json()):
        got = list(body["predictions"][0]["probs"].values())
        assert max(abs(a - b) for a, b in zip(got, offline["delta"][files[0].name], strict=True)) <= 1e-5


def test_task_list_names_classes_fingerprints_and_card_metrics(server, site):
    with server.client() as c:
        body = c.get("/v1/tasks").json()
        one = c.get("/v1/tasks/alpha").json()
    tasks = {t["name"]: t for t in body["tasks"]}
    assert set(tasks) >= {*TASKS, "other", "hubtask"}
    manifest = json.loads((site["folder"] / "alpha" / MANIFEST).read_text())
    assert tasks["alpha"] == one
    assert tasks["alpha"]["classes"] == ["alpha_c0", "alpha_c1", "alpha_c2"]
    assert tasks["alpha"]["fingerprint"] == body["backbone"]["fingerprint"] == manifest["provenance"]["fingerprint"]
    assert tasks["alpha"]["metrics"] == {"balanced_accuracy": 0.51}
    assert tasks["alpha"]["servable"] and tasks["hubtask"]["servable"]
    assert tasks["hubtask"]["classes"] == tasks["beta"]["classes"]
    assert not tasks["other"]["servable"]
    assert body["backbone"]["fingerprint"][:12] in tasks["other"]["problem"]


def test_a_hub_bundle_answers_as_its_local_copy(server, site):
    with server.client() as c:
        hub = c.post("/v1/tasks/hubtask/predict", files=multipart(site["images"][:2])).json()
        local = c.post("/v1/tasks/beta/predict", files=multipart(site["images"][:2])).json()
    assert [p["probs"] for p in hub["predictions"]] == [p["probs"] for p in local["predictions"]]


def test_bundles_added_replaced_and_removed_without_a_restart(server, site):
    folder, spare = site["folder"], site["spare"]
    with server.client() as c:
        assert c.post("/v1/tasks/epsilon/predict", files=multipart(site["images"][:1])).status_code == 404
        copy_in(spare / "epsilon", folder, "epsilon")
        first = c.post("/v1/tasks/epsilon/predict", files=multipart(site["images"][:1]))
        assert first.status_code == 200, first.text
        assert "epsilon" in {t["name"] for t in c.get("/v1/tasks").json()["tasks"]}
        shutil.rmtree(folder / "epsilon")
        copy_in(spare / "epsilon2", folder, "epsilon")  # replaced by another bundle under the same name
        second = c.post("/v1/tasks/epsilon/predict", files=multipart(site["images"][:1]))
        assert second.status_code == 200, second.text
        assert second.json()["bundle_sha256"] != first.json()["bundle_sha256"]
        assert second.json()["predictions"][0]["probs"] != first.json()["predictions"][0]["probs"]
        shutil.rmtree(folder / "epsilon")
        gone = c.post("/v1/tasks/epsilon/predict", files=multipart(site["images"][:1]))
        assert gone.status_code == 404 and gone.json() == {"error": "no task 'epsilon'; GET /v1/tasks lists the tasks"}
        assert "epsilon" not in {t["name"] for t in c.get("/v1/tasks").json()["tasks"]}


def test_the_bundle_cache_stays_within_its_bound(server, site):
    with server.client() as c:
        for _ in range(2):
            for task in ("alpha", "beta", "hubtask", "gamma"):
                assert c.post(f"/v1/tasks/{task}/predict", files=multipart(site["images"][:1])).status_code == 200
    limit = server.metric("pathotune_bundle_cache_limit_bytes")
    assert limit == int(float(CACHE_MB) * 2**20)
    assert 0 < server.metric("pathotune_bundle_cache_bytes") <= limit
    assert server.metric("pathotune_bundle_cache_evictions_total") >= 2
    assert server.metric("pathotune_bundle_cache_misses_total") >= 4
    assert server.metric("pathotune_bundle_cache_hits_total") >= 1


def test_health_metrics_and_openapi(server):
    with server.client() as c:
        assert c.get("/livez").json() == {"status": "alive"}
        assert c.get("/readyz").json()["status"] == "ready"
        spec = c.get("/openapi.json").json()
        assert c.get("/docs").status_code == 200
        text = c.get("/metrics").text
    predict = spec["paths"]["/v1/tasks/{task}/predict"]["post"]
    assert set(predict["requestBody"]["content"]) >= {"multipart/form-data", "application/json", "image/png"}
    assert {"429", "413", "415"} <= set(predict["responses"])
    for name in (
        "pathotune_requests_total",
        "pathotune_request_seconds_bucket",
        "pathotune_batch_images_bucket",
        "pathotune_batch_tasks_bucket",
        "pathotune_queue_images",
        "pathotune_bundle_cache_hits_total",
        "pathotune_bundle_cache_misses_total",
    ):
        assert f"\n{name}" in text, name
    assert 'pathotune_requests_total{status="200",task="alpha"}' in text


def test_sigterm_finishes_every_admitted_request(site, tmp_path):
    args = ["--bundles", site["folder"], "--max-wait-ms", "3000", "--max-batch", "64"]
    with serving(tmp_path, *args) as s:
        files = multipart(site["images"][:2])
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            sent = [
                pool.submit(lambda t: httpx.post(f"{s.url}/v1/tasks/{t}/predict", files=files, timeout=60), task)
                for task in TASKS + TASKS[:2]
            ]
            deadline = time.monotonic() + 30
            while s.metric("pathotune_queue_images") < 12 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.metric("pathotune_queue_images") == 12  # all six admitted, waiting for a fuller batch
            code = s.stop()
            answers = [f.result() for f in sent]
    assert code == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down cleanly
    assert [r.status_code for r in answers] == [200] * 6
    assert all(len(r.json()["predictions"]) == 2 for r in answers)
    log = s.log.read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log
