"""Load test of `pathotune serve` on 127.0.0.1, with bounded request loops: throughput, latency, correctness, memory.

    python benchmarks/serve_load.py load --image-size 56 --max-batch 16
    python benchmarks/serve_load.py bundles --bundles 1000 --cache-mb 64 --image-size 56

``load`` builds 8 PathoTune bundles on the bundled DINOv2-S (prompts and heads moved off their initialisation,
so every task answers differently), cuts real H&E tiles from the bundled HistoQC templates, and computes every
(tile, task) answer offline with ``MultiTaskModel`` (the expected answers, and the offline mixed-batch
throughput at the server's batch size). It then starts the server and measures, one image per request sent as
a raw ``image/png`` body by an httpx async client: the saturation throughput (closed loop, 2 x max-batch
requests in flight) with the 8 tasks mixed and with one task, and its ratio to the offline mixed batch; p50 and
p99 latency under open-loop Poisson arrivals at 50% and 90% of the mixed saturation rate; and, over every
request of every phase, how many were lost (no 200) or wrong (probabilities more than 1e-5 from offline).

``bundles`` registers many bundles in one folder, requests them round-robin (each request a cache miss once the
LRU is full) and samples the server's resident memory, to show that it stays within the LRU bound.

Only 127.0.0.1 is contacted; every loop has a fixed number of requests.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import httpx
import psutil
import torch
from multitask_throughput import EARLY, make_bundles, timed
from PIL import Image

from pathotune import transforms
from pathotune.bundle import load_bundle
from pathotune.core.allocator import retain_freed_memory
from pathotune.multitask import MultiTaskModel
from pathotune.serve.images import Upload, decode_rgb

PATHOTUNE = str(Path(sys.executable).with_name("pathotune"))
READY = re.compile(r"pathotune serve: \d+ task\(s\) on (http://127\.0\.0\.1:\d+)")
TOLERANCE = 1e-5


def tiles(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` PNG tiles of ``size`` px cut at random places from the bundled H&E templates (HistoQC, Clear BSD)."""
    rng = random.Random(seed)
    folder = resources.files("pathotune") / "assets" / "histoqc"
    sources = [Image.open(io.BytesIO((folder / f"template{i}.png").read_bytes())).convert("RGB") for i in (1, 2, 3, 4)]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        x, y = rng.randrange(src.width - size), rng.randrange(src.height - size)
        buf = io.BytesIO()
        src.crop((x, y, x + size, y + size)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@contextmanager
def server(bundles: Path, log: Path, *args: str):
    """`pathotune serve` on a free 127.0.0.1 port; yields (url, process); SIGTERM afterwards."""
    cmd = [PATHOTUNE, "serve", "--bundles", str(bundles), "--host", "127.0.0.1", "--port", "0", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not (found := READY.search(log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        print(f"server: {' '.join(cmd)}", flush=True)
        yield found.group(1), proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


class Tally:
    """Every answer of every phase: lost (no 200) or wrong (off the offline answer by more than TOLERANCE)."""

    def __init__(self, expected: dict[tuple[int, int], list[float]]) -> None:
        self.expected = expected
        self.sent = self.lost = self.wrong = 0
        self.worst = 0.0

    def check(self, image: int, task: int, response: httpx.Response | None) -> None:
        self.sent += 1
        if response is None or response.status_code != 200:
            self.lost += 1
            return
        probs = list(response.json()["predictions"][0]["probs"].values())
        want = self.expected[(image, task)]
        diff = max(abs(a - b) for a, b in zip(probs, want, strict=True)) if len(probs) == len(want) else math.inf
        self.worst = max(self.worst, diff)
        self.wrong += diff > TOLERANCE


async def send(client: httpx.AsyncClient, body: bytes, task: int) -> httpx.Response | None:
    try:
        return await client.post(f"/v1/tasks/task{task}/predict", content=body, headers={"Content-Type": "image/png"})
    except httpx.HTTPError:
        return None


async def closed_loop(url: str, bodies: list[bytes], n: int, tasks: int, concurrency: int, tally: Tally) -> float:
    """``n`` requests with ``concurrency`` in flight (request i: tile i, task i mod ``tasks``); images/s."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                image, task = i % len(bodies), i % tasks
                tally.check(image, task, await send(client, bodies[image], task))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - start)


async def open_loop(url: str, bodies: list[bytes], n: int, tasks: int, rate: float, tally: Tally) -> list[float]:
    """``n`` requests arriving as a Poisson process of ``rate`` per second; each one's latency (seconds)."""
    rng = random.Random(1)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            sent = time.perf_counter()
            image, task = i % len(bodies), i % tasks
            tally.check(image, task, await send(client, bodies[image], task))
            latencies.append(time.perf_counter() - sent)

        at, jobs = 0.0, []
        for i in range(n):
            at += rng.expovariate(rate)
            jobs.append(one(i, at))
        await asyncio.gather(*jobs)
    return latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def workspace(args: argparse.Namespace) -> tuple[Path, Path, bool]:
    """The work folder, its bundle folder, and whether the bundles are still to be built (``--work`` reuses them)."""
    torch.manual_seed(0)
    work = Path(args.work or tempfile.mkdtemp(prefix=f"serve-{args.mode}-"))
    folder = work / "bundles"
    build = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return work, folder, build


def run_load(args: argparse.Namespace) -> dict:
    work, folder, build = workspace(args)
    if build:
        make_bundles(folder, args.tasks, args.image_size, EARLY, perturb=0.05)
    paths = [folder / f"task{t}" for t in range(args.tasks)]
    multi = MultiTaskModel.from_bundles(paths)
    bodies = tiles(args.tiles, args.image_size)
    transform = transforms(multi.tasks[0])
    x = torch.stack([transform(decode_rgb(Upload(f"tile {i}", b), 10**8)) for i, b in enumerate(bodies)])
    expected = {}
    with torch.inference_mode():
        for t in range(args.tasks):
            logits = multi(x, torch.full((len(bodies),), t))
            for i, lg in enumerate(logits):
                expected[(i, t)] = lg.float().softmax(-1).tolist()
    batch = x[torch.arange(args.max_batch) % len(bodies)]
    single = torch.zeros(args.max_batch, dtype=torch.long)
    phases = {"mixed": (torch.arange(args.max_batch) % args.tasks, args.tasks), "single": (single, 1)}
    tally = Tally(expected)
    concurrency = 2 * args.max_batch
    flags = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "100000"]
    flags += ["--request-timeout", "600", "--no-access-log", "--log-level", "warning"]
    flags += ["--threads", str(args.threads)] if args.threads else []
    result: dict = {"image_size": args.image_size, "tasks": args.tasks, "max_batch": args.max_batch}
    result["threads"] = args.threads or torch.get_num_threads()
    offline: dict[str, list[float]] = {k: [] for k in phases}
    served: dict[str, list[float]] = {k: [] for k in phases}
    setup = (torch.set_num_threads, (args.threads,)) if args.threads else (None, ())
    # The offline batch runs in one worker thread, as the server runs its forward, and alternates with the served
    # phases round by round, so that a change in the machine's other load falls on both sides of each ratio.
    with (
        ThreadPoolExecutor(1, initializer=setup[0], initargs=setup[1]) as thread,
        server(folder, work / "server.log", *flags) as (url, _),
    ):
        asyncio.run(closed_loop(url, bodies, 2 * concurrency, args.tasks, concurrency, Tally(expected)))  # warm-up
        for _ in range(args.rounds):
            for kind, (ids, tasks) in phases.items():
                rates = thread.submit(timed, lambda ids=ids: multi(batch, ids), args.repeats, args.max_batch).result()
                offline[kind].append(statistics.median(rates))
                n = args.saturation // args.rounds
                served[kind].append(asyncio.run(closed_loop(url, bodies, n, tasks, concurrency, tally)))
        mixed = statistics.median(served["mixed"])
        lat = {}
        for share in (0.5, 0.9):
            times = asyncio.run(open_loop(url, bodies, args.load, args.tasks, share * mixed, tally))
            lat[share] = (percentile(times, 50), percentile(times, 99))
    ratios = {k: statistics.median(s / o for s, o in zip(served[k], offline[k], strict=True)) for k in phases}
    result.update(
        offline={k: statistics.median(v) for k, v in offline.items()},
        served={k: statistics.median(v) for k, v in served.items()},
        rounds={"offline": offline, "served": served},
        ratio=ratios,
        latency={
            f"{int(s * 100)}%": {"rate": s * mixed, "p50_ms": a * 1e3, "p99_ms": b * 1e3} for s, (a, b) in lat.items()
        },
        requests=tally.sent,
        lost=tally.lost,
        wrong=tally.wrong,
        max_abs_diff=tally.worst,
    )
    print(
        f"dinov2_vits14 at {args.image_size} px, {args.tasks} tasks, max batch {args.max_batch}, "
        f"max wait {args.max_wait_ms} ms, {concurrency} requests in flight, one tile per request, "
        f"{result['threads']} torch threads, {args.rounds} rounds of offline then served"
    )
    for kind in phases:
        shown = ", ".join(f"{s:.1f}/{o:.1f}" for s, o in zip(served[kind], offline[kind], strict=True))
        print(
            f"{kind:6s}: served {result['served'][kind]:7.2f} img/s, offline batch {result['offline'][kind]:7.2f} "
            f"img/s (medians); ratio {ratios[kind]:.3f} (median of rounds; served/offline: {shown})"
        )
    for share, (p50, p99) in lat.items():
        print(f"open loop at {share:.0%} ({share * mixed:.2f} req/s): p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")
    print(f"{tally.sent} requests: {tally.lost} lost, {tally.wrong} wrong (max |diff| {tally.worst:.2e}, limit 1e-5)")
    return result


def rss(proc: subprocess.Popen) -> int:
    return psutil.Process(proc.pid).memory_info().rss


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=60).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def run_bundles(args: argparse.Namespace) -> dict:
    work, folder, build = workspace(args)
    if build:
        first = make_bundles(folder, 1, args.image_size, EARLY, perturb=0.05)[0]
        shared = load_bundle(first).backbone  # one backbone for the builds: each bundle costs its own tensors only
        start = time.perf_counter()
        make_bundles(folder, args.bundles - 1, args.image_size, EARLY, backbone=shared, perturb=0.05, start=1)
        print(f"{args.bundles} bundles written in {time.perf_counter() - start:.0f} s to {folder}", flush=True)
    body = tiles(1, args.image_size)[0]
    flags = ["--cache-mb", str(args.cache_mb), "--no-access-log", "--log-level", "warning", "--request-timeout", "600"]
    limit = int(args.cache_mb * 2**20)
    samples = []
    with server(folder, work / "server.log", *flags) as (url, proc), httpx.Client(base_url=url, timeout=600) as c:
        baseline = rss(proc)
        registered = len(c.get("/v1/tasks").json()["tasks"])
        start = time.perf_counter()
        for i in range(args.passes * args.bundles):
            r = c.post(f"/v1/tasks/task{i % args.bundles}/predict", content=body, headers={"Content-Type": "image/png"})
            if r.status_code != 200:
                raise SystemExit(f"request {i} failed: {r.status_code} {r.text}")
            if i % args.every == 0 or i == args.passes * args.bundles - 1:
                samples.append((i + 1, rss(proc), metric(url, "pathotune_bundle_cache_bytes")))
        elapsed = time.perf_counter() - start
        evictions = metric(url, "pathotune_bundle_cache_evictions_total")
        misses = metric(url, "pathotune_bundle_cache_misses_total")
        per_task = metric(url, "pathotune_bundle_cache_bytes") / max(1.0, metric(url, "pathotune_bundle_cache_tasks"))
    peak = max(s[1] for s in samples)
    after_fill = [s[1] for s in samples if s[0] >= args.bundles]  # once every bundle has been loaded at least once
    print(
        f"{registered} bundles registered; {args.passes * args.bundles} requests round-robin in {elapsed:.0f} s; "
        f"{misses:.0f} loads, {evictions:.0f} evictions; one task model holds {per_task / 2**20:.2f} MiB"
    )
    print(f"LRU bound {limit / 2**20:.0f} MiB; cache peak {max(s[2] for s in samples) / 2**20:.1f} MiB")
    print(
        f"server RSS: {baseline / 2**20:.0f} MiB at start, peak {peak / 2**20:.0f} MiB "
        f"(+{(peak - baseline) / 2**20:.0f} MiB); after every bundle was loaded once: "
        f"{min(after_fill) / 2**20:.0f}-{max(after_fill) / 2**20:.0f} MiB"
    )
    print(f"all {args.bundles} task models loaded at once would take {args.bundles * per_task / 2**20:.0f} MiB")
    for n, r, cached in samples:
        print(f"  after {n:5d} requests: RSS {r / 2**20:7.1f} MiB, cache {cached / 2**20:6.1f} MiB")
    return {
        "bundles": registered,
        "requests": args.passes * args.bundles,
        "cache_limit": limit,
        "rss_start": baseline,
        "rss_peak": peak,
        "per_task_bytes": per_task,
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    load = sub.add_parser("load", help="throughput, latency and correctness of 8 mixed tasks")
    load.add_argument("--image-size", type=int, default=56)
    load.add_argument("--tasks", type=int, default=8)
    load.add_argument("--max-batch", type=int, default=16)
    load.add_argument("--max-wait-ms", type=float, default=10.0)
    load.add_argument("--tiles", type=int, default=64)
    load.add_argument("--saturation", type=int, default=1500, help="requests per saturation phase (2 phases)")
    load.add_argument("--rounds", type=int, default=5, help="alternations of offline and served measurement")
    load.add_argument("--load", type=int, default=1000, help="requests per open-loop phase (2 phases)")
    load.add_argument("--repeats", type=int, default=5, help="timed repeats of the offline batch")
    load.add_argument("--threads", type=int, help="torch threads of the forward, offline and served (default: torch's)")
    many = sub.add_parser("bundles", help="memory with many registered bundles")
    many.add_argument("--bundles", type=int, default=1000)
    many.add_argument("--cache-mb", type=float, default=64.0)
    many.add_argument("--image-size", type=int, default=56)
    many.add_argument("--passes", type=int, default=2)
    many.add_argument("--every", type=int, default=100, help="sample memory every N requests")
    for p in (load, many):
        p.add_argument("--work", help="folder for the bundles (reused when it holds them) and the server log")
        p.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    retain_freed_memory()  # as the `pathotune` command does, so the offline numbers run under the same allocator
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_load(args) if args.mode == "load" else run_bundles(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
