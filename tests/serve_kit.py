"""Tiny bundles and a real `pathotune serve` in a subprocess on a free 127.0.0.1 port, for the server's tests."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from helpers import IMG, TINY, TINY_NAME, cli_cmd, cli_env
from PIL import Image
from safetensors.torch import save_file

from pathotune import Task, create_model, save_bundle

READY = re.compile(r"pathotune serve: \d+ task\(s\) on (http://127\.0\.0\.1:\d+)")
IVP_EARLY = {"ivp_source": "early", "ivp_layer": 1, "ttp_layer": 1, "tvp_layer": 1}


def tiny_weights(path: Path, seed: int) -> Path:
    """A tiny backbone's weights as safetensors: bundles made on it carry a real fingerprint."""
    model = create_model(TINY_NAME, "linear", 2, image_size=IMG, backbone_kwargs=TINY)  # random init, fixed seed
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in model.backbone.vit.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def tiny_bundle(
    path: Path, weights: Path, method: str, n_classes: int, seed: int, metrics: dict | None = None, **switches
) -> Path:
    """A bundle with randomly perturbed prompts and head (distinct outputs per task), as training would save it."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = create_model(
        TINY_NAME,
        method,
        n_classes,
        task=Task(name=path.name, classes=tuple(f"{path.name}_c{j}" for j in range(n_classes))),
        weights=weights,
        image_size=IMG,
        backbone_kwargs=TINY,
        text_features=(torch.randn(24, generator=g), torch.randn(7, 24, generator=g)),
        **switches,
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return save_bundle(model, path, extra={"metrics": metrics or {"balanced_accuracy": 0.5 + seed / 100}})


def copy_in(bundle: Path, folder: Path, name: str) -> Path:
    """Add a bundle to a served folder as a user would: built beside it under a hidden name, then renamed."""
    tmp = folder / f".{name}.partial"
    shutil.copytree(bundle, tmp)
    os.replace(tmp, folder / name)
    return folder / name


def png_bytes(size: int, seed: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size, size + 3, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def alive(self) -> bool:
        """The process runs and answers its liveness probe."""
        if self.proc.poll() is not None:
            return False
        return httpx.get(f"{self.url}/livez", timeout=10).status_code == 200

    def metric(self, name: str, headers: dict | None = None) -> float:
        """The sum of every sample of ``name`` in /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
        return sum(float(v) for v in pattern.findall(text))

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@contextlib.contextmanager
def serving(tmp: Path, *args: str | os.PathLike, env: dict | None = None, timeout: float = 180) -> Iterator[Server]:
    """`pathotune serve ARGS --port 0` in a subprocess; yields once it listens, stops it with SIGTERM after."""
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cli_cmd("serve", "--host", "127.0.0.1", "--port", "0", *args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**cli_env(), **(env or {})},
        )
    server = None
    try:
        deadline = time.monotonic() + timeout
        while server is None:
            found = READY.search(log.read_text(errors="replace"))
            if found:
                server = Server(proc, found.group(1), log)
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start (exit {proc.poll()}):\n{log.read_text()}")
            else:
                time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
